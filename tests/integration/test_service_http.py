"""Acceptance tests over HTTP against a real server process (uvicorn on loopback, real Lite0 weights)."""

from __future__ import annotations

import asyncio
import http.client
import io
import shutil
import subprocess
import time

import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers.images import png_declaring

PHOTO_NAMES = ("chelsea.jpg", "coffee.jpg", "grace_hopper.jpg")
MAX_BODY = 2_000_000
MAX_PIXELS = 4_000_000
MAX_IMAGES = 8


@pytest.fixture(scope="module")
def service(start_service):
    """Lite0 with real weights and small limits, so the limit tests need no huge uploads."""
    server = start_service(
        {
            "EFFNET_MAX_BODY_BYTES": str(MAX_BODY),
            "EFFNET_MAX_IMAGE_PIXELS": str(MAX_PIXELS),
            "EFFNET_MAX_IMAGES_PER_REQUEST": str(MAX_IMAGES),
            "EFFNET_MAX_BATCH_SIZE": "8",
            "EFFNET_MAX_BATCH_DELAY_MS": "10",
        }
    )
    yield server
    server.close()


@pytest.fixture()
def client(service):
    with httpx.Client(base_url=service.url, timeout=60.0) as c:
        yield c


def top1(result: dict) -> str:
    return result["top_k"][0]["label"]


def labels(result: dict) -> list[str]:
    return [entry["label"] for entry in result["top_k"]]


@pytest.fixture(scope="module")
def assert_correct(photo_classes):
    def check(name: str, result: dict) -> None:
        expected = photo_classes[name]
        if name == "grace_hopper.jpg":
            assert expected & set(labels(result)[:3]), (name, labels(result))
        else:
            assert top1(result) in expected, (name, labels(result))

    return check


def metric_samples(text: str) -> dict[str, list]:
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


# -- readiness and info -------------------------------------------------------------------------------------
def test_readiness_was_503_until_warm_up_ended(service):
    # The fixture polled /readyz every 10 ms from the moment the port opened.
    assert service.readiness_seen[-1] == 200
    assert 503 in service.readiness_seen, service.readiness_seen


def test_health_and_info(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}
    info = client.get("/info").json()
    assert info["model"] == "efficientnet-lite0"
    assert info["weights_source"] == "package"
    assert info["num_classes"] == 1000 and info["num_features"] == 1280
    assert info["parameters"] > 4_000_000
    assert info["preprocessing"]["input_size"] == 224
    assert info["device"] == "cpu" and info["dtype"] == "float32" and info["backend"] == "onnxruntime"
    assert info["batching"]["max_batch_size"] == 8
    assert info["limits"]["max_body_bytes"] == MAX_BODY
    assert "torch" in info["versions"]


# -- predictions --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", PHOTO_NAMES)
def test_multipart_upload_gets_the_right_class(client, photos, name, assert_correct):
    response = client.post("/predict", files={"file": (name, photos[name], "image/jpeg")})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "efficientnet-lite0"
    (result,) = body["results"]
    assert result["filename"] == name
    assert "logits" not in result
    assert len(result["top_k"]) == 5
    assert_correct(name, result)
    if name == "coffee.jpg":
        assert result["top_k"][0]["index"] == 967 and result["top_k"][0]["score"] > 0.8


@pytest.mark.parametrize("name", PHOTO_NAMES)
def test_raw_body_upload_gets_the_right_class(client, photos, name, assert_correct):
    response = client.post("/predict", content=photos[name], headers={"Content-Type": "image/jpeg"})
    assert response.status_code == 200, response.text
    (result,) = response.json()["results"]
    assert result["filename"] is None
    assert_correct(name, result)


def test_two_images_return_two_results_in_order(client, photos, assert_correct):
    files = [
        ("file", ("b.jpg", photos["chelsea.jpg"], "image/jpeg")),
        ("file", ("a.jpg", photos["coffee.jpg"], "image/jpeg")),
    ]
    results = client.post("/predict", files=files).json()["results"]
    assert [r["filename"] for r in results] == ["b.jpg", "a.jpg"]
    assert_correct("chelsea.jpg", results[0])
    assert_correct("coffee.jpg", results[1])


def test_top_k_and_logits(client, photos):
    response = client.post(
        "/predict", params={"top_k": 10, "logits": "true"}, files={"file": ("c.jpg", photos["coffee.jpg"])}
    )
    (result,) = response.json()["results"]
    scores = [entry["score"] for entry in result["top_k"]]
    assert len(scores) == 10 and scores == sorted(scores, reverse=True)
    logits = np.array(result["logits"])
    assert logits.shape == (1000,)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    assert int(np.argmax(logits)) == result["top_k"][0]["index"]
    assert abs(probs.max() - scores[0]) < 1e-5
    every = client.post("/predict", params={"top_k": 1000}, files={"file": ("c.jpg", photos["coffee.jpg"])})
    assert len(every.json()["results"][0]["top_k"]) == 1000


def test_features(client, photos):
    files = [
        ("file", ("x.jpg", photos["coffee.jpg"])),
        ("file", ("y.jpg", photos["coffee.jpg"])),
        ("file", ("z.jpg", photos["chelsea.jpg"])),
    ]
    body = client.post("/features", params={"normalize": "true"}, files=files).json()
    assert body["model"] == "efficientnet-lite0" and body["dim"] == 1280
    x, y, z = (np.array(r["embedding"]) for r in body["results"])
    assert x.shape == (1280,)
    assert abs(np.linalg.norm(x) - 1.0) < 1e-6 and abs(np.linalg.norm(z) - 1.0) < 1e-6
    assert np.allclose(x, y, atol=1e-5)  # the same image twice gives the same vector
    assert float(x @ z) < 0.9  # a different image does not
    raw = client.post(
        "/features", content=photos["coffee.jpg"], headers={"Content-Type": "image/jpeg"}
    ).json()
    vector = np.array(raw["results"][0]["embedding"])
    assert vector.shape == (1280,) and (vector >= 0).all()  # pooled ReLU6 activations
    assert np.allclose(vector / np.linalg.norm(vector), x, atol=1e-5)


# -- concurrency and batching ------------------------------------------------------------------------------
def test_concurrent_requests_each_get_their_own_answer_in_shared_batches(service, photos, assert_correct):
    names = PHOTO_NAMES

    async def one(client: httpx.AsyncClient, i: int) -> tuple[str, str, dict]:
        name = names[i % len(names)]
        tag = f"{i:02d}-{name}"
        if i % 2:
            response = await client.post("/predict", files={"file": (tag, photos[name], "image/jpeg")})
        else:
            response = await client.post("/features", files={"file": (tag, photos[name], "image/jpeg")})
        assert response.status_code == 200, response.text
        return name, tag, response.json()

    async def flood() -> list:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=service.url, timeout=120.0, limits=limits) as client:
            return await asyncio.gather(*(one(client, i) for i in range(48)))

    before = metric_samples(httpx.get(f"{service.url}/metrics").text)
    outcomes = asyncio.run(flood())
    for name, tag, body in outcomes:
        (result,) = body["results"]
        assert result["filename"] == tag
        if "top_k" in result:
            assert_correct(name, result)
        else:
            assert len(result["embedding"]) == 1280
    after = metric_samples(httpx.get(f"{service.url}/metrics").text)

    def total(samples, name):
        return sum(s.value for s in samples.get(name, []))

    batches = total(after, "effnet_batch_size_count") - total(before, "effnet_batch_size_count")
    images = total(after, "effnet_batch_size_sum") - total(before, "effnet_batch_size_sum")
    assert images == 48
    assert batches < 48, "every image ran in a batch of its own"
    single = [s.value for s in after["effnet_batch_size_bucket"] if s.labels["le"] == "1.0"][0]
    assert single < total(after, "effnet_batch_size_count")


# -- errors -------------------------------------------------------------------------------------------------
def _big_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (2100, 2000)).save(buffer, format="PNG")  # 4.2 Mpx > the 4 Mpx limit, few KB
    return buffer.getvalue()


def _chunks(total: int):
    sent = 0
    while sent < total:
        yield b"\xff" * 65536
        sent += 65536


ERROR_CASES = {
    "empty raw body": (dict(content=b"", headers={"Content-Type": "image/jpeg"}), 400, "invalid_image"),
    "random bytes": (
        dict(content=b"\x13\x37" * 500, headers={"Content-Type": "image/png"}),
        400,
        "invalid_image",
    ),
    "html in a part": (dict(files={"file": ("x.html", b"<html></html>", "text/html")}), 400, "invalid_image"),
    "empty part": (dict(files={"file": ("e.jpg", b"", "image/jpeg")}), 400, "invalid_image"),
    "no file part": (dict(files={"image": ("a.jpg", b"abc", "image/jpeg")}), 400, "bad_request"),
    "field instead of file": (
        dict(data={"file": "not a file"}, files={"other": ("o", b"x")}),
        400,
        "bad_request",
    ),
    "truncated multipart": (
        dict(
            content=b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\nabc',
            headers={"Content-Type": "multipart/form-data; boundary=xyz"},
        ),
        400,
        None,
    ),
    "body too large (declared)": (
        dict(content=b"\x00" * (MAX_BODY + 1), headers={"Content-Type": "image/jpeg"}),
        413,
        "body_too_large",
    ),
    "body too large (chunked)": (
        dict(content=_chunks(MAX_BODY + 300_000), headers={"Content-Type": "image/jpeg"}),
        413,
        "body_too_large",
    ),
    "too many pixels (header only)": (
        dict(content=png_declaring(60000, 60000), headers={"Content-Type": "image/png"}),
        413,
        "image_too_large",
    ),
    "too many pixels": (dict(files={"file": ("big.png", _big_png(), "image/png")}), 413, "image_too_large"),
    "too many images": (
        dict(files=[("file", (f"{i}.png", b"x", "image/png")) for i in range(MAX_IMAGES + 1)]),
        413,
        "too_many_images",
    ),
    "text/plain": (
        dict(content=b"hello", headers={"Content-Type": "text/plain"}),
        415,
        "unsupported_media_type",
    ),
    "json": (dict(json={"image": "abc"}), 415, "unsupported_media_type"),
    "svg": (
        dict(content=b"<svg/>", headers={"Content-Type": "image/svg+xml"}),
        415,
        "unsupported_media_type",
    ),
    "no content type": (dict(content=b"abc", headers={"Content-Type": ""}), 415, "unsupported_media_type"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_errors_are_json_with_their_status(client, case):
    kwargs, status, code = ERROR_CASES[case]
    response = client.post("/predict", **kwargs)
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["message"]
    if code:
        assert error["code"] == code
    assert error["request_id"] == response.headers["x-request-id"]


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/predict", {"top_k": 0}),
        ("/predict", {"top_k": 1001}),
        ("/predict", {"top_k": "five"}),
        ("/predict", {"logits": "perhaps"}),
        ("/features", {"normalize": "x"}),
    ],
)
def test_bad_parameters_are_422(client, photos, path, params):
    response = client.post(path, params=params, files={"file": ("c.jpg", photos["coffee.jpg"])})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "invalid_parameters" and error["details"]


def test_early_errors_on_large_bodies_are_delivered_and_the_connection_survives(client):
    body = b"\x00" * (MAX_BODY - 1000)
    for _ in range(3):
        refused = client.post("/predict", content=body, headers={"Content-Type": "text/plain"})
        assert refused.status_code == 415
        missing = client.post("/nowhere", content=body, headers={"Content-Type": "image/png"})
        assert missing.status_code == 404
    assert client.get("/healthz").status_code == 200


def test_unknown_paths_and_methods_are_json(client):
    missing = client.get("/nope")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    wrong = client.get("/predict")
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "method_not_allowed"


def test_the_server_keeps_serving_after_errors(client, photos):
    for kwargs, _, _ in ERROR_CASES.values():
        client.post("/features", **kwargs)
    assert client.get("/readyz").status_code == 200
    response = client.post("/predict", files={"file": ("c.jpg", photos["coffee.jpg"])})
    assert response.status_code == 200
    assert top1(response.json()["results"][0]) == "espresso"
    samples = metric_samples(client.get("/metrics").text)
    rejected = {s.labels["reason"]: s.value for s in samples["effnet_rejected_total"]}
    assert (
        rejected["invalid_image"] > 0 and rejected["body_too_large"] > 0 and rejected["image_too_large"] > 0
    )


# -- request ids, CORS, docs, metrics ------------------------------------------------------------------------
def test_request_id_is_taken_or_made_and_echoed(client, service):
    response = client.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert response.headers["x-request-id"] == "abc-123"
    made = client.get("/healthz", headers={"X-Request-ID": "bad id\twith spaces"}).headers["x-request-id"]
    assert made != "bad id\twith spaces" and len(made) == 32
    error = client.post(
        "/predict", content=b"", headers={"Content-Type": "image/png", "X-Request-ID": "req-42"}
    )
    assert error.json()["error"]["request_id"] == "req-42"
    access = [line for line in service.logs().splitlines() if '"request_id": "req-42"' in line]
    assert access and '"logger": "service.access"' in access[-1] and '"status": 400' in access[-1]


def test_openapi_document_and_local_docs(client):
    document = client.get("/openapi.json").json()
    predict = document["paths"]["/predict"]["post"]
    assert set(predict["requestBody"]["content"]) >= {"multipart/form-data", "image/jpeg", "image/png"}
    assert predict["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "PredictResponse"
    )
    assert client.get("/redoc").status_code == 404
    docs = client.get("/docs")
    if docs.status_code == 404:
        pytest.skip("swagger-ui-bundle-v2 not installed: /docs is disabled")
    assert docs.status_code == 200
    assert "cdn" not in docs.text.lower() and "https://" not in docs.text  # nothing from outside
    assert client.get("/docs/assets/swagger-ui-bundle.js").status_code == 200
    assert client.get("/docs/assets/swagger-ui.css").status_code == 200


def test_metrics_have_the_documented_names(client, photos):
    client.post("/predict", files={"file": ("c.jpg", photos["coffee.jpg"])})
    response = client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    samples = metric_samples(response.text)
    for name in (
        "effnet_requests_total",
        "effnet_request_duration_seconds_bucket",
        "effnet_queue_wait_seconds_bucket",
        "effnet_inference_duration_seconds_bucket",
        "effnet_batch_size_bucket",
        "effnet_queue_depth",
        "effnet_images_total",
        "effnet_rejected_total",
        "effnet_model_info",
    ):
        assert name in samples, name
    (info,) = samples["effnet_model_info"]
    assert info.labels == {
        "model": "efficientnet-lite0",
        "device": "cpu",
        "dtype": "float32",
        "backend": "onnxruntime",
    }
    assert info.value == 1
    codes = {(s.labels["endpoint"], s.labels["code"]) for s in samples["effnet_requests_total"]}
    assert ("/predict", "200") in codes


def test_promtool_accepts_the_metrics(client, photos):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus)")
    client.post("/predict", files={"file": ("c.jpg", photos["coffee.jpg"])})
    text = client.get("/metrics").text
    result = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_an_idle_kept_alive_connection_outlives_uvicorns_default(service):
    # uvicorn closes idle connections after 5 s by default; behind a load balancer with a longer idle
    # timeout that races with reuse. EFFNET_KEEP_ALIVE_S (default 75) keeps the connection open.
    conn = http.client.HTTPConnection("127.0.0.1", service.port, timeout=10)
    try:
        conn.request("GET", "/healthz")
        assert conn.getresponse().read() == b'{"status":"ok"}'
        sock = conn.sock
        time.sleep(6.0)
        conn.request("GET", "/healthz")  # on the same socket: http.client does not reconnect by itself
        assert conn.sock is sock
        response = conn.getresponse()  # RemoteDisconnected if the server closed the idle connection
        assert response.status == 200 and response.read() == b'{"status":"ok"}'
    finally:
        conn.close()
