"""A request that leaves the queue costs nothing afterwards, through a real socket (uvicorn in a thread
around a stand-in engine the test holds):

- a client that gives up while its image waits in the queue: its image is withdrawn (queue depth back to
  0 at once) and never reaches the engine, and the next requests are served;
- a request past its deadline gets 504 and its room in the queue is freed at once, while the engine is
  still busy; its image never runs, and the next request is served.

(tests/unit/test_reliability_faults.py holds the failing-batch case in-process.)
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.helpers.fakes import BLUE, RED, app_with_engine, colours, gated_engine
from tests.helpers.server import ThreadedServers
from tests.helpers.waiting import wait_until


@pytest.fixture()
def serve() -> Iterator:
    """Factory: the app with a gated stand-in engine and the given settings, served by uvicorn on a
    loopback port from a thread -> (url, engine, app)."""
    servers = ThreadedServers()

    def start(**settings) -> tuple[str, object, object]:
        engine = gated_engine()
        servers.on_close.append(engine.gate.set)
        app = app_with_engine(engine, warmup=False, max_batch_size=2, max_batch_delay_ms=0, max_queue=4, **settings)
        return servers.start(app), engine, app

    yield start
    servers.close()


def test_a_client_that_gives_up_while_queued_costs_nothing(serve):
    url, engine, app = serve(request_timeout_s=30)
    batcher = app.state.models.get().batcher
    with ThreadPoolExecutor(1) as pool, httpx.Client(base_url=url, timeout=30) as client:
        first = pool.submit(client.post, "/predict", files={"file": ("first.png", BLUE, "image/png")})
        assert engine.batch_running.wait(10)  # the engine is busy with the first request
        with httpx.Client(base_url=url, timeout=0.5) as impatient, pytest.raises(httpx.ReadTimeout):
            impatient.post("/predict", files={"file": ("gone.png", RED, "image/png")})
        # The abandoned image leaves the queue at once, while the engine is still busy.
        wait_until(lambda: batcher.depth == 0, "the abandoned image still holds its room in the queue", timeout=2)
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
        assert batcher.depth == 0
        assert first.result(30).status_code == 504  # the running batch outlived its deadline too
        engine.gate.set()
        after = client.post("/predict", files={"file": ("after.png", BLUE, "image/png")})
        assert after.status_code == 200, after.text
        metrics = client.get("/metrics").text
    assert [colours(b) for b in engine.batches] == [["blue"], ["blue"]]  # the late (red) image never ran
    assert 'effnet_rejected_total{reason="timeout"} 2.0' in metrics
    assert 'effnet_queue_depth{model="efficientnet-lite0"} 0.0' in metrics
