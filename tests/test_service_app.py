"""In-process tests of the app with a stand-in engine: auth, CORS, batch failures, warm-up states."""

from __future__ import annotations

import io
import threading
import time

import numpy as np
import pytest
from conftest import app_with_engine
from fastapi.testclient import TestClient
from PIL import Image

SECRET_DETAIL = "secret-internal-detail-/srv/model.pth"


class FakeEngine:
    """Logits peak at class 967 (espresso); features are all ones. Can fail or block on demand."""

    backend, device, dtype = "fake", "cpu", "float32"

    def __init__(self) -> None:
        self.fail = False
        self.gate = threading.Event()
        self.gate.set()

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        assert self.gate.wait(10)
        if self.fail:
            raise RuntimeError(SECRET_DETAIL)
        logits = np.zeros((len(batch), 1000), dtype=np.float32)
        logits[:, 967] = 10.0
        return np.ones((len(batch), 1280), dtype=np.float32), logits


def make_app(engine: FakeEngine, **settings):
    return app_with_engine(engine, **settings)


def wait_ready(client: TestClient, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.01)


@pytest.fixture(scope="module")
def jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (120, 80, 40)).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_api_key_guards_inference_only(jpeg):
    with TestClient(make_app(FakeEngine(), api_key="s3cret")) as client:
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
        make_app(FakeEngine(), cors_origins="https://app.example, https://other.example")
    ) as client:
        preflight = {"Access-Control-Request-Method": "POST"}
        allowed = client.options("/predict", headers={"Origin": "https://app.example", **preflight})
        assert allowed.headers["access-control-allow-origin"] == "https://app.example"
        denied = client.options("/predict", headers={"Origin": "https://evil.example", **preflight})
        assert "access-control-allow-origin" not in denied.headers


def test_failing_batch_answers_500_json_without_internals_and_service_goes_on(jpeg):
    engine = FakeEngine()
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
    engine = FakeEngine()
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
    engine = FakeEngine()
    engine.fail = True
    app = make_app(engine)
    calls: list[str] = []
    app.state.on_fatal = calls.append
    with TestClient(app) as client:
        deadline = time.monotonic() + 10
        while not calls:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert "warm-up failed" in calls[0]
        assert client.get("/healthz").status_code == 503
        assert client.get("/readyz").status_code == 503
        assert SECRET_DETAIL not in client.get("/healthz").text


def test_warm_up_can_be_skipped(jpeg):
    with TestClient(make_app(FakeEngine(), warmup=False)) as client:
        assert client.get("/readyz").status_code == 200
