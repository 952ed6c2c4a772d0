"""A real Prometheus, run with the flag docker-compose.yml gives it (``--enable-feature=exemplar-storage``),
scrapes a tracing service with the project's scrape configuration and keeps the trace id of a sampled
request as the latency histogram's exemplar: what a Grafana latency panel links to the trace with."""

from __future__ import annotations

import httpx
import yaml

from tests.helpers.components import missing_component
from tests.helpers.prometheus import prometheus_binary, prometheus_server, wait_for
from tests.helpers.server import REPO, ServiceProcess

prometheus_binary()  # fails in CI, skips elsewhere, without it

try:
    import opentelemetry.proto  # noqa: F401
    import opentelemetry.sdk  # noqa: F401
except ImportError:
    missing_component("the OpenTelemetry SDK is not installed (the tracing extra, in the dev extras)")

from tests.helpers.otlp import OtlpReceiver  # noqa: E402 - needs opentelemetry-proto

TRACE_ID = "5d0c1f0e0a9b4c3d8e7f6a5b4c3d2e1f"


def compose_prometheus_flags() -> list[str]:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    return [flag for flag in compose["services"]["prometheus"]["command"] if flag.startswith("--enable-feature")]


def test_prometheus_keeps_the_trace_id_exemplar(photos, tmp_path):
    flags = compose_prometheus_flags()
    assert "--enable-feature=exemplar-storage" in flags
    with OtlpReceiver() as receiver, ServiceProcess({
        "EFFNET_MODEL": "efficientnet-lite0",
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }) as service:
        response = httpx.post(f"{service.url}/predict", content=photos["coffee.jpg"], timeout=30, headers={
            "Content-Type": "image/jpeg", "traceparent": f"00-{TRACE_ID}-00f067aa0ba902b7-01"})
        assert response.status_code == 200
        with prometheus_server(service.url, tmp_path, tuple(flags)) as api:
            with httpx.Client(timeout=5) as prom:
                def exemplars():
                    try:
                        answer = prom.get(f"{api}/query_exemplars", params={
                            "query": 'effnet_request_duration_seconds_bucket{endpoint="/predict"}',
                            "start": "0", "end": "9999999999"}).json()
                    except (httpx.TransportError, ValueError):
                        return None
                    return [e for series in answer.get("data") or [] for e in series["exemplars"]] or None

                found = wait_for(exemplars, 60, "an exemplar of the request latency")
                assert {e["labels"]["trace_id"] for e in found} == {TRACE_ID}
