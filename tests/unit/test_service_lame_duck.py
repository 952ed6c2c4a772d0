"""The shutdown states as every front-end sees them, in-process: in lame duck readiness is 503 while
requests are still answered, each response asking for the connection to be closed; draining refuses new
requests; a listener hears every state change. (The real process and signals:
tests/integration/test_service_lifecycle.py; behind HAProxy: tests/integration/test_rolling_restart.py.)"""

from __future__ import annotations

import asyncio

from fastapi.testclient import TestClient

from service.core.lifecycle import State
from tests.helpers.fakes import FakeEngine, app_with_engine


def predict(client: TestClient, jpeg: bytes):
    return client.post("/predict", content=jpeg, headers={"Content-Type": "image/jpeg"})


def test_lame_duck_is_not_ready_but_still_serves_with_connection_close(jpeg):
    app = app_with_engine(FakeEngine(), warmup=False)
    with TestClient(app) as client:
        service = app.state.models
        seen: list[State] = []
        service.lifecycle.add_listener(seen.append)
        served = predict(client, jpeg)
        assert served.status_code == 200 and "connection" not in served.headers

        assert service.enter_lame_duck() is True
        assert service.state is State.LAME_DUCK and service.state.shutting_down
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["error"]["code"] == "shutting_down"
        assert ready.headers["connection"] == "close"
        during = predict(client, jpeg)
        assert during.status_code == 200 and during.headers["connection"] == "close"
        assert during.json()["results"][0]["top_k"][0]["label"] == "espresso"
        assert client.get("/healthz").status_code == 200
        assert client.get("/info").json()["state"] == "lame_duck"
        metrics = client.get("/metrics").text
        assert "effnet_ready 0.0" in metrics
        assert service.enter_lame_duck() is False, "entering twice must not restart the delay"

        assert asyncio.run(service.drain(1.0)) is True
        refused = predict(client, jpeg)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
        assert refused.headers["connection"] == "close" and refused.headers["retry-after"]
        assert seen == [State.LAME_DUCK, State.DRAINING]


def test_a_service_that_never_was_ready_skips_the_lame_duck(jpeg):
    engine = FakeEngine(hold=True)  # warm-up waits on the gate: the service stays WARMING
    app = app_with_engine(engine)
    with TestClient(app) as client:
        service = app.state.models
        assert service.state is State.WARMING
        assert service.enter_lame_duck() is False
        assert service.state is State.WARMING
        assert predict(client, jpeg).json()["error"]["code"] == "not_ready"
        engine.gate.set()


def test_a_failing_state_listener_does_not_break_the_lifecycle(jpeg):
    app = app_with_engine(FakeEngine(), warmup=False)
    with TestClient(app) as client:
        service = app.state.models

        def broken(state: State) -> None:
            raise RuntimeError("listener bug")

        service.lifecycle.add_listener(broken)
        assert service.enter_lame_duck() is True
        assert service.state is State.LAME_DUCK
        assert predict(client, jpeg).status_code == 200
