"""Tracing end to end: real Lite0 servers exporting OTLP/HTTP (protobuf) to a real receiver in the test
(tests/helpers/otlp.py, decoded with the ``opentelemetry-proto`` messages), configured only by the
standard OTEL_* variables.

- HTTP with a ``traceparent``: the server span has that trace id and parent, its decode and queue stages
  (timed events of it by default; child spans with EFFNET_TRACE_DETAIL=spans), and a batch span (its own
  trace) links to it; two concurrent requests batched together are both linked from one batch span; gRPC
  (tritonclient, ``traceparent`` metadata) the same. Each in one process, as two front-end workers (the
  queue wait timed in the engine process comes back as an event of the worker's span), and as two workers
  with detail ``spans`` (the queue span is the engine process's).
- ``parentbased_traceidratio``: a sampled-out parent exports nothing.
- An exporter that is down or slow: requests take no longer than with tracing off, and the server still
  stops promptly; one that cannot keep up: the spans dropped are counted in /metrics (in one process and
  with two workers), every request answered.
"""

from __future__ import annotations

import statistics
import threading
import time

import httpx
import numpy as np
import pytest
import tritonclient.grpc as tgrpc

from tests.helpers.components import missing_component
from tests.helpers.server import ServiceProcess, free_port

try:
    import opentelemetry.proto  # noqa: F401
    import opentelemetry.sdk  # noqa: F401
except ImportError:
    missing_component("the OpenTelemetry SDK is not installed (the tracing extra, in the dev extras)")

from tests.helpers.otlp import OtlpReceiver  # noqa: E402 - needs opentelemetry-proto

MODEL = "efficientnet-lite0"
PARENT = "00f067aa0ba902b7"
SERVER_KIND = 2  # opentelemetry.proto.trace.v1.Span.SPAN_KIND_SERVER


def otel_env(endpoint: str, **more: str) -> dict[str, str]:
    return {
        "EFFNET_MODEL": MODEL,
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "OTEL_SERVICE_NAME": "effnet-test",
        "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=test",
        "OTEL_BSP_SCHEDULE_DELAY": "50",
        **more,
    }


def trace_id(n: int) -> str:
    return f"{n:032x}"


def traceparent(tid: str, sampled: bool = True) -> str:
    return f"00-{tid}-{PARENT}-{'01' if sampled else '00'}"


@pytest.fixture(scope="module")
def receiver():
    with OtlpReceiver() as receiver:
        yield receiver


@pytest.fixture(scope="module", params=[(1, "events"), (2, "events"), (2, "spans")],
                ids=["one-process", "two-workers", "two-workers-spans"])
def server(receiver, request):
    """The traced server, in one process and as two front-end workers feeding an engine process (the
    request's span in a worker, the batch span in the engine process; the queue wait timed there, sent
    back as an event of the request's span, or with EFFNET_TRACE_DETAIL=spans a span of the engine's)."""
    workers, detail = request.param
    grpc_port = free_port()
    env = otel_env(
        receiver.endpoint,
        # Roots are always sampled at 1.0, so a missing span can only be the caller's sampled-out flag.
        OTEL_TRACES_SAMPLER="parentbased_traceidratio",
        OTEL_TRACES_SAMPLER_ARG="1.0",
        EFFNET_GRPC_PORT=str(grpc_port),
        EFFNET_MAX_BATCH_SIZE="8",
        EFFNET_MAX_BATCH_DELAY_MS="50",
        EFFNET_WORKERS=str(workers),
        EFFNET_TRACE_DETAIL=detail,
    )
    with ServiceProcess(env) as service:
        service.grpc_url = f"127.0.0.1:{grpc_port}"
        service.detail = detail
        yield service
    receiver.clear()  # the next server's tests reuse the trace ids: they start from no spans


def stages(spans: list, server, name: str, detail: str) -> list[tuple[int, int, dict]]:
    """The ``name`` stages (decode, queue) of the request whose span is ``server``, as (start ns, end ns,
    attributes): its child spans (detail ``spans``) or its events (``events``: at the stage's start, its
    duration in ``effnet.duration_s``)."""
    if detail == "spans":
        assert name not in [e.name for e in server.events]
        return [(s.start_ns, s.end_ns, s.attributes) for s in spans
                if s.name == name and s.trace_id == server.trace_id and s.parent_span_id == server.span_id]
    assert not [s for s in spans if s.name == name and s.trace_id == server.trace_id], f"{name} spans made"
    return [(e.time_ns, e.time_ns + int(e.attributes["effnet.duration_s"] * 1e9), e.attributes)
            for e in server.events if e.name == name]


def check_request_trace(receiver: OtlpReceiver, tid: str, server_name: str, images: int, detail: str) -> None:
    # Each process exports on its own: the request's span (a worker's) may come after its batch's.
    spans = receiver.wait_for(lambda spans: any(
        s.name == "batch" and any(t == tid for t, _ in s.links) for s in spans)
        and any(s.name == server_name and s.trace_id == tid for s in spans)
        and (detail == "events" or any(s.name == "queue" and s.trace_id == tid for s in spans)))
    mine = [s for s in spans if s.trace_id == tid]
    (server,) = [s for s in mine if s.name == server_name]
    assert server.parent_span_id == PARENT and server.kind == SERVER_KIND
    assert server.attributes["effnet.model"] == MODEL and server.attributes["effnet.images"] == images
    assert server.resource["service.name"] == "effnet-test"
    assert server.resource["deployment.environment"] == "test"
    decodes = stages(spans, server, "decode", detail)
    (queue,) = stages(spans, server, "queue", detail)
    assert len(decodes) == images
    assert sorted(a["effnet.image_index"] for _, _, a in decodes) == list(range(images))
    assert queue[2]["effnet.images"] == images
    # Within the request's span (1 ms of slack: a stage timed in the engine process, on the same clock).
    assert all(server.start_ns <= start <= end <= server.end_ns + 1_000_000 for start, end, _ in [*decodes, queue])
    batches = [s for s in spans if s.name == "batch" and (tid, server.span_id) in s.links]
    assert batches and all(b.trace_id != tid and b.parent_span_id == "" for b in batches)
    assert batches[0].attributes["effnet.engine"] == "onnxruntime"
    assert batches[0].attributes["effnet.device"] == "cpu"
    assert batches[0].attributes["effnet.dtype"] == "float32"
    assert batches[0].attributes["effnet.batch.size"] >= 1


def test_http_request_joins_the_callers_trace(server, receiver, photos):
    tid = trace_id(0x1001)
    response = httpx.post(
        f"{server.url}/predict",
        files=[("file", ("coffee.jpg", photos["coffee.jpg"], "image/jpeg")),
               ("file", ("chelsea.jpg", photos["chelsea.jpg"], "image/jpeg"))],
        headers={"traceparent": traceparent(tid), "tracestate": "vendor=1"},
        timeout=30,
    )
    assert response.status_code == 200
    check_request_trace(receiver, tid, "POST /predict", images=2, detail=server.detail)
    (span,) = [s for s in receiver.in_trace(tid) if s.name == "POST /predict"]
    assert span.attributes["http.response.status_code"] == 200
    assert span.attributes["effnet.request_id"] == response.headers["x-request-id"]
    assert response.headers["traceresponse"] == f"00-{tid}-{span.span_id}-01"
    # The access-log line names the trace too.
    assert f'"trace_id": "{tid}"' in server.logs() or f'"trace_id":"{tid}"' in server.logs()


def test_two_concurrent_requests_in_one_batch_are_both_linked(server, receiver, photos):
    # Each pair is sent at the same moment; the batcher may still close a batch before the second has
    # decoded, so a few pairs are tried and one batch must serve both requests of a pair.
    for attempt in range(20):
        tids = [trace_id(0x2000 + 2 * attempt), trace_id(0x2001 + 2 * attempt)]
        barrier = threading.Barrier(2)

        def send(tid: str, barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            response = httpx.post(f"{server.url}/features", content=photos["grace_hopper.jpg"], timeout=30,
                                  headers={"content-type": "image/jpeg", "traceparent": traceparent(tid)})
            assert response.status_code == 200

        threads = [threading.Thread(target=send, args=(tid,)) for tid in tids]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        # The batch spans and the requests' spans (with two workers, another process's exports).
        spans = receiver.wait_for(lambda spans, tids=tids: all(
            any(s.name == "batch" and any(t == tid for t, _ in s.links) for s in spans)
            and any(s.name == "POST /features" and s.trace_id == tid for s in spans) for tid in tids))
        together = [s for s in spans if s.name == "batch" and {t for t, _ in s.links} >= set(tids)]
        if together:
            (batch,) = together
            assert batch.attributes["effnet.batch.size"] >= 2
            servers = {s.trace_id: s.span_id for s in spans if s.trace_id in tids and s.name == "POST /features"}
            assert {(t, servers[t]) for t in tids} <= set(batch.links)
            return
    pytest.fail("no batch served two concurrent requests in 20 tries")


def test_grpc_request_joins_the_callers_trace(server, receiver, photos):
    tid = trace_id(0x3001)
    client = tgrpc.InferenceServerClient(server.grpc_url)
    try:
        data = np.array([photos["coffee.jpg"]], dtype=np.object_)
        tensor = tgrpc.InferInput("image", [1], "BYTES")
        tensor.set_data_from_numpy(data)
        result = client.infer(MODEL, [tensor], headers={"traceparent": traceparent(tid)})
        assert result.as_numpy("logits") is not None
    finally:
        client.close()
    check_request_trace(receiver, tid, "inference.GRPCInferenceService/ModelInfer", images=1, detail=server.detail)
    (span,) = [s for s in receiver.in_trace(tid) if s.name.endswith("ModelInfer")]
    assert span.attributes["rpc.system"] == "grpc" and span.attributes["rpc.method"] == "ModelInfer"
    assert span.attributes["effnet.status_code"] == 200


def test_errors_are_recorded_with_the_service_code(server, receiver):
    tid = trace_id(0x4001)
    response = httpx.post(f"{server.url}/predict", content=b"not an image", timeout=30,
                          headers={"content-type": "image/jpeg", "traceparent": traceparent(tid)})
    assert response.status_code == 400
    (span,) = receiver.wait_for(lambda spans: any(s.trace_id == tid and s.name == "POST /predict"
                                                  for s in spans)) and [
        s for s in receiver.in_trace(tid) if s.name == "POST /predict"]
    assert span.attributes["error.type"] == response.json()["error"]["code"] == "invalid_image"
    assert span.attributes["http.response.status_code"] == 400


def test_a_sampled_out_parent_exports_nothing(server, receiver, photos):
    out, kept = trace_id(0x5001), trace_id(0x5002)
    for tid, sampled in ((out, False), (kept, True)):
        response = httpx.post(f"{server.url}/predict", content=photos["coffee.jpg"], timeout=30,
                              headers={"content-type": "image/jpeg", "traceparent": traceparent(tid, sampled)})
        assert response.status_code == 200
        assert response.headers["traceresponse"].endswith("-01" if sampled else "-00")
    # The sampled request sent after it has arrived (whole: its batch links to it), so the sampled-out
    # one had every chance to; nothing of its trace came, nor a batch linked to it.
    spans = receiver.wait_for(lambda spans: any(s.name == "batch" and any(t == kept for t, _ in s.links)
                                                for s in spans))
    assert not [s for s in spans if s.trace_id == out or any(t == out for t, _ in s.links)]


def test_latency_exemplars_in_openmetrics(server, receiver, photos):
    tid = trace_id(0x6001)
    httpx.post(f"{server.url}/predict", content=photos["coffee.jpg"], timeout=30,
               headers={"content-type": "image/jpeg", "traceparent": traceparent(tid)})
    text = httpx.get(f"{server.url}/metrics", headers={"accept": "application/openmetrics-text"}).text
    exemplars = [line for line in text.splitlines()
                 if line.startswith('effnet_request_duration_seconds_bucket{endpoint="/predict"') and " # " in line]
    assert exemplars and all('trace_id="' in line for line in exemplars)


def latencies(url: str, jpeg: bytes, n: int) -> list[float]:
    out = []
    with httpx.Client(base_url=url, timeout=30) as client:
        for i in range(n):
            started = time.perf_counter()
            response = client.post("/predict", content=jpeg,
                                   headers={"content-type": "image/jpeg", "traceparent": traceparent(trace_id(i + 1))})
            out.append(time.perf_counter() - started)
            assert response.status_code == 200
    return out


N_TIMED = 40


@pytest.fixture(scope="module")
def baseline(photos) -> list[float]:
    """Request latencies of the same server with tracing off."""
    with ServiceProcess({"EFFNET_MODEL": MODEL}) as off:
        return latencies(off.url, photos["coffee.jpg"], N_TIMED)


@pytest.mark.parametrize("exporter", ["down", "slow"])
def test_an_exporter_down_or_slow_does_not_hold_up_requests(exporter, photos, baseline):
    jpeg = photos["coffee.jpg"]
    n = N_TIMED
    slow = OtlpReceiver(delay_s=3.0).start() if exporter == "slow" else None
    # Down: a port nobody listens on (the exporter's connection is refused, then retried with backoff).
    endpoint = slow.endpoint if slow is not None else f"http://127.0.0.1:{free_port()}"
    try:
        # A batch of spans every 50 ms, at most 8 per export: the exporter is busy (failing or waiting for
        # the slow receiver) during the whole run.
        env = otel_env(endpoint, OTEL_BSP_MAX_EXPORT_BATCH_SIZE="8", OTEL_EXPORTER_OTLP_TIMEOUT="5")
        with ServiceProcess(env) as traced:
            measured = latencies(traced.url, jpeg, n)
    finally:
        if slow is not None:
            slow.close()
    assert traced.stopped is not None and traced.stopped.exit_code == 0
    # The last spans are flushed for at most 2 s at shutdown, never the exporter's whole timeout and retries.
    assert traced.stopped.shutdown_s < 8.0
    # Nothing waits for the exporter: no request anywhere near its 3 s delay or 5 s timeout, and the
    # median within noise of tracing off (a loaded 2-core machine: 1.5x + 20 ms).
    assert max(measured) < 1.5, f"slowest request {max(measured):.3f} s"
    assert statistics.median(measured) < 1.5 * statistics.median(baseline) + 0.02, (
        f"median {statistics.median(measured):.4f} s with the exporter {exporter}, "
        f"{statistics.median(baseline):.4f} s with tracing off")


def spans_dropped(url: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=30).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "effnet_trace_spans_dropped_total")


@pytest.mark.parametrize("workers", [1, 2], ids=["one-process", "two-workers"])
def test_spans_an_exporter_cannot_take_are_dropped_counted_and_wait_for_nothing(workers, photos):
    """A collector that takes 30 s to answer, and room for 2 spans in each process's queue: every request
    is answered while each exporter waits on its first export, and what did not fit is counted, with two
    workers the workers' drops (reported to the engine process) as well as the engine's."""
    requests = 20
    with OtlpReceiver(delay_s=30.0) as stuck:
        env = otel_env(stuck.endpoint, OTEL_BSP_MAX_QUEUE_SIZE="2", OTEL_BSP_MAX_EXPORT_BATCH_SIZE="1",
                       OTEL_EXPORTER_OTLP_TIMEOUT="30", EFFNET_WORKERS=str(workers))
        with ServiceProcess(env) as traced, httpx.Client(base_url=traced.url, timeout=30) as client:
            assert spans_dropped(traced.url) == 0
            sent = 0
            for _ in range(requests + 5):
                response = client.post("/predict", content=photos["coffee.jpg"], headers={
                    "content-type": "image/jpeg", "traceparent": traceparent(trace_id(0x7000 + sent))})
                assert response.status_code == 200
                sent += 1
                # 2 spans a request (its own, its batch's: one request at a time); each process keeps at most
                # 3 (one in the export that waits, two queued): the rest is dropped. A worker reports its
                # drops with its next request, so its last request's may not be counted yet. With two
                # workers the engine process alone can drop at most sent - 3: more includes the workers'.
                processes = 1 if workers == 1 else workers + 1
                least = 2 * sent - 3 * processes - workers
                if sent >= requests and spans_dropped(traced.url) >= least:
                    break
            assert least > sent - 3
            assert spans_dropped(traced.url) >= least


def test_batch_command_server_mode_carries_its_run_trace_to_the_server(server, receiver, photos):
    """efficientnet-batch --server with tracing on in the command: one trace from the run's span through
    a client span per image to the server's spans."""
    import asyncio

    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from service.cli.remote import RemoteRunner
    from service.core import tracing

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider)
    try:
        runner = RemoteRunner(server.url, "predict", top_k=1)

        async def main() -> None:
            await runner.start()
            try:
                await asyncio.gather(runner.run("coffee.jpg", photos["coffee.jpg"]), runner.run("bad.jpg", b"x"))
            finally:
                await runner.close()

        asyncio.run(main())
    finally:
        tracing.reset()
    local = exporter.get_finished_spans()
    (run,) = [s for s in local if s.name == "efficientnet-batch predict"]
    clients = {s.attributes["effnet.file"]: s for s in local if s.name == "POST /predict"}
    assert set(clients) == {"coffee.jpg", "bad.jpg"}
    tid = format(run.context.trace_id, "032x")
    assert all(format(s.context.trace_id, "032x") == tid and s.parent.span_id == run.context.span_id
               for s in clients.values())
    assert clients["bad.jpg"].attributes["error.type"] == "invalid_image"
    spans = receiver.wait_for(lambda spans: len([s for s in spans if s.trace_id == tid
                                                 and s.name == "POST /predict"]) == 2)
    served = {s.parent_span_id for s in spans if s.trace_id == tid and s.name == "POST /predict"}
    assert served == {format(s.context.span_id, "016x") for s in clients.values()}
