"""The Kubernetes manifests (kustomize base and the GPU overlay) hold what running the service needs: a
grace period that lets the lame duck and the drain finish, probes on the right paths and port, the
restricted hardening, autoscaling that keeps a replica serving, and a GPU overlay that really asks for a GPU.
They parse files (and render with kustomize where installed); no cluster."""

from __future__ import annotations

import json
import re

import pytest

from tests.deploy.artefacts import (
    APP_UID,
    BASE,
    GPU,
    K8S,
    PORT,
    all_instructions,
    base_objects,
    base_settings,
    cpu_cores,
    dockerfile_stages,
    gpu_patch,
    gpu_settings,
    load_yaml,
    only_container,
    prestop_sleep_s,
    render,
    resolve_port,
    resolved_instruction,
    runtime_targets,
    settings_classes,
)


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
    grpc_port = settings_classes()[0].model_fields["grpc_port"].default
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
