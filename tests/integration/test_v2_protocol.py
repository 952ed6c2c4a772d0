"""The Open Inference Protocol (KServe V2), REST and gRPC, driven by Triton's own clients (``tritonclient``)
against one real Lite0 server: health, metadata, inference with encoded images (binary and JSON), with
preprocessed FP32/UINT8 tensors and with ``class_count``, several images per request, the documented error
for each kind of bad request, overload and deadlines, and the same numbers as ``/predict`` and ``/features``.

One server for the module (the API key is set, so every call carries it), with a small queue and batch so
overload is cheap to reach.
"""

from __future__ import annotations

import asyncio
import base64
import io
import threading
import time

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.grpc.aio as tgrpc_aio
import tritonclient.http as thttp
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from model import get_efficientnet_config
from service.core.imaging import Preprocessor
from tests.helpers.server import ServiceProcess, free_port

MODEL = "efficientnet-lite0"
KEY = "v2-test-key"
BEARER = {"Authorization": f"Bearer {KEY}"}
GRPC_AUTH = {"authorization": f"Bearer {KEY}"}
MAX_QUEUE = 16
MAX_IMAGES = 8
MAX_BODY = 2 * 1024 * 1024
NAMES = ("coffee.jpg", "chelsea.jpg", "grace_hopper.jpg")


@pytest.fixture(scope="module")
def server():
    grpc_port = free_port()
    env = {
        "EFFNET_MODEL": MODEL,
        "EFFNET_GRPC_PORT": str(grpc_port),
        "EFFNET_API_KEY": KEY,
        "EFFNET_MAX_BATCH_SIZE": "4",
        "EFFNET_MAX_QUEUE": str(MAX_QUEUE),
        "EFFNET_MAX_IMAGES_PER_REQUEST": str(MAX_IMAGES),
        "EFFNET_MAX_BODY_BYTES": str(MAX_BODY),
        # One decoding thread on any machine: the deadline test queues slow images ahead of a fast one.
        "EFFNET_DECODE_THREADS": "1",
    }
    with ServiceProcess(env) as service:
        service.grpc_url = f"127.0.0.1:{grpc_port}"
        yield service


@pytest.fixture(scope="module")
def http_client(server):
    client = thttp.InferenceServerClient(server.url.removeprefix("http://"), concurrency=4)
    yield client
    client.close()


@pytest.fixture(scope="module")
def grpc_client(server):
    client = tgrpc.InferenceServerClient(server.grpc_url)
    yield client
    client.close()


@pytest.fixture(scope="module")
def reference(server, photos):
    """What /predict (logits) and /features return for each photo, one request each."""
    out = {}
    with httpx.Client(base_url=server.url, headers=BEARER, timeout=30) as client:
        for name in NAMES:
            files = {"file": (name, photos[name], "image/jpeg")}
            predicted = client.post("/predict", params={"logits": "true", "top_k": 1}, files=files).json()
            features = client.post("/features", files=files).json()
            result = predicted["results"][0]
            out[name] = {
                "logits": np.array(result["logits"], dtype=np.float32),
                "top1": result["top_k"][0]["index"],
                "features": np.array(features["results"][0]["embedding"], dtype=np.float32),
            }
    return out


@pytest.fixture(scope="module")
def pixels(photos):
    """Each photo as the server's own preprocessing makes it: uint8 [3, 224, 224]."""
    spec = get_efficientnet_config(MODEL).preprocess
    pre = Preprocessor(spec, max_pixels=64_000_000)
    return {name: pre(photos[name]) for name in NAMES}


def normalised(batch: np.ndarray) -> np.ndarray:
    spec = get_efficientnet_config(MODEL).preprocess
    mean = np.asarray(spec.mean, dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(spec.std, dtype=np.float32).reshape(1, 3, 1, 1)
    return ((batch.astype(np.float32) / np.float32(255.0)) - mean) / std


def metric(server, name: str, **labels: str) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def image_input(module, photos, names=NAMES, *, binary: bool = True):
    data = np.array([photos[n] for n in names], dtype=object)
    tensor = module.InferInput("image", [len(names)], "BYTES")
    if module is thttp:
        tensor.set_data_from_numpy(data, binary_data=binary)
    else:
        tensor.set_data_from_numpy(data)
    return tensor


def assert_matches_reference(result, reference, names=NAMES):
    logits = result.as_numpy("logits")
    features = result.as_numpy("features")
    probabilities = result.as_numpy("probabilities")
    assert logits.shape == (len(names), 1000) and logits.dtype == np.float32
    assert features.shape == (len(names), 1280)
    for i, name in enumerate(names):
        np.testing.assert_allclose(logits[i], reference[name]["logits"], atol=1e-5, rtol=0)
        np.testing.assert_allclose(features[i], reference[name]["features"], atol=1e-5, rtol=0)
        assert int(np.argmax(logits[i])) == reference[name]["top1"]
        expected = np.exp(logits[i] - logits[i].max())
        np.testing.assert_allclose(probabilities[i], expected / expected.sum(), atol=1e-6)


# -- health and metadata -----------------------------------------------------------------------------------
def test_http_health_and_metadata(server, http_client):
    """Liveness, readiness and metadata over REST, with tritonclient and as raw JSON; an unknown model or
    version is 404 with the protocol's {"error": ...} body."""
    assert http_client.is_server_live()
    assert http_client.is_server_ready()
    assert http_client.is_model_ready(MODEL) and http_client.is_model_ready(MODEL, "1")
    meta = http_client.get_server_metadata()
    assert meta["name"] == "effnet-serve" and {"binary_tensor_data", "classification"} <= set(meta["extensions"])
    model = http_client.get_model_metadata(MODEL, "1")
    assert model["name"] == MODEL and model["versions"] == ["1"]
    assert {(t["name"], t["datatype"], tuple(t["shape"])) for t in model["inputs"]} == {
        ("image", "BYTES", (-1,)),
        ("input", "FP32", (-1, 3, 224, 224)),
    }
    assert {(t["name"], tuple(t["shape"])) for t in model["outputs"]} == {
        ("logits", (-1, 1000)),
        ("probabilities", (-1, 1000)),
        ("features", (-1, 1280)),
    }
    assert httpx.get(f"{server.url}/v2/health/live").json() == {"live": True}
    assert httpx.get(f"{server.url}/v2/models/{MODEL}/ready").json() == {"name": MODEL, "ready": True}
    for path in ("/v2/models/resnet50", "/v2/models/resnet50/ready", f"/v2/models/{MODEL}/versions/7"):
        response = httpx.get(f"{server.url}{path}")
        assert response.status_code == 404, path
        assert set(response.json()) == {"error"} and "unknown" in response.json()["error"]
    with pytest.raises(InferenceServerException) as info:
        http_client.get_model_metadata("resnet50")
    assert info.value.status() == "404"


def test_grpc_health_and_metadata(server, grpc_client):
    """The same over gRPC, plus the standard grpc.health.v1 service Kubernetes' gRPC probes call."""
    assert grpc_client.is_server_live() and grpc_client.is_server_ready()
    assert grpc_client.is_model_ready(MODEL) and grpc_client.is_model_ready(MODEL, "1")
    meta = grpc_client.get_server_metadata(as_json=True)
    assert meta["name"] == "effnet-serve" and "classification" in meta["extensions"]
    model = grpc_client.get_model_metadata(MODEL, as_json=True)
    assert [t["name"] for t in model["inputs"]] == ["image", "input"]
    assert {t["name"]: [int(d) for d in t["shape"]] for t in model["outputs"]} == {
        "logits": [-1, 1000], "probabilities": [-1, 1000], "features": [-1, 1280]
    }
    with pytest.raises(InferenceServerException) as info:
        grpc_client.get_model_metadata("resnet50")
    assert info.value.status() == "StatusCode.NOT_FOUND"
    with grpc.insecure_channel(server.grpc_url) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", "readiness", "liveness", "inference.GRPCInferenceService"):
            status = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING, name
        with pytest.raises(grpc.RpcError) as rpc:
            health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=5)
        assert rpc.value.code() == grpc.StatusCode.NOT_FOUND


# -- inference ---------------------------------------------------------------------------------------------
def test_http_binary_images_match_predict_and_features(http_client, photos, reference):
    """Three photos in one binary-data request: every output equals /predict's logits and /features'
    embedding for the same photo (1e-5), same top-1, and probabilities are their softmax; the id is echoed."""
    result = http_client.infer(MODEL, [image_input(thttp, photos)], request_id="req-42", headers={**BEARER})
    assert result.get_response()["id"] == "req-42"
    assert result.get_response()["model_version"] == "1"
    assert_matches_reference(result, reference)


def test_http_json_images_and_outputs(server, http_client, photos, reference):
    """Images as base64 in plain JSON (no binary data at all) give the same numbers, as JSON data."""
    data = np.array([base64.b64encode(photos[n]) for n in NAMES], dtype=object)
    tensor = thttp.InferInput("image", [len(NAMES)], "BYTES")
    tensor.set_data_from_numpy(data, binary_data=False)
    outputs = [thttp.InferRequestedOutput(n, binary_data=False) for n in ("logits", "probabilities", "features")]
    result = http_client.infer(MODEL, [tensor], outputs=outputs, headers={**BEARER})
    assert all("data" in o for o in result.get_response()["outputs"])
    assert_matches_reference(result, reference)
    # And by hand, as curl would send it: [N, 1] shape, one output.
    body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1, 1],
                        "data": [base64.b64encode(photos["coffee.jpg"]).decode()]}],
            "outputs": [{"name": "logits"}]}
    response = httpx.post(f"{server.url}/v2/models/{MODEL}/infer", json=body, headers=BEARER, timeout=30)
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    out = response.json()["outputs"]
    assert [o["name"] for o in out] == ["logits"] and out[0]["shape"] == [1, 1000]
    np.testing.assert_allclose(out[0]["data"], reference["coffee.jpg"]["logits"], atol=1e-5)


def test_grpc_images_match_predict_and_features(grpc_client, photos, reference):
    """Three photos in one gRPC ModelInfer (raw_input_contents): same numbers as /predict and /features."""
    result = grpc_client.infer(MODEL, [image_input(tgrpc, photos)], request_id="g-1", headers=GRPC_AUTH)
    assert result.get_response().id == "g-1"
    assert_matches_reference(result, reference)


@pytest.mark.parametrize("dtype", ["FP32", "UINT8"])
def test_preprocessed_tensor_input_matches_predict(http_client, grpc_client, pixels, reference, dtype):
    """The ``input`` tensor (pixels as the server's preprocessing makes them, raw UINT8 or normalised FP32)
    skips decoding and gives /predict's logits, over REST and gRPC."""
    batch = np.stack([pixels[n] for n in NAMES])
    data = normalised(batch) if dtype == "FP32" else batch
    for module, client, headers in ((thttp, http_client, BEARER), (tgrpc, grpc_client, GRPC_AUTH)):
        tensor = module.InferInput("input", list(data.shape), dtype)
        tensor.set_data_from_numpy(data)
        result = client.infer(MODEL, [tensor], headers={**(headers or {})})
        assert_matches_reference(result, reference)


def test_fp32_input_off_the_pixel_grid_is_refused(http_client, pixels):
    """An FP32 tensor that is not normalised 8-bit pixels is a 400 saying so, never silently rounded."""
    data = normalised(pixels["coffee.jpg"][None]) + np.float32(0.004)
    tensor = thttp.InferInput("input", list(data.shape), "FP32")
    tensor.set_data_from_numpy(data)
    with pytest.raises(InferenceServerException) as info:
        http_client.infer(MODEL, [tensor], headers={**BEARER})
    assert info.value.status() == "400" and "UINT8" in info.value.message()


def test_classification_extension(http_client, grpc_client, photos, reference):
    """class_count=k gives BYTES [N, k] of "score:index:label", best first, over REST and gRPC; the
    score is the requested output's own value (probability or logit)."""
    labels = {"coffee.jpg": "espresso"}
    for module, client, headers in ((thttp, http_client, BEARER), (tgrpc, grpc_client, GRPC_AUTH)):
        outputs = [module.InferRequestedOutput("probabilities", class_count=3),
                   module.InferRequestedOutput("logits", class_count=2)]
        result = client.infer(MODEL, [image_input(module, photos)], outputs=outputs, headers={**(headers or {})})
        probs = result.as_numpy("probabilities")
        logits = result.as_numpy("logits")
        assert probs.shape == (3, 3) and logits.shape == (3, 2)
        for i, name in enumerate(NAMES):
            rows = [e.decode().split(":", 2) for e in probs[i]]
            scores = [float(r[0]) for r in rows]
            assert scores == sorted(scores, reverse=True)
            assert int(rows[0][1]) == reference[name]["top1"]
            assert abs(float(logits[i][0].decode().split(":")[0]) - reference[name]["logits"].max()) < 1e-5
            if name in labels:
                assert rows[0][2] == labels[name]
        assert result.as_numpy("features") is None  # not requested, not returned


# -- errors ------------------------------------------------------------------------------------------------
def test_errors_have_the_documented_status(server, http_client, grpc_client, photos):
    """Unknown model 404/NOT_FOUND, bad image 400/INVALID_ARGUMENT, oversized body and too many images
    413/RESOURCE_EXHAUSTED, no key 401/UNAUTHENTICATED; REST bodies are {"error": "..."}."""
    good = image_input(thttp, photos, ["coffee.jpg"])
    bad = thttp.InferInput("image", [1], "BYTES")
    bad.set_data_from_numpy(np.array([b"not an image at all"], dtype=object))
    huge = thttp.InferInput("image", [1], "BYTES")
    huge.set_data_from_numpy(np.array([b"\xff" * (MAX_BODY + 1024)], dtype=object))
    many = image_input(thttp, photos, ["coffee.jpg"] * (MAX_IMAGES + 1))
    http_cases = [
        ("resnet50", good, BEARER, "404"),
        (MODEL, bad, BEARER, "400"),
        (MODEL, huge, BEARER, "413"),
        (MODEL, many, BEARER, "413"),
        (MODEL, good, {}, "401"),
        (MODEL, good, {"Authorization": "Bearer wrong"}, "401"),
    ]
    for model, tensor, headers, status in http_cases:
        with pytest.raises(InferenceServerException) as info:
            http_client.infer(model, [tensor], headers={**(headers or {})})
        assert info.value.status() == status, (model, status, info.value.message())
        assert isinstance(info.value.message(), str) and info.value.message()

    def grpc_image(blobs):
        tensor = tgrpc.InferInput("image", [len(blobs)], "BYTES")
        tensor.set_data_from_numpy(np.array(blobs, dtype=object))
        return tensor

    grpc_cases = [
        ("resnet50", grpc_image([photos["coffee.jpg"]]), GRPC_AUTH, "NOT_FOUND"),
        (MODEL, grpc_image([b"not an image at all"]), GRPC_AUTH, "INVALID_ARGUMENT"),
        (MODEL, grpc_image([b"\xff" * (MAX_BODY + 1024)]), GRPC_AUTH, "RESOURCE_EXHAUSTED"),
        (MODEL, grpc_image([photos["coffee.jpg"]] * (MAX_IMAGES + 1)), GRPC_AUTH, "RESOURCE_EXHAUSTED"),
        (MODEL, grpc_image([photos["coffee.jpg"]]), None, "UNAUTHENTICATED"),
    ]
    for model, tensor, headers, code in grpc_cases:
        with pytest.raises(InferenceServerException) as info:
            grpc_client.infer(model, [tensor], headers={**(headers or {})})
        assert info.value.status() == f"StatusCode.{code}", (model, code, info.value.message())
    # A malformed request body by hand: the protocol's error shape, with the reason.
    response = httpx.post(f"{server.url}/v2/models/{MODEL}/infer", content=b"{not json", headers=BEARER)
    assert response.status_code == 400 and "JSON" in response.json()["error"]
    response = httpx.post(f"{server.url}/v2/models/{MODEL}/infer", headers=BEARER,
                          json={"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1], "data": [1]}]})
    assert response.status_code == 400 and "pixels" in response.json()["error"]


def test_full_queue_is_unavailable_with_retry_advice(server, photos):
    """Past the queue bound, REST answers 503 with Retry-After and gRPC UNAVAILABLE with a retry-after
    trailer, at once; the admitted requests are still answered."""
    blobs = [photos["coffee.jpg"]] * 4  # 16 concurrent requests of 4 images against a queue of 16

    async def grpc_burst():
        async with grpc.aio.insecure_channel(server.grpc_url) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            request = service_pb2.ModelInferRequest(model_name=MODEL)
            request.inputs.add(name="image", datatype="BYTES", shape=[len(blobs)])
            request.raw_input_contents.append(tgrpc.serialize_byte_tensor(np.array(blobs, dtype=object)).item())
            metadata = tuple(GRPC_AUTH.items())

            async def one():
                call = stub.ModelInfer(request, metadata=metadata, timeout=60)
                try:
                    await call
                    return "OK", None
                except grpc.aio.AioRpcError as exc:
                    return exc.code().name, dict(exc.trailing_metadata() or ())

            return await asyncio.gather(*(one() for _ in range(16)))

    outcomes = asyncio.run(grpc_burst())
    codes = [c for c, _ in outcomes]
    assert set(codes) <= {"OK", "UNAVAILABLE"}, codes
    assert "OK" in codes and "UNAVAILABLE" in codes, codes
    assert all(trailers.get("retry-after") == "1" for c, trailers in outcomes if c == "UNAVAILABLE")

    body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [4],
                        "data": [base64.b64encode(b).decode() for b in blobs]}], "outputs": [{"name": "logits"}]}
    results: list[httpx.Response] = []

    def post():
        with httpx.Client(timeout=60) as client:
            results.append(client.post(f"{server.url}/v2/models/{MODEL}/infer", json=body, headers=BEARER))

    threads = [threading.Thread(target=post) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    statuses = [r.status_code for r in results]
    assert set(statuses) <= {200, 503} and 200 in statuses and 503 in statuses, statuses
    refused = [r for r in results if r.status_code == 503]
    assert all(r.headers.get("retry-after") == "1" and "queue" in r.json()["error"] for r in refused)


def slow_png() -> bytes:
    """A 9-megapixel PNG (a smooth gradient, 330 kB): ~0.15 s to decode and resize, no JPEG draft mode."""
    x = np.linspace(0, 255, 3000, dtype=np.float32)
    pixels = np.stack([np.add.outer(x, x) / 2, np.add.outer(x, x[::-1]) / 2, np.tile(x, (3000, 1))], -1)
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_grpc_deadline_shorter_than_queue_wait(server, photos):
    """A call whose gRPC deadline passes while its image waits behind others (admitted, counted in the queue)
    gets DEADLINE_EXCEEDED, the server counts the timeout, and its image leaves the queue: only the other
    calls' images are ever run."""
    filler = [slow_png()] * 2  # 3 x 2 ahead of it on the one decoding thread: ~1 s of work

    async def scenario():
        client = tgrpc_aio.InferenceServerClient(server.grpc_url)
        try:
            def tensor(blobs):
                t = tgrpc_aio.InferInput("image", [len(blobs)], "BYTES")
                t.set_data_from_numpy(np.array(blobs, dtype=object))
                return t

            fillers = [asyncio.ensure_future(client.infer(MODEL, [tensor(filler)], headers=GRPC_AUTH))
                       for _ in range(3)]
            await asyncio.sleep(0.05)
            try:
                await client.infer(MODEL, [tensor([photos["coffee.jpg"]])], headers=GRPC_AUTH, client_timeout=0.2)
                late = None
            except InferenceServerException as exc:
                late = exc.status()
            done = await asyncio.gather(*fillers)
            return late, done
        finally:
            await client.close()

    images_before = metric(server, "effnet_images_total")
    timeouts_before = metric(server, "effnet_rejected_total", reason="timeout")
    late, done = asyncio.run(scenario())
    assert late == "StatusCode.DEADLINE_EXCEEDED"
    assert all(r.as_numpy("logits").shape == (2, 1000) for r in done)
    deadline = time.monotonic() + 5
    while metric(server, "effnet_rejected_total", reason="timeout") <= timeouts_before:
        assert time.monotonic() < deadline, "the server never counted the timed-out call"
        time.sleep(0.05)
    assert metric(server, "effnet_images_total") - images_before == 6  # the late image never ran
    assert metric(server, "effnet_queue_depth") == 0


def test_request_ids_and_metrics_labels(server, http_client, grpc_client, photos):
    """X-Request-ID is echoed on V2 REST; /metrics counts V2 routes by template and gRPC calls by method."""
    response = httpx.get(f"{server.url}/v2/models/{MODEL}", headers={"X-Request-ID": "abc-123"})
    assert response.headers["x-request-id"] == "abc-123"
    assert httpx.get(f"{server.url}/v2/models/resnet50").status_code == 404
    grpc_client.infer(MODEL, [image_input(tgrpc, photos, ["coffee.jpg"])], headers=GRPC_AUTH)
    with pytest.raises(InferenceServerException):
        grpc_client.infer(MODEL, [image_input(tgrpc, photos, ["coffee.jpg"])])  # no key
    http_client.infer(MODEL, [image_input(thttp, photos, ["coffee.jpg"])], headers={**BEARER}, model_version="1")
    assert metric(server, "effnet_requests_total", endpoint="/inference.GRPCInferenceService/ModelInfer",
                  code="200") >= 1
    assert metric(server, "effnet_requests_total", endpoint="/v2/models/{model}/infer", code="200") >= 1
    assert metric(server, "effnet_requests_total", endpoint="/v2/models/{model}", code="404") >= 1
    assert metric(server, "effnet_requests_total", endpoint="/inference.GRPCInferenceService/ModelInfer",
                  code="401") >= 1
    text = httpx.get(f"{server.url}/metrics").text
    assert "resnet50" not in text  # a model name from a path never becomes a label value
