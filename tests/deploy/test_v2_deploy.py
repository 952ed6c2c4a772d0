"""The Open Inference Protocol's deployment facts: the gRPC port is exposed wherever HTTP is (Deployment,
Service, NetworkPolicy, compose), and the KServe manifest runs this image as a V2 runtime whose ports,
probes and settings are the ones the service really uses. Its schema is checked against the kserve
package's models by scripts/validate_deploy.sh (scripts/validate_kserve.py); these tests hold it to the
service. Files only: no cluster.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from service.core.settings import ModelSettings, ServerSettings

REPO = Path(__file__).resolve().parents[2]
GRPC_PORT = ServerSettings.model_fields["grpc_port"].default
KSERVE = REPO / "k8s" / "optional" / "kserve-inferenceservice.yaml"


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def by_kind(path: Path) -> dict[str, dict]:
    return {d["kind"]: d for d in docs(path)}


def test_the_default_grpc_port_is_8001():
    assert GRPC_PORT == 8001  # the port Triton and KServe clients expect by convention


def test_deployment_service_and_network_policy_expose_grpc():
    deployment = docs(REPO / "k8s/base/deployment.yaml")[0]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["grpc"] == GRPC_PORT
    service = docs(REPO / "k8s/base/service.yaml")[0]
    grpc_port = next(p for p in service["spec"]["ports"] if p["name"] == "grpc")
    assert grpc_port["port"] == GRPC_PORT and grpc_port["targetPort"] == "grpc"
    assert grpc_port["appProtocol"] == "kubernetes.io/h2c"
    policy = docs(REPO / "k8s/base/networkpolicy.yaml")[0]
    allowed = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert GRPC_PORT in allowed


def test_compose_replicas_serve_grpc():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    for name in ("effnet-1", "effnet-2"):
        service = compose["services"][name]
        assert str(GRPC_PORT) in [str(p) for p in service.get("expose", [])], name
        assert str(service["environment"].get("EFFNET_GRPC_PORT", GRPC_PORT)) == str(GRPC_PORT)


def test_kserve_runtime_speaks_v2_on_the_service_ports():
    objects = by_kind(KSERVE)
    runtime, isvc = objects["ServingRuntime"], objects["InferenceService"]
    spec = runtime["spec"]
    assert {"v2", "grpc-v2"} <= set(spec["protocolVersions"])
    model = isvc["spec"]["predictor"]["model"]
    assert model["protocolVersion"] == "v2"
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in {f["name"] for f in spec["supportedModelFormats"]}
    (container,) = spec["containers"]
    assert container["name"] == "kserve-container"  # the name KServe looks for
    env = {e["name"]: e.get("value") for e in container["env"]}
    fields = {**ServerSettings.model_fields, **ModelSettings.model_fields}
    assert set(env) <= {f"EFFNET_{name.upper()}" for name in fields}, "unknown setting"
    values = {k.removeprefix("EFFNET_").lower(): v for k, v in env.items() if v is not None}
    ServerSettings(**{k: v for k, v in values.items() if k in ServerSettings.model_fields})
    ModelSettings(**{k: v for k, v in values.items() if k in ModelSettings.model_fields})
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http1": 8000, "h2c": int(env["EFFNET_GRPC_PORT"])}
    # The V2 model name in request paths is the served variant; the InferenceService carries that name.
    assert isvc["metadata"]["name"] == env["EFFNET_MODEL"]
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"


def test_kserve_probes_use_the_protocols_health_routes():
    container = by_kind(KSERVE)["ServingRuntime"]["spec"]["containers"][0]
    for probe in ("startupProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/v2/health/ready", "port": 8000}, probe
    # grpc.health.v1's "liveness" service: SERVING unless the service failed (service/v2/grpc_server.py).
    assert container["livenessProbe"]["grpc"] == {"port": 8001, "service": "liveness"}
    assert container["startupProbe"]["periodSeconds"] * container["startupProbe"]["failureThreshold"] >= 120


def test_kserve_pod_is_hardened_and_waits_for_the_drain():
    objects = by_kind(KSERVE)
    container = objects["ServingRuntime"]["spec"]["containers"][0]
    security = container["securityContext"]
    assert security["runAsNonRoot"] and security["readOnlyRootFilesystem"]
    assert not security["allowPrivilegeEscalation"] and security["capabilities"]["drop"] == ["ALL"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    budget = float(env["EFFNET_SHUTDOWN_DELAY_S"]) + float(env["EFFNET_SHUTDOWN_DRAIN_S"])
    assert objects["InferenceService"]["spec"]["predictor"]["terminationGracePeriodSeconds"] > budget
    base = docs(REPO / "k8s/base/deployment.yaml")[0]["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == base["image"]
