"""Tracing in-process (the SDK's in-memory exporter): span tree, links, errors, exemplars, and nothing when off;
a request's stages as events (the default) or spans (EFFNET_TRACE_DETAIL=spans); the export queue that drops
and counts rather than waits; the OTLP encoding against the SDK's.

The same paths against a real OTLP receiver and real server processes: tests/integration/test_tracing.py.
"""

from __future__ import annotations

import asyncio
import json
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


def traced(detail: str = "events"):
    """Tracing on, into memory, with the request's stages as ``detail`` says; off again afterwards."""
    exporter = InMemorySpanExporter()
    provider = sdk_trace.TracerProvider(sampler=tracing._LinkedSampler(ParentBased(TraceIdRatioBased(1.0))))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider, detail=detail)
    yield exporter
    tracing.reset()
    provider.shutdown()


@pytest.fixture()
def spans():
    """Tracing on for this test (the default detail: stages as events)."""
    yield from traced()


@pytest.fixture(params=["events", "spans"])
def detail_spans(request):
    """Tracing on for this test, once with each EFFNET_TRACE_DETAIL; the exporter knows which (``.detail``)."""
    for exporter in traced(request.param):
        exporter.detail = request.param
        yield exporter


def stages(exporter: InMemorySpanExporter, server, name: str) -> list[dict]:
    """The request's ``name`` stages (decode, queue) as the detail made them (child spans of ``server``'s
    span, or events of it): each one's attributes, start and end (an event: its timestamp and its
    ``effnet.duration_s`` later)."""
    found = []
    if exporter.detail == "spans":
        assert not [e for e in server.events if e.name == name]
        for child in by_name(exporter, name):
            if child.parent is not None and child.parent.span_id == server.context.span_id:
                assert child.context.trace_id == server.context.trace_id
                found.append({**child.attributes, "start": child.start_time, "end": child.end_time})
    else:
        assert not by_name(exporter, name), f"{name} spans made with detail=events"
        for event in server.events:
            if event.name == name:
                duration = event.attributes["effnet.duration_s"]
                assert duration >= 0
                found.append({**event.attributes, "start": event.timestamp,
                              "end": event.timestamp + int(duration * 1e9)})
    for stage in found:
        assert server.start_time <= stage["start"] <= stage["end"] <= server.end_time
    return found


def wait_ready(client: TestClient) -> None:
    deadline = time.monotonic() + 10
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.01)


def by_name(exporter: InMemorySpanExporter, name: str) -> list:
    return [s for s in exporter.get_finished_spans() if s.name == name]


def test_a_request_joins_the_callers_trace_with_decode_queue_and_a_linked_batch(detail_spans, jpeg):
    spans = detail_spans
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
    decodes = stages(spans, server, "decode")
    assert sorted(d["effnet.image_index"] for d in decodes) == [0, 1]
    assert all(d["effnet.image_bytes"] == len(jpeg) for d in decodes)
    (queue,) = stages(spans, server, "queue")
    assert queue["effnet.images"] == 2
    assert queue["start"] >= min(d["end"] for d in decodes)  # queued once decoded
    (batch,) = by_name(spans, "batch")
    assert batch.parent is None and batch.context.trace_id != server.context.trace_id
    assert [link.context.span_id for link in batch.links] == [server.context.span_id]
    assert batch.attributes["effnet.batch.size"] == 2
    assert batch.attributes["effnet.engine"] == "fake"
    assert batch.attributes["effnet.device"] == "cpu" and batch.attributes["effnet.dtype"] == "float32"
    # Probes are not traced; with detail=events a request is one span, and its batch one more.
    assert not [s for s in spans.get_finished_spans() if s.name.startswith("GET")]
    if spans.detail == "events":
        assert sorted(s.name for s in spans.get_finished_spans()) == ["POST /predict", "batch"]


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


def test_errors_carry_the_service_error_code(detail_spans, jpeg):
    spans = detail_spans
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
    (failed_decode,) = [d for d in stages(spans, first, "decode") if d.get("error.type")]
    assert failed_decode["effnet.image_index"] == 1 and failed_decode["error.type"] == "invalid_image"
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


@pytest.mark.slow  # kept out of `make test-fast`, which must stay under a minute
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


# -- the export queue: drops and counts, never waits ----------------------------------------------------------------


class BlockedExporter:
    """An exporter that cannot keep up: its first export waits until the test lets it go."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.exporting = threading.Event()
        self.received = 0

    def export(self, batch):
        from opentelemetry.sdk.trace.export import SpanExportResult

        self.received += len(batch)
        self.exporting.set()
        self.release.wait(30)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 0) -> bool:
        return True


def dropped_metric(text: str, reason: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    (value,) = [s.value for f in text_string_to_metric_families(text) for s in f.samples
                if s.name == "effnet_trace_spans_dropped_total" and s.labels == {"reason": reason}]
    return value


def test_an_exporter_that_cannot_keep_up_drops_spans_counts_them_and_holds_up_no_request(jpeg):
    from service.core.trace_export import SpanQueue

    blocked = BlockedExporter()
    queue = SpanQueue(blocked, max_queue=4, max_batch=2, delay_s=3600, on_drop=tracing.count_dropped)
    every = InMemorySpanExporter()  # every span that ended, whatever the queue did with it
    provider = sdk_trace.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(every))
    provider.add_span_processor(queue)
    tracing.install(provider)
    before = tracing.spans_dropped()
    try:
        with TestClient(app_with_engine(FakeEngine(), warmup=False)) as client:
            wait_ready(client)
            # The exporter holds its first batch for the whole test: every request below is answered while
            # nothing can be exported, so none of them waits for the exporter.
            statuses = [client.post("/predict", content=jpeg, headers={"content-type": "image/jpeg"}).status_code
                        for _ in range(12)]
            assert blocked.exporting.wait(10)
            metrics = client.get("/metrics").text
        assert statuses == [200] * 12
        dropped = tracing.spans_dropped()["queue_full"] - before["queue_full"]
        ended = len(every.get_finished_spans())  # 12 request spans and 12 batch spans
        assert ended == 24
        # Each span is in the export that waits, in the queue (full), or dropped and counted.
        assert blocked.received + len(queue._queue) + dropped == ended
        assert len(queue._queue) == 4 and dropped >= ended - 4 - 4
        assert dropped_metric(metrics, "queue_full") == tracing.spans_dropped()["queue_full"]
    finally:
        blocked.release.set()
        tracing.reset()
        provider.shutdown()


def test_spans_of_a_failed_export_are_counted_as_dropped():
    from opentelemetry.sdk.trace.export import SpanExportResult

    from service.core.trace_export import SpanQueue

    class Refusing(BlockedExporter):
        def export(self, batch):
            self.received += len(batch)
            return SpanExportResult.FAILURE

    refusing = Refusing()
    queue = SpanQueue(refusing, max_queue=100, max_batch=100, delay_s=3600, on_drop=tracing.count_dropped)
    provider = sdk_trace.TracerProvider()
    provider.add_span_processor(queue)
    before = tracing.spans_dropped()
    for i in range(5):
        provider.get_tracer("t").start_span(f"s{i}").end()
    assert queue.force_flush(5000)
    assert refusing.received == 5
    assert tracing.spans_dropped()["export_failed"] - before["export_failed"] == 5
    provider.shutdown()


def test_a_worker_reports_its_drops_once_and_the_engine_counts_them():
    tracing.take_dropped()  # what earlier tests dropped was reported
    assert tracing.take_dropped() is None
    tracing.count_dropped("queue_full", 3)
    assert tracing.take_dropped() == {"queue_full": 3}
    assert tracing.take_dropped() is None
    before = tracing.spans_dropped()
    tracing.count_reported({"queue_full": 2, "export_failed": 1, "made_up": 7, "export_failed ": -1})
    after = tracing.spans_dropped()
    assert after == {"queue_full": before["queue_full"] + 2, "export_failed": before["export_failed"] + 1}


# -- settings: OTEL_BSP_* and EFFNET_TRACE_DETAIL ------------------------------------------------------------------


def test_the_export_queue_takes_the_operators_otel_bsp_values_over_its_defaults():
    from service.core.errors import StartupError
    from service.core.trace_export import SpanQueue

    env = {"OTEL_TRACES_EXPORTER": "console"}
    (queue,) = tracing._make_provider(env)._active_span_processor._span_processors
    assert isinstance(queue, SpanQueue)
    assert (queue.max_queue, queue.max_batch, queue.delay_s) == (2048, 512, 5.0)
    queue.shutdown()
    env.update(OTEL_BSP_MAX_QUEUE_SIZE="100", OTEL_BSP_MAX_EXPORT_BATCH_SIZE="10", OTEL_BSP_SCHEDULE_DELAY="250")
    (queue,) = tracing._make_provider(env)._active_span_processor._span_processors
    assert (queue.max_queue, queue.max_batch, queue.delay_s) == (100, 10, 0.25)
    queue.shutdown()
    for bad in ({"OTEL_BSP_MAX_QUEUE_SIZE": "lots"}, {"OTEL_BSP_MAX_QUEUE_SIZE": "0"},
                {"OTEL_BSP_MAX_QUEUE_SIZE": "10", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "20"}):
        with pytest.raises(StartupError, match="OTEL_BSP_"):
            tracing._make_provider({**env, **bad})


def test_trace_detail_is_a_server_setting_with_two_values(monkeypatch):
    from pydantic import ValidationError

    from service.core.errors import StartupError
    from service.core.settings import ServerSettings

    monkeypatch.delenv("EFFNET_TRACE_DETAIL", raising=False)
    assert ServerSettings().trace_detail == "events"
    monkeypatch.setenv("EFFNET_TRACE_DETAIL", "spans")
    assert ServerSettings().trace_detail == "spans"
    monkeypatch.setenv("EFFNET_TRACE_DETAIL", "everything")
    with pytest.raises(ValidationError):
        ServerSettings()
    tracing.reset()
    with pytest.raises(StartupError, match="EFFNET_TRACE_DETAIL"):
        tracing.setup({"OTEL_TRACES_EXPORTER": "console"}, detail="everything")
    tracing.reset()


def test_a_stage_timed_in_another_process_comes_back_as_an_event_of_the_request(spans):
    """EFFNET_WORKERS > 1: the queue wait is timed in the engine process (the request's span is a worker's)
    and sent back with the answer; the worker puts it on the span as an event."""
    request = tracing.start_request("POST /predict", "server", {})
    engine_side = tracing.remote_trace(tracing.trace_context(request))
    wait = tracing.QueueWait(engine_side, 2)
    wait.taken()
    assert engine_side.stages is None  # one image of two is still queued
    wait.taken()
    (stage,) = tracing.stages_of(engine_side)
    assert stage[0] == "queue" and stage[3]["effnet.images"] == 2 and stage[1] <= stage[2]
    tracing.add_stages(request, json.loads(json.dumps([stage])))  # as the answer's frame carries it
    request.span.end()
    (server,) = by_name(spans, "POST /predict")
    (event,) = server.events
    assert event.name == "queue" and event.timestamp == stage[1]
    assert event.attributes["effnet.duration_s"] == pytest.approx((stage[2] - stage[1]) / 1e9)
    assert not by_name(spans, "queue")


# -- the OTLP encoding ----------------------------------------------------------------------------------------------


def test_the_otlp_encoding_is_the_sdks(spans):
    """trace_export.encode_spans writes the ExportTraceServiceRequest the SDK's encoder builds: parsed with
    the generated messages, the two are equal, for every kind of field the service's spans use and more."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans as sdk_encode
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.trace import Link, SpanKind, Status, StatusCode

    from service.core.trace_export import encode_spans

    request = tracing.start_request("POST /predict", "server", {"http.route": "/predict", "client.address": "::1"},
                                    carrier={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01",
                                             "tracestate": "vendor=x,other=y"})
    stage = request.stage("decode", {"effnet.image_index": 0, "effnet.image_bytes": 1234})
    stage.fail("invalid_image", "bad", fault=False)
    stage.end()
    tracing.end_with_error(request.span, "inference_failed", "ünïcode message", fault=True)
    request.span.end()
    batch = tracing.BatchSpans({"effnet.engine": "fake"}).start([request], 3, 1)
    tracing.BatchSpans.end(batch, True)
    tracer = tracing.tracer()
    odd = tracer.start_span("odd", attributes={
        "float": 1.5, "negative": -3, "zero": 0, "false": False, "true": True, "empty": "", "big": 2**63 - 1,
        "strings": ("a", "b"), "ints": (1, -2), "floats": (0.5,), "bools": (True, False)})
    odd.add_event("no attributes")
    odd.add_event("some", {"n": 1})
    odd.set_status(Status(StatusCode.OK))
    odd.end()
    linked = tracer.start_span("linked", links=[Link(request.span_context, {"why": "test"})])
    linked.end()
    finished = list(spans.get_finished_spans())
    # Another resource (with a schema URL) and another instrumentation scope are grouped apart.
    other = sdk_trace.TracerProvider(resource=Resource({"service.name": "other"}, "https://schema/1"))
    other_exporter = InMemorySpanExporter()
    other.add_span_processor(SimpleSpanProcessor(other_exporter))
    other.get_tracer("scope-a", "1.0", schema_url="https://schema/a").start_span("a").end()
    other.get_tracer("scope-b").start_span("b", kind=SpanKind.CONSUMER).end()
    finished += list(other_exporter.get_finished_spans())
    assert len(finished) == 6
    ours = ExportTraceServiceRequest.FromString(encode_spans(finished, pause_s=0.0001))
    assert ours == sdk_encode(finished)
    assert len(ours.resource_spans) == 2
    # In slices (64 spans), with pauses between them, the same bytes.
    many = finished * 20
    assert encode_spans(many) == encode_spans(many, pause_s=0.0001)
    assert ExportTraceServiceRequest.FromString(encode_spans(many)) == sdk_encode(many)
