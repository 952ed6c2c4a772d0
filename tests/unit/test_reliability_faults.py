"""Faults, with a stand-in engine whose batches the test holds and releases (so which images
share a batch, and what waits in the queue, is decided here rather than left to timing):

- a batch that raises fails only the requests in that batch, while the batch queued behind it is answered;
  the failure reaches the client as a JSON 500 without internals, and the service goes on;
- a client that gives up while its image waits in the queue costs nothing afterwards: its image is
  withdrawn (queue depth back to 0 at once) and never reaches the engine, and the next requests are
  served;
- a request past its deadline gets 504 and its room in the queue is freed at once, while the engine is still busy;
  its image never runs, and the next request is served.

The last two run a real uvicorn server in a thread (only a real socket can hang up).
(tests/unit/test_service_batching.py proves the same on the batcher alone; this proves it through the routes,
the error handlers and the metrics.)
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import uvicorn
from fastapi.testclient import TestClient
from PIL import Image

from tests.helpers.fakes import FakeEngine, app_with_engine
from tests.helpers.server import free_port

SECRET = "engine exploded at /srv/secret/model.onnx"


def colours(batch: np.ndarray) -> list[str]:
    """Each image of a batch as "red" (channel 0 brighter than channel 2) or "blue"."""
    return ["red" if item[0].mean() > item[2].mean() else "blue" for item in batch]


def gated_engine() -> FakeEngine:
    """Holds its first batch until ``gate`` opens; raises for any batch holding a red image."""
    return FakeEngine(hold=True, fail_if=lambda batch: "red" in colours(batch), error=SECRET)


def stand_in_app(engine: FakeEngine, **settings):
    return app_with_engine(engine, warmup=False, **settings)


def png(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buffer, format="PNG")
    return buffer.getvalue()


RED, BLUE = png((255, 0, 0)), png((0, 0, 255))


def wait_until(condition, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_a_failing_batch_fails_only_its_own_requests_over_http():
    engine = gated_engine()
    app = stand_in_app(engine, max_batch_size=2, max_batch_delay_ms=0, max_queue=8)
    with TestClient(app) as client, ThreadPoolExecutor(5) as pool:
        batcher = app.state.models.get().batcher

        def post(name: str, data: bytes):
            return pool.submit(client.post, "/predict", files={"file": (name, data, "image/png")})

        # A first request occupies the engine (held at the gate); what comes next queues behind it.
        first = post("first.png", BLUE)
        assert engine.batch_running.wait(10)
        poisoned, neighbour = post("poison.png", RED), post("neighbour.png", BLUE)
        # (_queue: decoded images waiting for a batch; `admitted` would also count images still decoding.)
        wait_until(lambda: len(batcher._queue) == 2, "the poisoned pair never queued")
        later = [post("later-1.png", BLUE), post("later-2.png", BLUE)]
        wait_until(lambda: len(batcher._queue) == 4, "the later pair never queued")
        engine.gate.set()
        assert first.result(30).status_code == 200
        failed = [poisoned.result(30), neighbour.result(30)]
        answered = [f.result(30) for f in later]

        # Batch 2 held the poisoned image and its neighbour; batch 3 the later pair.
        assert [sorted(colours(b)) for b in engine.batches] == [["blue"], ["blue", "red"], ["blue", "blue"]]
        for response in failed:
            assert response.status_code == 500
            assert response.json()["error"]["code"] == "inference_failed"
            assert response.json()["error"]["request_id"] == response.headers["x-request-id"]
            for leak in (SECRET, "Traceback", 'File "', "RuntimeError"):
                assert leak not in response.text, leak
        for response in answered:
            assert response.status_code == 200, response.text
            assert response.json()["results"][0]["top_k"][0]["label"] == "espresso"
        # The service goes on: still ready, and new requests are served.
        assert client.get("/readyz").status_code == 200
        assert [f.result(30).status_code for f in (post("after-1.png", BLUE), post("after-2.png", BLUE))] == [200, 200]
        text = client.get("/metrics").text
        assert 'effnet_batch_failures_total{model="efficientnet-lite0"} 1.0' in text
        assert 'effnet_queue_depth{model="efficientnet-lite0"} 0.0' in text


@pytest.fixture()
def serve() -> Iterator:
    """Factory: the app with a gated stand-in engine and the given settings, served by uvicorn on a
    loopback port from a thread -> (url, engine, app)."""
    running: list[tuple[uvicorn.Server, threading.Thread, FakeEngine]] = []

    def start(**settings) -> tuple[str, FakeEngine, object]:
        engine = gated_engine()
        app = stand_in_app(engine, max_batch_size=2, max_batch_delay_ms=0, max_queue=4, **settings)
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on"))
        thread = threading.Thread(target=server.run, name="uvicorn-under-test", daemon=True)
        thread.start()
        running.append((server, thread, engine))
        wait_until(lambda: server.started, "the threaded server never started")
        return f"http://127.0.0.1:{port}", engine, app

    yield start
    for server, thread, engine in running:
        engine.gate.set()
        server.should_exit = True
        thread.join(30)


def test_a_client_that_gives_up_while_queued_costs_nothing(serve):
    url, engine, app = serve(request_timeout_s=30)
    batcher = app.state.models.get().batcher
    with ThreadPoolExecutor(1) as pool, httpx.Client(base_url=url, timeout=30) as client:
        first = pool.submit(client.post, "/predict", files={"file": ("first.png", BLUE, "image/png")})
        assert engine.batch_running.wait(10)  # the engine is busy with the first request
        with httpx.Client(base_url=url, timeout=0.5) as impatient, pytest.raises(httpx.ReadTimeout):
            impatient.post("/predict", files={"file": ("gone.png", RED, "image/png")})
        # The abandoned image leaves the queue at once, while the engine is still busy.
        wait_until(lambda: batcher.admitted == 0, "the abandoned image still holds its room in the queue", timeout=2)
        engine.gate.set()
        assert first.result(30).status_code == 200
        after = client.post("/predict", files={"file": ("after.png", BLUE, "image/png")})
        assert after.status_code == 200
        metrics = client.get("/metrics").text
    # The red image never reached the engine (it would have failed its batch), and it was counted.
    assert [colours(b) for b in engine.batches] == [["blue"], ["blue"]]
    assert 'effnet_rejected_total{reason="client_gone"} 1.0' in metrics
    assert 'effnet_batch_failures_total{model="efficientnet-lite0"} 0.0' in metrics
    assert 'effnet_queue_depth{model="efficientnet-lite0"} 0.0' in metrics


def test_a_request_past_its_deadline_gets_504_and_its_room_is_freed_at_once(serve):
    url, engine, app = serve(request_timeout_s=0.5)
    batcher = app.state.models.get().batcher
    with ThreadPoolExecutor(1) as pool, httpx.Client(base_url=url, timeout=30) as client:
        first = pool.submit(client.post, "/predict", files={"file": ("first.png", BLUE, "image/png")})
        assert engine.batch_running.wait(10)  # the engine is busy (held) past both deadlines
        started = time.perf_counter()
        late = client.post("/predict", files={"file": ("late.png", RED, "image/png")})
        elapsed = time.perf_counter() - started
        assert late.status_code == 504, late.text
        assert late.json()["error"]["code"] == "timeout"
        assert 0.4 <= elapsed < 3.0, elapsed
        # Its slot is free while the engine is still busy: nothing of it is left in the queue.
        assert batcher.admitted == 0
        assert first.result(30).status_code == 504  # the running batch outlived its deadline too
        engine.gate.set()
        after = client.post("/predict", files={"file": ("after.png", BLUE, "image/png")})
        assert after.status_code == 200, after.text
        metrics = client.get("/metrics").text
    assert [colours(b) for b in engine.batches] == [["blue"], ["blue"]]  # the late (red) image never ran
    assert 'effnet_rejected_total{reason="timeout"} 2.0' in metrics
    assert 'effnet_queue_depth{model="efficientnet-lite0"} 0.0' in metrics
