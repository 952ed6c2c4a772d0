"""Faults, with a stand-in engine whose batches the test holds and releases (so which images
share a batch, and what waits in the queue, is decided here rather than left to timing):

- a batch that raises fails only the requests in that batch, while the batch queued behind it is answered;
  the failure reaches the client as a JSON 500 without internals, and the service goes on;
- a client that gives up while its image waits in the queue costs nothing afterwards: its image is
  withdrawn (queue depth back to 0 at once) and never reaches the engine, and the next requests are
  served;
- a request past its deadline gets 504 and its room in the queue is freed at once, while the engine is still busy;
  its image never runs, and the next request is served.

The last two need a real socket (only a real socket can hang up): tests/integration/test_queue_withdrawal.py.
(tests/unit/test_service_batching.py proves the same on the batcher alone; this proves it through the routes,
the error handlers and the metrics.)
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from fastapi.testclient import TestClient

from tests.helpers.fakes import BLUE, RED, SECRET, app_with_engine, colours, gated_engine
from tests.helpers.waiting import wait_until


def stand_in_app(engine, **settings):
    return app_with_engine(engine, warmup=False, **settings)


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
