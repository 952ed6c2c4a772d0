"""Validate KServe manifests offline against the KServe SDK's own models, strictly.

    python scripts/validate_kserve.py KSERVE_WHEEL MANIFEST.yaml...

The ``kserve`` package on PyPI carries a generated model class per KServe API type (``kserve/models/
v1beta1_inference_service.py``...), each with ``openapi_types`` (field -> type) and ``attribute_map``
(field -> JSON key). They are read from the wheel with ``ast``, without importing the package (it would
pull in its whole runtime), and every KServe object in the manifests is walked against them: an unknown
key, a wrong type or a missing required field fails. Kubernetes core types inside (``V1Container``,
``V1ObjectMeta``...) are checked against kubernetes-validate's strict JSON schemas of the same types.

Exit status 0 when every object is valid; 1 with one line per problem otherwise.
"""

from __future__ import annotations

import ast
import json
import re
import sys
import zipfile
from pathlib import Path
from typing import Any

import yaml

KINDS = {
    ("serving.kserve.io/v1beta1", "InferenceService"): "V1beta1InferenceService",
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): "V1alpha1ServingRuntime",
    ("serving.kserve.io/v1alpha1", "ClusterServingRuntime"): "V1alpha1ClusterServingRuntime",
    ("serving.kserve.io/v1alpha1", "InferenceGraph"): "V1alpha1InferenceGraph",
}
_REQUIRED = re.compile(r"Invalid value for `(\w+)`, must not be `None`")


class Model:
    def __init__(self, types: dict[str, str], keys: dict[str, str], required: set[str]) -> None:
        self.types = types  # attribute -> type
        self.keys = keys  # attribute -> JSON key
        self.by_key = {v: k for k, v in keys.items()}
        self.required = required


def load_models(wheel: Path) -> dict[str, Model]:
    models: dict[str, Model] = {}
    with zipfile.ZipFile(wheel) as archive:
        for name in archive.namelist():
            if not (name.startswith("kserve/models/") and name.endswith(".py")):
                continue
            source = archive.read(name).decode("utf-8")
            for node in ast.parse(source).body:
                if not isinstance(node, ast.ClassDef):
                    continue
                found: dict[str, dict[str, str]] = {}
                for item in node.body:
                    if isinstance(item, ast.Assign) and isinstance(item.targets[0], ast.Name):
                        if item.targets[0].id in ("openapi_types", "attribute_map"):
                            found[item.targets[0].id] = ast.literal_eval(item.value)
                if "openapi_types" in found and "attribute_map" in found:
                    class_source = ast.get_source_segment(source, node) or ""
                    models[node.name] = Model(
                        found["openapi_types"], found["attribute_map"], set(_REQUIRED.findall(class_source))
                    )
    if not models:
        raise SystemExit(f"{wheel}: no kserve/models classes found")
    return models


class K8sSchemas:
    """kubernetes-validate's strict JSON schemas of single types (``container-v1.json``...)."""

    def __init__(self) -> None:
        import kubernetes_validate

        root = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
        strict = sorted(p for p in root.iterdir() if p.name.endswith("-strict"))
        if not strict:
            raise SystemExit(f"no strict schemas under {root}")
        self.dir = strict[-1]

    def file_for(self, type_name: str) -> Path | None:
        match = re.fullmatch(r"(?:K8sIoApi(\w+?))?V1(\w+)", type_name)
        if not match:
            return None
        group, kind = match.group(1), match.group(2).lower()
        candidates = [f"{kind}-{group.lower()}-v1.json"] if group and group.lower() != "core" else []
        candidates += [f"{kind}-v1.json", f"{kind}-meta-v1.json"]
        for candidate in candidates:
            if (self.dir / candidate).exists():
                return self.dir / candidate
        return None

    def validate(self, value: Any, type_name: str, path: str) -> list[str]:
        import jsonschema
        from referencing import Registry, Resource

        schema_file = self.file_for(type_name)
        if schema_file is None:
            return [f"{path}: no Kubernetes schema found for {type_name}"]
        schema = json.loads(schema_file.read_text())

        def retrieve(uri: str) -> Resource:
            # The schemas' ids and references are https://kubernetes.io/api/<file>: read the local copy.
            return Resource.from_contents(json.loads((self.dir / uri.split("#")[0].rsplit("/", 1)[-1]).read_text()))

        registry = Registry(retrieve=retrieve)  # type: ignore[call-arg]
        validator = jsonschema.validators.validator_for(schema)(schema, registry=registry)
        return [
            f"{path}{''.join(f'.{p}' for p in error.absolute_path)}: {error.message}"
            for error in validator.iter_errors(value)
        ]


def check(value: Any, type_name: str, path: str, models: dict[str, Model], k8s: K8sSchemas) -> list[str]:
    if value is None:
        return []
    if type_name.startswith("list[") and type_name.endswith("]"):
        if not isinstance(value, list):
            return [f"{path}: expected a list ({type_name}), got {type(value).__name__}"]
        inner = type_name[5:-1]
        return [e for i, item in enumerate(value) for e in check(item, inner, f"{path}[{i}]", models, k8s)]
    if type_name.startswith("dict(") and type_name.endswith(")"):
        if not isinstance(value, dict):
            return [f"{path}: expected a map ({type_name}), got {type(value).__name__}"]
        inner = type_name[5:-1].split(",", 1)[1].strip()
        return [e for k, v in value.items() for e in check(v, inner, f"{path}.{k}", models, k8s)]
    simple = {"str": (str,), "int": (int,), "bool": (bool,), "float": (int, float)}
    if type_name in simple:
        ok = isinstance(value, simple[type_name]) and not (type_name in ("int", "float") and isinstance(value, bool))
        return [] if ok else [f"{path}: expected {type_name}, got {type(value).__name__} {value!r}"]
    if type_name == "object":
        return []
    if type_name == "ResourceQuantity":
        ok = isinstance(value, (str, int, float)) and not isinstance(value, bool)
        return [] if ok else [f"{path}: expected a quantity, got {value!r}"]
    model = models.get(type_name)
    if model is not None:
        if not isinstance(value, dict):
            return [f"{path}: expected an object ({type_name}), got {type(value).__name__}"]
        errors = [f"{path}.{key}: unknown field of {type_name}" for key in value if key not in model.by_key]
        errors += [f"{path}.{model.keys[a]}: required by {type_name}" for a in sorted(model.required)
                   if model.keys[a] not in value]
        for key, item in value.items():
            if key in model.by_key:
                attribute = model.by_key[key]
                errors += check(item, model.types[attribute], f"{path}.{key}", models, k8s)
        return errors
    return k8s.validate(value, type_name, path)


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__)
        return 2
    models = load_models(Path(argv[0]))
    k8s = K8sSchemas()
    problems: list[str] = []
    count = 0
    for manifest in argv[1:]:
        for doc in yaml.safe_load_all(Path(manifest).read_text()):
            if not doc:
                continue
            key = (doc.get("apiVersion"), doc.get("kind"))
            type_name = KINDS.get(key)  # type: ignore[arg-type]
            where = f"{manifest}:{doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"
            if type_name is None:
                problems.append(f"{where}: not a KServe kind this script knows ({key})")
                continue
            if type_name not in models:
                problems.append(f"{where}: the kserve package has no model {type_name}")
                continue
            problems += check(doc, type_name, where, models, k8s)
            count += 1
    for problem in problems:
        print(f"FAIL: {problem}")
    if problems:
        return 1
    print(f"ok: {count} KServe object(s) valid against the kserve package's models")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
