"""Warm-up and readiness, in-process with a stand-in engine: not ready while warming up, a failed warm-up is
fatal (liveness 503), and warm-up can be skipped. (Auth and CORS: test_security_http.py; a failing batch:
test_reliability_faults.py.)"""

from __future__ import annotations

import time

from fastapi.testclient import TestClient

from service.core.lifecycle import State
from tests.helpers.fakes import FakeEngine, app_with_engine

SECRET_DETAIL = "secret-internal-detail-/srv/model.pth"


def make_app(engine: FakeEngine, **settings):
    return app_with_engine(engine, **settings)


def wait_ready(client: TestClient, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_not_ready_during_warm_up(jpeg):
    engine = FakeEngine(error=SECRET_DETAIL)
    engine.gate.clear()  # warm-up blocks in the engine
    with TestClient(make_app(engine)) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["error"]["code"] == "not_ready"
        assert ready.headers["retry-after"]
        refused = client.post("/predict", content=jpeg, headers={"Content-Type": "image/jpeg"})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "not_ready"
        assert client.get("/healthz").status_code == 200  # alive while warming
        assert client.get("/info").json()["state"] == "warming"
        engine.gate.set()
        wait_ready(client)


def test_failed_warm_up_is_fatal():
    """A warm-up pass that raises moves the service to FAILED with the reason (which the server logs
    before exiting 1); the probes then answer 503 without leaking the engine's message."""
    engine = FakeEngine(error=SECRET_DETAIL)
    engine.fail = True
    app = make_app(engine)
    with TestClient(app) as client:
        service = app.state.models
        deadline = time.monotonic() + 10
        while service.state is not State.FAILED:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert service.failure.startswith("warm-up failed: RuntimeError")
        assert client.get("/healthz").status_code == 503
        assert client.get("/readyz").status_code == 503
        assert SECRET_DETAIL not in client.get("/healthz").text


def test_warm_up_can_be_skipped(jpeg):
    with TestClient(make_app(FakeEngine(error=SECRET_DETAIL), warmup=False)) as client:
        assert client.get("/readyz").status_code == 200
