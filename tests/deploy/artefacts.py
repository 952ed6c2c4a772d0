"""What the deployment tests read: the artefacts' paths, parsed YAML, env files, the rendered
kustomizations, the Dockerfile's stages, compose services and HAProxy's settings. Shared by the
tests/deploy/test_deploy_*.py files, one per artefact; no Docker, no cluster."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers.components import missing_component

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
BASE = K8S / "base"
GPU = K8S / "overlays" / "gpu"
PORT = 8000
APP_UID = 10001
# The metric families the service exports (service/core/metrics.py), as Prometheus exposes them.
SERVICE_METRICS = {
    "effnet_requests_total",
    "effnet_request_duration_seconds",
    "effnet_queue_wait_seconds",
    "effnet_inference_duration_seconds",
    "effnet_batch_size",
    "effnet_queue_depth",
    "effnet_images_total",
    "effnet_rejected_total",
    "effnet_batch_failures_total",
    "effnet_model_info",
    "effnet_ready",
}


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def read_env_file(path: Path) -> dict[str, str]:
    """A kustomize env file: KEY=VALUE lines, '#' comments."""
    data = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not KEY=VALUE: {line!r}"
        assert key not in data, f"{path.name}: {key} set twice"
        data[key] = value
    return data


def base_objects() -> dict[str, dict]:
    """The base's resources by kind (one object of each kind)."""
    kustomization = load_yaml(BASE / "kustomization.yaml")
    objects: dict[str, dict] = {}
    for name in kustomization["resources"]:
        for doc in load_docs(BASE / name):
            assert doc["kind"] not in objects, f"two {doc['kind']} objects in the base"
            objects[doc["kind"]] = doc
    return objects


def only_container(deployment: dict) -> dict:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def base_settings() -> dict[str, str]:
    return read_env_file(BASE / "settings.env")


def gpu_settings() -> dict[str, str]:
    return {**base_settings(), **read_env_file(GPU / "settings-gpu.env")}


def gpu_patch(kind: str) -> dict:
    kustomization = load_yaml(GPU / "kustomization.yaml")
    found = [
        doc
        for entry in kustomization["patches"]
        for doc in load_docs(GPU / entry["path"])
        if doc["kind"] == kind
    ]
    assert len(found) == 1, f"expected one {kind} patch in the GPU overlay"
    return found[0]


def prestop_sleep_s(container: dict) -> int:
    """The preStop sleep in seconds (0 without one)."""
    pre_stop = container.get("lifecycle", {}).get("preStop")
    if pre_stop is None:
        return 0
    if "sleep" in pre_stop:
        return int(pre_stop["sleep"]["seconds"])
    command = pre_stop["exec"]["command"]
    assert command[0] in ("sleep", "/bin/sleep"), f"preStop is not a sleep: {command}"
    return int(command[1])


def resolve_port(port: int | str, container: dict) -> int:
    if isinstance(port, int):
        return port
    named = {p["name"]: p["containerPort"] for p in container.get("ports", []) if "name" in p}
    assert port in named, f"probe port {port!r} is not a named container port"
    return named[port]


def cpu_cores(quantity: str | int) -> float:
    text = str(quantity)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def render_all(directory: Path) -> list[dict]:
    """Every object kustomize renders from ``directory``. Without kustomize or kubectl: skipped here,
    failed under CI (which installs kubectl)."""
    if shutil.which("kustomize"):
        command = ["kustomize", "build", str(directory)]
    elif shutil.which("kubectl"):
        command = ["kubectl", "kustomize", str(directory)]
    else:
        missing_component("neither kustomize nor kubectl installed: cannot render the kustomization")
    out = subprocess.run(command, check=True, capture_output=True, text=True, timeout=60).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def render(directory: Path) -> dict[str, dict]:
    """kustomize output by kind (one object of each)."""
    objects: dict[str, dict] = {}
    for doc in render_all(directory):
        assert doc["kind"] not in objects
        objects[doc["kind"]] = doc
    return objects


class Stage:
    def __init__(self, base: str, name: str | None) -> None:
        self.base, self.name = base, name
        self.instructions: list[tuple[str, str]] = []

    def last(self, keyword: str) -> str | None:
        values = [args for kw, args in self.instructions if kw == keyword]
        return values[-1] if values else None


def dockerfile_stages() -> list[Stage]:
    """Dockerfile instructions grouped by stage; continuation lines joined, comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in (REPO / "Dockerfile").read_text().splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or not stripped:
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    stages: list[Stage] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            words = args.split()
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
        elif stages:
            stages[-1].instructions.append((keyword, args.strip()))
    return stages


def stage(name: str) -> Stage:
    matches = [s for s in dockerfile_stages() if s.name == name]
    assert len(matches) == 1, f"no single stage named {name!r}"
    return matches[0]


def resolved_instruction(target: Stage, keyword: str) -> str | None:
    """An instruction as the image built from this stage sees it (inherited from parent stages)."""
    stages = {s.name: s for s in dockerfile_stages()}
    current: Stage | None = target
    while current is not None:
        value = current.last(keyword)
        if value is not None:
            return value
        current = stages.get(current.base)
    return None


def all_instructions(target: Stage, keyword: str) -> list[str]:
    """Every instance of an instruction in this stage and the stages it is built FROM."""
    stages = {s.name: s for s in dockerfile_stages()}
    found: list[str] = []
    current: Stage | None = target
    while current is not None:
        found = [args for kw, args in current.instructions if kw == keyword] + found
        current = stages.get(current.base)
    return found


def runtime_targets() -> list[Stage]:
    """The images one can run: the default (last) stage and --target gpu."""
    stages = dockerfile_stages()
    return [stages[-1], stage("gpu")]


def settings_classes():
    """The service's two settings types (server, model): every EFFNET_* variable is a field of one."""
    module = pytest.importorskip("service.core.settings")
    return module.ServerSettings, module.ModelSettings


COMPOSE_REPLICAS = ("effnet-1", "effnet-2")


def compose_services() -> dict[str, dict]:
    return load_yaml(REPO / "docker-compose.yml")["services"]


def haproxy_config() -> list[list[str]]:
    """deploy/haproxy/haproxy.cfg as lists of words per line (comments dropped)."""
    lines = []
    for raw in (REPO / "deploy" / "haproxy" / "haproxy.cfg").read_text().splitlines():
        words = raw.split("#", 1)[0].split()
        if words:
            lines.append(words)
    return lines


def haproxy_seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)(ms|s)?", value)
    assert match, value
    return int(match.group(1)) / (1000 if match.group(2) == "ms" else 1)


def haproxy_detection_s() -> float:
    """Worst case before HAProxy takes a replica whose /readyz turned 503 out: one ``inter`` until the
    first failed check, then ``fall - 1`` more checks ``fastinter`` apart, plus one ``timeout check``."""
    words = next(line for line in haproxy_config() if line[0] == "default-server")

    def param(name: str, default: str) -> str:
        return words[words.index(name) + 1] if name in words else default

    inter = haproxy_seconds(param("inter", "2s"))  # HAProxy's defaults: inter 2s, fall 3
    fastinter = haproxy_seconds(param("fastinter", param("inter", "2s")))
    timeout = haproxy_seconds(next((line[2] for line in haproxy_config() if line[:2] == ["timeout", "check"]), "0"))
    return inter + (int(param("fall", "3")) - 1) * fastinter + timeout
