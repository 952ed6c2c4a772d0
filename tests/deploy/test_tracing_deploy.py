"""Tracing in the deployment files: compose's optional backend (profile "tracing"), the replicas' OTEL_*
variables, the Kubernetes overlay (variables and the one egress it opens), and the image's extra.
Statically: no container can be run here (scripts/validate_deploy.sh checks the files are well formed)."""

from __future__ import annotations

import pytest

from service.core import tracing
from tests.deploy.artefacts import REPO, dockerfile_stages, load_yaml, read_env_file, render

# The variables the service (its OpenTelemetry SDK set-up) reads.
OTEL_VARIABLES = {
    "OTEL_SDK_DISABLED", "OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_HEADERS",
    "OTEL_EXPORTER_OTLP_TIMEOUT", "OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES", "OTEL_TRACES_SAMPLER",
    "OTEL_TRACES_SAMPLER_ARG",
}
OVERLAY = REPO / "k8s" / "overlays" / "tracing"


def compose() -> dict:
    return load_yaml(REPO / "docker-compose.yml")["services"]


def test_compose_backend_is_optional_and_receives_otlp():
    services = compose()
    jaeger = services["jaeger"]
    assert jaeger["profiles"] == ["tracing"]  # not started by a plain `docker compose up`
    assert {"4317", "4318"} <= {str(p) for p in jaeger["expose"]}
    assert any("otlp.protocols.http.endpoint=0.0.0.0:4318" in arg for arg in jaeger["command"])
    assert jaeger["read_only"] is True and jaeger["cap_drop"] == ["ALL"]
    assert all(p.startswith("127.0.0.1:") for p in jaeger["ports"])
    assert not any("jaeger" in str(s.get("depends_on", [])) for s in services.values())


@pytest.mark.parametrize("replica", ["effnet-1", "effnet-2"])
def test_compose_replicas_trace_only_when_the_endpoint_is_given(replica):
    env = compose()[replica]["environment"]
    otel = {k: v for k, v in env.items() if k.startswith("OTEL_")}
    assert set(otel) <= OTEL_VARIABLES
    # Interpolated from the shell, empty by default: tracing stays off in a plain `docker compose up`.
    assert otel["OTEL_EXPORTER_OTLP_ENDPOINT"] == "${OTEL_EXPORTER_OTLP_ENDPOINT:-}"
    assert not tracing.wanted({k: v for k, v in otel.items() if "${" not in str(v)})
    assert tracing.wanted({**otel, "OTEL_EXPORTER_OTLP_ENDPOINT": "http://jaeger:4318"})


def test_prometheus_keeps_exemplars_and_grafana_links_them_to_jaeger():
    assert "--enable-feature=exemplar-storage" in compose()["prometheus"]["command"]
    sources = REPO / "deploy" / "grafana" / "provisioning" / "datasources"
    prometheus = load_yaml(sources / "prometheus.yml")["datasources"][0]
    jaeger = load_yaml(sources / "jaeger.yml")["datasources"][0]
    (link,) = prometheus["jsonData"]["exemplarTraceIdDestinations"]
    assert link == {"name": "trace_id", "datasourceUid": jaeger["uid"]}
    assert jaeger["url"] == "http://jaeger:16686"


def test_kubernetes_overlay_sets_the_variables_and_opens_only_otlp_and_dns():
    env = read_env_file(OVERLAY / "tracing.env")
    assert set(env) <= OTEL_VARIABLES and tracing.wanted(env)
    assert env["OTEL_TRACES_SAMPLER"].startswith("parentbased_")
    objects = render(OVERLAY)
    config = objects["ConfigMap"]["data"]
    assert {k: v for k, v in config.items() if k.startswith("OTEL_")} == env
    assert "EFFNET_MODEL" in config  # merged into the base's settings, not replacing them
    egress = objects["NetworkPolicy"]["spec"]["egress"]
    ports = sorted((p["protocol"], p["port"]) for rule in egress for p in rule["ports"])
    assert ports == [("TCP", 53), ("TCP", 4318), ("UDP", 53)]
    assert all(rule.get("to") for rule in egress)  # never "anywhere"


def test_image_carries_the_tracing_extra():
    for stage in dockerfile_stages():
        extras = [args for keyword, args in stage.instructions if keyword == "ARG" and "EFFNET_EXTRAS" in args]
        for arg in extras:
            assert "tracing" in arg.split("=", 1)[1].split(","), arg
