"""Every way the project deploys the server runs it as several processes (``EFFNET_WORKERS`` > 1: one engine
process, N front-end workers, a supervisor as PID 1), sized to what the deployment gives it: the image's
default, the compose replicas (CPU, GPU, model repository), and each rendered kustomization (base, GPU,
model repository, tracing) and the KServe runtime. Where a CPU limit is declared the workers and their
threads fit it, with a core left for the engine process on a GPU; where a memory limit is declared the
processes' measured resident sizes fit it. Files only (tests/container runs the image and the compose stack).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.deploy.artefacts import K8S, REPO, cpu_cores, dockerfile_stages, load_docs, only_container, render_all
from tests.deploy.artefacts import stage as dockerfile_stage
from tests.deploy.test_deploy_models import make_settings, merged_compose

# Resident sizes (MiB) measured with `ps -o rss` / VmHWM on a local run of the CPU settings (Lite0,
# onnxruntime, EFFNET_WORKERS=2 and 3, 15 s of load on 2 CPUs; docs/deployment.md, "Several workers in a
# container"): supervisor 71 + multiprocessing's resource tracker 13; engine process 765-835 (peak); each
# worker 72-87 (peak). Rounded up, with a budget for a worker's request bodies and the tracing SDK.
SUPERVISOR_MIB = 100
WORKER_MIB = 150
ENGINE_MIB = {"cpu": 900, "cuda": 4096}  # CUDA: torch's CUDA libraries and context; gpu_check.sh reports it
EXTRA_MODEL_MIB = 400  # a further model in the engine process (Lite2: +330, docs/benchmarks.md)
HEADROOM = 1.25  # in-flight batches, allocator slack


@dataclass(frozen=True)
class Deployment:
    """What one deployment gives the server: its EFFNET_* settings, and the CPU (cores) and memory (MiB)
    limits of its container where it declares them."""

    settings: dict[str, str]
    cpu: float | None = None
    memory_mib: float | None = None
    models: int = 1

    @property
    def on_gpu(self) -> bool:
        return self.settings.get("EFFNET_DEVICE", "").startswith("cuda")


def mebibytes(quantity: str | int) -> float:
    """A Kubernetes memory quantity (2Gi, 512Mi, 1G, bytes) in MiB."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]i?)?", str(quantity))
    assert match, quantity
    number, unit = float(match.group(1)), match.group(2) or ""
    factor = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
              "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}[unit]
    return number * factor / 2**20


def dockerfile_env(target: str) -> dict[str, str]:
    """The EFFNET_* ENV of a runtime target, its parent stages' included."""
    env: dict[str, str] = {}
    names = {s.name for s in dockerfile_stages()}
    stages = [dockerfile_stage(target)]
    while stages[-1].base in names:
        stages.append(dockerfile_stage(stages[-1].base))
    for one in reversed(stages):
        for keyword, args in one.instructions:
            if keyword == "ENV":
                env.update(dict(re.findall(r"(EFFNET_\w+)=(\S+)", args)))
    return env


def rendered(overlay: Path) -> Deployment:
    """The Deployment's container as kustomize renders it: its settings ConfigMap plus its own env values."""
    docs = render_all(overlay)
    container = only_container(next(d for d in docs if d["kind"] == "Deployment"))
    configs = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"}
    settings: dict[str, str] = {}
    for source in container.get("envFrom", []):
        settings.update(configs[source["configMapRef"]["name"]])
    settings.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    limits = container["resources"]["limits"]
    models = 1
    if "EFFNET_MODEL_REPOSITORY" in settings:  # one model per projected model.toml
        volumes = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["volumes"]
        models = sum(len(v["configMap"].get("items", [])) for v in volumes if "configMap" in v)
    return Deployment(settings, cpu_cores(limits["cpu"]), mebibytes(limits["memory"]), models)


def kserve() -> Deployment:
    runtime = next(d for d in load_docs(K8S / "optional" / "kserve-inferenceservice.yaml")
                   if d["kind"] == "ServingRuntime")
    (container,) = runtime["spec"]["containers"]
    settings = {e["name"]: str(e["value"]) for e in container["env"] if "value" in e}
    limits = container["resources"]["limits"]
    return Deployment(settings, cpu_cores(limits["cpu"]), mebibytes(limits["memory"]))


def compose(*files: str) -> Deployment:
    services = merged_compose(*files)["services"]
    replicas = [services["effnet-1"], services["effnet-2"]]
    assert replicas[0]["environment"] == replicas[1]["environment"], "both replicas alike"
    limits = replicas[0].get("deploy", {}).get("resources", {}).get("limits", {})
    cpus = limits.get("cpus", replicas[0].get("cpus"))
    memory = limits.get("memory", replicas[0].get("mem_limit"))
    return Deployment({k: str(v) for k, v in replicas[0]["environment"].items() if v is not None},
                      float(cpus) if cpus else None, float(memory) / 2**20 if memory else None)


DEPLOYMENTS = {
    "image (cpu)": lambda: Deployment(dockerfile_env("cpu")),
    "image (gpu)": lambda: Deployment(dockerfile_env("gpu")),
    "compose": lambda: compose("docker-compose.yml"),
    "compose + gpu": lambda: compose("docker-compose.yml", "docker-compose.gpu.yml"),
    "compose + models": lambda: compose("docker-compose.yml", "docker-compose.models.yml"),
    "k8s base": lambda: rendered(K8S / "base"),
    "k8s gpu": lambda: rendered(K8S / "overlays" / "gpu"),
    "k8s model-repository": lambda: rendered(K8S / "overlays" / "model-repository"),
    "k8s tracing": lambda: rendered(K8S / "overlays" / "tracing"),
    "kserve runtime": kserve,
}
LIMITED = [name for name in DEPLOYMENTS if name.startswith(("k8s", "kserve"))]


def test_every_kustomization_is_checked():
    """A new overlay joins the table above (and so the checks below)."""
    overlays = {p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").exists()}
    assert {f"k8s {name}" for name in overlays} | {"k8s base"} == {n for n in DEPLOYMENTS if n.startswith("k8s")}


@pytest.mark.parametrize("name", list(DEPLOYMENTS))
def test_runs_several_workers_with_a_valid_count(name, monkeypatch):
    """EFFNET_WORKERS is written out (the service's default is one process), the server's settings accept
    it, and it is a number: ``auto`` counts the CPUs of the affinity mask, which neither a container's
    --cpus nor a Kubernetes CPU limit (a CFS quota) narrows, so on a large node it would start dozens."""
    deployment = DEPLOYMENTS[name]()
    assert "EFFNET_WORKERS" in deployment.settings, f"{name}: EFFNET_WORKERS not set"
    value = deployment.settings["EFFNET_WORKERS"]
    assert value.isdigit(), f"{name}: EFFNET_WORKERS={value!r}: give a number sized to the CPUs"
    settings = make_settings({k: v for k, v in deployment.settings.items() if k.startswith("EFFNET_")}, monkeypatch)
    assert settings.effective_workers == int(value) > 1, (name, value)


@pytest.mark.parametrize("name", LIMITED)
def test_workers_and_threads_fit_the_cpu_limit(name):
    """Under a CPU limit: no more workers than cores; on a GPU a core stays for the engine process (it
    batches, copies pixels to the GPU and launches the model), so workers + 1 fit. Each worker's decoding
    threads are set (unset, a worker takes the node's cores // workers) and all of them together fit the
    same cores; the engine's inference threads fit the limit."""
    deployment = DEPLOYMENTS[name]()
    assert deployment.cpu is not None, f"{name}: no CPU limit"
    settings = deployment.settings
    workers = int(settings["EFFNET_WORKERS"])
    front_end_cores = deployment.cpu - 1 if deployment.on_gpu else deployment.cpu
    assert workers <= front_end_cores, (name, workers, deployment.cpu)
    assert "EFFNET_DECODE_THREADS" in settings and "EFFNET_NUM_THREADS" in settings, name
    assert workers * int(settings["EFFNET_DECODE_THREADS"]) <= front_end_cores, (name, settings)
    assert int(settings["EFFNET_NUM_THREADS"]) <= deployment.cpu, (name, settings)


@pytest.mark.parametrize("name", LIMITED)
def test_memory_limit_holds_the_engine_and_every_worker(name):
    """The measured resident sizes (SUPERVISOR_MIB, ENGINE_MIB, WORKER_MIB above), with HEADROOM, fit the
    memory limit: a worker more, or a model more, must come with more memory."""
    deployment = DEPLOYMENTS[name]()
    assert deployment.memory_mib is not None, f"{name}: no memory limit"
    workers = int(deployment.settings["EFFNET_WORKERS"])
    engine = ENGINE_MIB["cuda" if deployment.on_gpu else "cpu"] + (deployment.models - 1) * EXTRA_MODEL_MIB
    needed = math.ceil((SUPERVISOR_MIB + engine + workers * WORKER_MIB) * HEADROOM)
    assert needed <= deployment.memory_mib, (name, f"{needed} MiB needed, {deployment.memory_mib:.0f} MiB given")


def test_compose_replicas_sharing_a_host_stay_within_it():
    """Compose declares no CPU limit: its replicas share the host. Two replicas' workers and engines on the
    GPU override stay within a 16-CPU host (the GPU machine the device check runs on), the CPU stack's
    within a small one's 8."""
    for files, host_cpus in ((("docker-compose.yml",), 8), (("docker-compose.yml", "docker-compose.gpu.yml"), 16)):
        deployment = compose(*files)
        assert deployment.cpu is None, "a CPU limit in compose: check the workers against it here"
        assert 2 * (int(deployment.settings["EFFNET_WORKERS"]) + 1) <= host_cpus, (files, deployment.settings)


def test_the_image_default_matches_the_docs():
    """The image's own default, quoted where the README and docs/deployment.md explain it."""
    value = dockerfile_env("cpu")["EFFNET_WORKERS"]
    for doc in (REPO / "docs" / "deployment.md", REPO / "README.md"):
        assert f"EFFNET_WORKERS={value}" in doc.read_text(), doc.name
