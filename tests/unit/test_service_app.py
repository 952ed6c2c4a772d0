"""In-process tests of the app with a stand-in engine: auth, CORS, batch failures, warm-up states."""

from __future__ import annotations

import time

from fastapi.testclient import TestClient

from service.core.runtime import Lifecycle
from tests.helpers.fakes import FakeEngine, app_with_engine

SECRET_DETAIL = "secret-internal-detail-/srv/model.pth"


def make_app(engine: FakeEngine, **settings):
    return app_with_engine(engine, **settings)


def wait_ready(client: TestClient, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_api_key_guards_inference_only(jpeg):
    with TestClient(make_app(FakeEngine(error=SECRET_DETAIL), api_key="s3cret")) as client:
        wait_ready(client)
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic czNjcmV0"}):
            response = client.post(
                "/predict", content=jpeg, headers={"Content-Type": "image/jpeg", **headers}
            )
            assert response.status_code == 401
            assert response.json()["error"]["code"] == "unauthorized"
            assert response.headers["www-authenticate"] == "Bearer"
        ok = client.post(
            "/predict", content=jpeg, headers={"Content-Type": "image/jpeg", "Authorization": "Bearer s3cret"}
        )
        assert ok.status_code == 200 and ok.json()["results"][0]["top_k"][0]["label"] == "espresso"
        features = client.post("/features", content=jpeg, headers={"Content-Type": "image/jpeg"})
        assert features.status_code == 401
        for path in ("/healthz", "/readyz", "/metrics", "/info"):
            assert client.get(path).status_code == 200, path
        assert client.get("/info").json()["auth_required"] is True
        assert "s3cret" not in client.get("/info").text


def test_cors_only_for_configured_origins():
    with TestClient(
        make_app(FakeEngine(error=SECRET_DETAIL), cors_origins="https://app.example, https://other.example")
    ) as client:
        preflight = {"Access-Control-Request-Method": "POST"}
        allowed = client.options("/predict", headers={"Origin": "https://app.example", **preflight})
        assert allowed.headers["access-control-allow-origin"] == "https://app.example"
        denied = client.options("/predict", headers={"Origin": "https://evil.example", **preflight})
        assert "access-control-allow-origin" not in denied.headers


def test_failing_batch_answers_500_json_without_internals_and_service_goes_on(jpeg):
    engine = FakeEngine(error=SECRET_DETAIL)
    with TestClient(make_app(engine)) as client:
        wait_ready(client)
        engine.fail = True
        failed = client.post("/predict", content=jpeg, headers={"Content-Type": "image/jpeg"})
        assert failed.status_code == 500
        assert failed.json()["error"]["code"] == "inference_failed"
        assert SECRET_DETAIL not in failed.text and "Traceback" not in failed.text
        engine.fail = False
        assert (
            client.post("/predict", content=jpeg, headers={"Content-Type": "image/jpeg"}).status_code == 200
        )
        assert client.get("/readyz").status_code == 200
        assert "effnet_batch_failures_total 1.0" in client.get("/metrics").text


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
        service = app.state.service
        deadline = time.monotonic() + 10
        while service.state is not Lifecycle.FAILED:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert service.failure.startswith("warm-up failed: RuntimeError")
        assert client.get("/healthz").status_code == 503
        assert client.get("/readyz").status_code == 503
        assert SECRET_DETAIL not in client.get("/healthz").text


def test_warm_up_can_be_skipped(jpeg):
    with TestClient(make_app(FakeEngine(error=SECRET_DETAIL), warmup=False)) as client:
        assert client.get("/readyz").status_code == 200
