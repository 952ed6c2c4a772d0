"""Tracing in-process (the SDK's in-memory exporter): span tree, links, errors, exemplars, and nothing when off.

The same paths against a real OTLP receiver and real server processes: tests/integration/test_tracing.py.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from fastapi.testclient import TestClient

from service.core import tracing
from service.core.access import AccessRecord
from tests.helpers.components import missing_component
from tests.helpers.fakes import FakeEngine, app_with_engine, fake_model

try:
    from opentelemetry.sdk import trace as sdk_trace
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
except ImportError:
    missing_component("the OpenTelemetry SDK is not installed (the tracing extra, in the dev extras)")

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


@pytest.fixture()
def spans():
    """Tracing on for this test, into memory; off again afterwards."""
    exporter = InMemorySpanExporter()
    provider = sdk_trace.TracerProvider(sampler=tracing._LinkedSampler(ParentBased(TraceIdRatioBased(1.0))))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider)
    yield exporter
    tracing.reset()
    provider.shutdown()


def wait_ready(client: TestClient) -> None:
    deadline = time.monotonic() + 10
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.01)


def by_name(exporter: InMemorySpanExporter, name: str) -> list:
    return [s for s in exporter.get_finished_spans() if s.name == name]


def test_a_request_joins_the_callers_trace_with_decode_queue_and_a_linked_batch(spans, jpeg):
    with TestClient(app_with_engine(FakeEngine())) as client:
        wait_ready(client)
        response = client.post(
            "/predict",
            files=[("file", ("a.jpg", jpeg, "image/jpeg")), ("file", ("b.jpg", jpeg, "image/jpeg"))],
            headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01", "tracestate": "vendor=x"},
        )
    assert response.status_code == 200
    (server,) = by_name(spans, "POST /predict")
    assert format(server.context.trace_id, "032x") == TRACE_ID
    assert format(server.parent.span_id, "016x") == PARENT_ID and server.parent.is_remote
    assert server.context.trace_state.get("vendor") == "x"
    assert server.attributes["http.route"] == "/predict"
    assert server.attributes["http.response.status_code"] == 200
    assert server.attributes["effnet.model"] == "efficientnet-lite0"
    assert server.attributes["effnet.images"] == 2
    assert server.attributes["effnet.request_id"] == response.headers["x-request-id"]
    assert response.headers["traceresponse"] == f"00-{TRACE_ID}-{server.context.span_id:016x}-01"
    decodes = by_name(spans, "decode")
    assert sorted(d.attributes["effnet.image_index"] for d in decodes) == [0, 1]
    (queue,) = by_name(spans, "queue")
    for child in [*decodes, queue]:
        assert child.parent.span_id == server.context.span_id
        assert child.context.trace_id == server.context.trace_id
    (batch,) = by_name(spans, "batch")
    assert batch.parent is None and batch.context.trace_id != server.context.trace_id
    assert [link.context.span_id for link in batch.links] == [server.context.span_id]
    assert batch.attributes["effnet.batch.size"] == 2
    assert batch.attributes["effnet.engine"] == "fake"
    assert batch.attributes["effnet.device"] == "cpu" and batch.attributes["effnet.dtype"] == "float32"
    # Probes are not traced.
    assert not [s for s in spans.get_finished_spans() if s.name.startswith("GET")]


def test_two_requests_in_one_batch_are_both_linked_from_its_span(spans, jpeg):
    engine = FakeEngine(hold=True)
    with TestClient(app_with_engine(engine, max_batch_delay_ms=200, max_batch_size=8)) as client:
        engine.gate.set()
        wait_ready(client)
        engine.gate.clear()
        engine.batch_running.clear()  # set by the warm-up
        results = {}

        def send(name: str, trace_id: str) -> None:
            results[name] = client.post("/predict", content=jpeg, headers={
                "content-type": "image/jpeg", "traceparent": f"00-{trace_id}-{PARENT_ID}-01"})

        # The first request's batch holds the engine; the next two queue up together behind it.
        first = threading.Thread(target=send, args=("first", "1" * 32))
        first.start()
        assert engine.batch_running.wait(10)
        others = [threading.Thread(target=send, args=(n, t)) for n, t in (("a", "a" * 32), ("b", "b" * 32))]
        for thread in others:
            thread.start()
        deadline = time.monotonic() + 10
        while len(client.app.state.models.get().batcher._queue) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        engine.gate.set()
        for thread in [first, *others]:
            thread.join(10)
    assert all(r.status_code == 200 for r in results.values())
    servers = {format(s.context.trace_id, "032x"): s for s in by_name(spans, "POST /predict")}
    shared = [b for b in by_name(spans, "batch") if b.attributes["effnet.batch.size"] == 2]
    assert len(shared) == 1
    linked = {link.context.span_id for link in shared[0].links}
    assert linked == {servers["a" * 32].context.span_id, servers["b" * 32].context.span_id}


def test_a_sampled_out_caller_is_respected(spans, jpeg):
    with TestClient(app_with_engine(FakeEngine())) as client:
        wait_ready(client)
        response = client.post("/predict", content=jpeg, headers={
            "content-type": "image/jpeg", "traceparent": f"00-{TRACE_ID}-{PARENT_ID}-00"})
    assert response.status_code == 200
    assert spans.get_finished_spans() == ()
    assert response.headers["traceresponse"].startswith(f"00-{TRACE_ID}-")
    assert response.headers["traceresponse"].endswith("-00")


def test_errors_carry_the_service_error_code(spans, jpeg):
    engine = FakeEngine(fail_if=lambda batch: True)
    with TestClient(app_with_engine(engine, warmup=False)) as client:
        wait_ready(client)
        bad = client.post("/predict", files=[("file", ("ok.jpg", jpeg, "image/jpeg")),
                                             ("file", ("bad.jpg", b"not an image", "image/jpeg"))])
        failed = client.post("/predict", content=jpeg, headers={"content-type": "image/jpeg"})
    assert bad.status_code == 400 and failed.status_code == 500
    first, second = by_name(spans, "POST /predict")
    assert first.attributes["error.type"] == bad.json()["error"]["code"] == "invalid_image"
    assert first.attributes["effnet.image_index"] == 1
    assert first.status.status_code.name == "UNSET"  # a client's mistake is not the server's error
    (failed_decode,) = [d for d in by_name(spans, "decode") if d.attributes.get("error.type")]
    assert failed_decode.attributes["effnet.image_index"] == 1
    assert second.attributes["error.type"] == failed.json()["error"]["code"] == "inference_failed"
    assert second.status.status_code.name == "ERROR"
    (batch,) = by_name(spans, "batch")
    assert batch.status.status_code.name == "ERROR"


def test_the_access_log_and_the_latency_exemplar_carry_the_trace_id(spans, jpeg, caplog):
    with TestClient(app_with_engine(FakeEngine())) as client:
        wait_ready(client)
        with caplog.at_level("INFO", logger="service.access"):
            client.post("/predict", content=jpeg, headers={
                "content-type": "image/jpeg", "traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"})
        openmetrics = client.get("/metrics", headers={"accept": "application/openmetrics-text; version=1.0.0"})
        plain = client.get("/metrics")
    (line,) = [r for r in caplog.records if getattr(r, "path", None) == "/predict"]
    assert line.trace_id == TRACE_ID
    assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
    assert f'# {{trace_id="{TRACE_ID}"}}' in openmetrics.text
    assert openmetrics.text.rstrip().endswith("# EOF")
    assert plain.headers["content-type"].startswith("text/plain") and "trace_id" not in plain.text


def test_nothing_is_traced_or_logged_when_off(jpeg, caplog):
    tracing.reset()
    assert tracing.setup({}) is None
    with TestClient(app_with_engine(FakeEngine())) as client:
        wait_ready(client)
        with caplog.at_level("INFO", logger="service.access"):
            response = client.post("/predict", content=jpeg, headers={
                "content-type": "image/jpeg", "traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"})
    assert response.status_code == 200 and "traceresponse" not in response.headers
    (line,) = [r for r in caplog.records if getattr(r, "path", None) == "/predict"]
    assert getattr(line, "trace_id", None) is None
    tracing.reset()


@pytest.mark.parametrize(
    ("env", "on"),
    [
        ({}, False),
        ({"OTEL_TRACES_EXPORTER": "none"}, False),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "OTEL_SDK_DISABLED": "true"}, False),
    ],
)
def test_tracing_is_off_unless_the_environment_asks(env, on):
    assert tracing.wanted(env) is on


def test_an_unknown_exporter_or_protocol_is_a_startup_error():
    from service.core.errors import StartupError

    for env in ({"OTEL_TRACES_EXPORTER": "zipkin"},
                {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}):
        tracing.reset()
        with pytest.raises(StartupError, match="OTEL_"):
            tracing.setup(env)
    tracing.reset()


def test_the_resource_names_the_service_unless_otel_service_name_does(monkeypatch):
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test")
    provider = tracing._make_provider({"OTEL_TRACES_EXPORTER": "console"})
    assert provider.resource.attributes["service.name"] == "effnet-serve"
    assert provider.resource.attributes["deployment.environment"] == "test"
    monkeypatch.setenv("OTEL_SERVICE_NAME", "classifier")
    provider = tracing._make_provider({"OTEL_TRACES_EXPORTER": "console"})
    assert provider.resource.attributes["service.name"] == "classifier"


def test_the_batch_command_runs_as_one_trace_with_a_span_per_image(spans, jpeg):
    from service.cli.local import LocalRunner
    from service.core.registry import Startup
    from service.core.settings import ModelSettings, ServerSettings

    runner = LocalRunner(ServerSettings(), ModelSettings(warmup=False), "predict",
                         startup=Startup(None, [fake_model(FakeEngine(), warmup=False)]))

    async def main() -> None:
        await runner.start()
        try:
            await asyncio.gather(*(runner.run(f"photo{i}.jpg", jpeg) for i in range(3)),
                                 runner.run("bad.jpg", b"nope"))
        finally:
            await runner.close()

    asyncio.run(main())
    (run,) = by_name(spans, "efficientnet-batch predict")
    images = by_name(spans, "efficientnet-batch image")
    assert sorted(s.attributes["effnet.file"] for s in images) == ["bad.jpg", "photo0.jpg", "photo1.jpg",
                                                                     "photo2.jpg"]
    assert all(s.parent.span_id == run.context.span_id for s in images)
    assert all(s.context.trace_id == run.context.trace_id for s in images)
    (bad,) = [s for s in images if s.attributes["effnet.file"] == "bad.jpg"]
    assert bad.attributes["error.type"] == "invalid_image"
    linked = {link.context.span_id for b in by_name(spans, "batch") for link in b.links}
    assert linked == {s.context.span_id for s in images if s is not bad}


def test_access_record_without_tracing_costs_no_span():
    record = AccessRecord("POST", "/predict")
    record.start_trace("POST", "server", {}, carrier={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"})
    assert record.trace is None and record.trace_id is None


WITHOUT_SDK = """
import importlib.abc, io, sys
from PIL import Image

class NoSdk(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.startswith(("opentelemetry.sdk", "opentelemetry.exporter")):
            raise ModuleNotFoundError(f"No module named '{name}'")

sys.meta_path.insert(0, NoSdk())
from fastapi.testclient import TestClient
from service.core import tracing
from service.core.errors import StartupError
from tests.helpers.fakes import FakeEngine, app_with_engine

buffer = io.BytesIO()
Image.new("RGB", (32, 32)).save(buffer, format="JPEG")
with TestClient(app_with_engine(FakeEngine(), warmup=False)) as client:
    response = client.post("/predict", content=buffer.getvalue(), headers={"content-type": "image/jpeg"})
    print("predict", response.status_code)
print("sdk imported", any(name.startswith("opentelemetry.sdk") for name in sys.modules))
tracing.reset()
try:
    tracing.setup({"OTEL_TRACES_EXPORTER": "otlp"})
except StartupError as exc:
    print("asked:", exc)
"""


def test_the_service_runs_without_the_sdk_while_tracing_is_off():
    import os
    import subprocess
    import sys

    from tests.helpers.server import REPO

    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "EFFNET_"))}
    env["PYTHONPATH"] = str(REPO)
    out = subprocess.run([sys.executable, "-c", WITHOUT_SDK], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "predict 200" in lines and "sdk imported False" in lines
    (asked,) = [line for line in lines if line.startswith("asked:")]
    assert "pip install 'effnet-serve[tracing]'" in asked


@pytest.mark.parametrize("header", ["garbage", f"00-{'0' * 32}-{PARENT_ID}-01", f"00-{TRACE_ID}-{PARENT_ID}-01\r\nx: y",
                                    f"ff-{TRACE_ID}-{PARENT_ID}-01"])
def test_a_malformed_traceparent_starts_a_new_trace(spans, jpeg, header):
    with TestClient(app_with_engine(FakeEngine(), warmup=False)) as client:
        response = client.post("/predict", content=jpeg, headers={"content-type": "image/jpeg",
                                                                   "traceparent": header.replace("\r\n", " ")})
    assert response.status_code == 200
    (server,) = by_name(spans, "POST /predict")
    assert server.parent is None  # a root of its own, never a forged or invalid parent
    assert format(server.context.trace_id, "032x") != "0" * 32
