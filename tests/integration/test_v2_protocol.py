"""The Open Inference Protocol (KServe V2), REST and gRPC, driven by Triton's own clients (``tritonclient``)
against one real Lite0 server: health, metadata, inference with encoded images (binary and JSON), with
preprocessed FP32/UINT8 tensors (FP32 from a client's own float resize runs as sent) and with
``class_count``, several images per request, the documented error for each kind of bad request and for a
hostile corpus, errors outside the known routes, the statistics extension, overload and deadlines, and the
same numbers as ``/predict`` and ``/features``.

One server for the module (the API key is set, so every call carries it), with a small queue and batch so
overload is cheap to reach.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
import time

import grpc
import httpx
import numpy as np
import pytest
import torch
import tritonclient.grpc as tgrpc
import tritonclient.grpc.aio as tgrpc_aio
import tritonclient.http as thttp
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from model import EfficientNet, default_weights_path, get_efficientnet_config
from service.core.imaging import Preprocessor
from tests.helpers.images import float_preprocessed
from tests.helpers.metrics import metric as scrape
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
    return scrape(server.url, name, **labels)


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
        ("cam", (-1, 7, 7)),  # the class activation map on the 7 x 7 feature map, only when named
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
        "logits": [-1, 1000], "probabilities": [-1, 1000], "features": [-1, 1280], "cam": [-1, 7, 7]
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


@pytest.fixture(scope="module")
def eager():
    """The reference model: eager float32 Lite0 (dynamic padding, BatchNorm unfused), as the package has it."""
    return EfficientNet.from_pretrained(MODEL, default_weights_path(MODEL)).eval()


@pytest.fixture(scope="module")
def float_batch(photos):
    """The photos through a client's own float preprocessing (antialiased bicubic resize of the float
    tensor, normalised): values on no 8-bit grid."""
    spec = get_efficientnet_config(MODEL).preprocess
    return np.concatenate([float_preprocessed(photos[n], spec.mean, spec.std) for n in NAMES])


def test_float_preprocessed_fp32_input_runs_as_sent(server, http_client, grpc_client, eager, float_batch):
    """FP32 tensors from the client's own float resize (not normalised 8-bit pixels) are the network's
    input as sent: over REST JSON, REST binary and gRPC, logits and features within 1e-4 of the eager
    reference model on the same tensor; NaN is a 400 saying so."""
    with torch.inference_mode():
        features, logits = (t.numpy() for t in eager.forward_features_and_logits(torch.from_numpy(float_batch)))
    spec = get_efficientnet_config(MODEL).preprocess
    pixels = (float_batch * np.asarray(spec.std, np.float32).reshape(1, 3, 1, 1)
              + np.asarray(spec.mean, np.float32).reshape(1, 3, 1, 1)) * 255
    assert np.abs(pixels - np.rint(pixels)).max() > 0.1  # really off the grid the old check demanded
    for module, client, headers in ((thttp, http_client, BEARER), (tgrpc, grpc_client, GRPC_AUTH)):
        tensor = module.InferInput("input", list(float_batch.shape), "FP32")
        tensor.set_data_from_numpy(float_batch)  # binary (raw contents)
        result = client.infer(MODEL, [tensor], headers={**headers})
        np.testing.assert_allclose(result.as_numpy("logits"), logits, atol=1e-4, rtol=0)
        np.testing.assert_allclose(result.as_numpy("features"), features, atol=1e-4, rtol=0)
    # Plain JSON, one image (the float32 values in their shortest exact decimal form: three images as
    # JSON would pass this server's 2 MB body limit).
    data = ",".join(float_batch[:1].ravel().astype(str))
    body = ('{"inputs":[{"name":"input","datatype":"FP32","shape":[1,3,224,224],"data":[' + data + "]}],"
            '"outputs":[{"name":"logits"},{"name":"features"}]}').encode()
    assert len(body) < MAX_BODY
    response = httpx.post(f"{server.url}/v2/models/{MODEL}/infer", content=body, headers=BEARER, timeout=60)
    assert response.status_code == 200, response.text[:300]
    out = {o["name"]: np.array(o["data"], dtype=np.float32) for o in response.json()["outputs"]}
    np.testing.assert_allclose(out["logits"], logits[0], atol=1e-4, rtol=0)
    np.testing.assert_allclose(out["features"], features[0], atol=1e-4, rtol=0)
    bad = float_batch[:1].copy()
    bad[0, 0, 0, 0] = np.nan
    tensor = thttp.InferInput("input", list(bad.shape), "FP32")
    tensor.set_data_from_numpy(bad)
    with pytest.raises(InferenceServerException) as info:
        http_client.infer(MODEL, [tensor], headers={**BEARER})
    assert info.value.status() == "400" and "NaN" in info.value.message()


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
        gone = metric(server, "effnet_rejected_total", reason="client_gone")
        assert time.monotonic() < deadline, f"the server never counted the timed-out call (client_gone: {gone})"
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
    # V2 routes count under their own templates, the versioned one (tritonclient's model_version) too.
    versioned = "/v2/models/{model_name}/versions/{model_version}/infer"
    assert metric(server, "effnet_requests_total", endpoint=versioned, code="200") >= 1
    assert metric(server, "effnet_requests_total", endpoint="/v2/models/{model_name}", code="404") >= 1
    assert metric(server, "effnet_requests_total", endpoint="/inference.GRPCInferenceService/ModelInfer",
                  code="401") >= 1
    text = httpx.get(f"{server.url}/metrics").text
    assert "resnet50" not in text  # a model name from a path never becomes a label value


# -- hostile requests --------------------------------------------------------------------------------------
def _json(value) -> bytes:
    return json.dumps(value).encode()


def _tensor(name="input", datatype="FP32", shape=(1, 3, 224, 224), **extra):
    return {"name": name, "datatype": datatype, "shape": list(shape), **extra}


def _binary(head: dict, blob: bytes, declared: str | None = None) -> tuple[bytes, dict[str, str]]:
    text = _json(head)
    return text + blob, {HEADER: declared if declared is not None else str(len(text))}


HEADER = "Inference-Header-Content-Length"
DEEP = b"[" * 100_000 + b"]" * 100_000
_IMAGE_HEAD = {"inputs": [_tensor("image", "BYTES", [1], parameters={"binary_data_size": 8})]}
HOSTILE_REST = {
    # name: (body, extra headers, status, a word the message must hold)
    "header length beyond the body": (*_binary(_IMAGE_HEAD, b"\x04\x00\x00\x00abcd", "100000"), 400, HEADER),
    "header length negative": (*_binary(_IMAGE_HEAD, b"\x04\x00\x00\x00abcd", "-5"), 400, HEADER),
    "header length not a number": (*_binary(_IMAGE_HEAD, b"\x04\x00\x00\x00abcd", "12abc"), 400, HEADER),
    "binary shorter than binary_data_size": (*_binary(
        {"inputs": [_tensor(parameters={"binary_data_size": 602112})]}, b"\x00" * 1000), 400, "binary_data_size"),
    "BYTES length prefix of 4 GB": (*_binary(_IMAGE_HEAD, b"\xff\xff\xff\xffabcd"), 400, "4294967295"),
    "shape of 2 elements, 1 sent": (_json({"inputs": [_tensor(shape=[2], data=[1.0])]}), {}, 400, "needs 2"),
    "shape [1e9, 3, 224, 224] with 16 bytes": (*_binary(
        {"inputs": [_tensor(shape=[10**9, 3, 224, 224], parameters={"binary_data_size": 16})]}, b"\x00" * 16),
        400, "too large"),
    "shape 1e9 as a float": (_json({"inputs": [_tensor(shape=[1e9, 3, 224, 224], data=[0.0] * 4)]}), {}, 400,
                             "shape"),
    "negative shape": (_json({"inputs": [_tensor(shape=[-1, 3, 224, 224], data=[0.0])]}), {}, 400, "shape"),
    "FP64": (*_binary({"inputs": [_tensor(datatype="FP64", shape=[1, 3, 4, 4],
                                          parameters={"binary_data_size": 384})]}, b"\x00" * 384), 400, "FP64"),
    "strings in FP32 data": (_json({"inputs": [_tensor(shape=[2], data=["1.0", "x"])]}), {}, 400, "numbers"),
    "inputs null": (_json({"inputs": None}), {}, 400, "inputs"),
    "10,000 inputs": (_json({"inputs": [_tensor(shape=[1], data=[0.0])] * 10_000}), {}, 400, "inputs"),
    "class_count 1e9": (_json({"inputs": [_tensor("image", "BYTES", [1], data=["aGVsbG8="])],
                               "outputs": [{"name": "logits", "parameters": {"classification": 10**9}}]}), {}, 400,
                        "classification"),
    "class_count 1e9 as a float": (_json({"inputs": [_tensor("image", "BYTES", [1], data=["aGVsbG8="])],
                                          "outputs": [{"name": "logits", "parameters": {"classification": 1e9}}]}),
                                   {}, 400, "classification"),
    "nesting 100,000 deep": (DEEP, {}, 400, "nests"),
    "nesting 100,000 deep in data": (b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1], "data": '
                                     + DEEP + b"}]}", {}, 400, "nests"),
    "not JSON": (b"\x00\xffnot json at all", {}, 400, "JSON"),
}


def _infer_message(name: str, datatype: str, shape: list[int], raw: list[bytes], model: str = MODEL):
    request = service_pb2.ModelInferRequest(model_name=model)
    if name:
        request.inputs.add(name=name, datatype=datatype, shape=shape)
    request.raw_input_contents.extend(raw)
    return request


def _grpc_hostile() -> dict:
    many = service_pb2.ModelInferRequest(model_name=MODEL)
    for _ in range(10_000):
        many.inputs.add(name="input", datatype="FP32", shape=[1])
    class_count = _infer_message("image", "BYTES", [1], [b"\x05\x00\x00\x00hello"])
    class_count.outputs.add(name="logits").parameters["classification"].int64_param = 10**9
    return {
        # name: (request, code, a word the message must hold)
        "raw contents shorter than the shape": (_infer_message("input", "FP32", [1, 3, 224, 224], [b"\x00" * 16]),
                                                "INVALID_ARGUMENT", "bytes"),
        "BYTES prefix past the end": (_infer_message("image", "BYTES", [1], [b"\x10\x00\x00\x00abc"]),
                                      "INVALID_ARGUMENT", "remain"),
        "BYTES prefix of 4 GB": (_infer_message("image", "BYTES", [1], [b"\xff\xff\xff\xffabc"]),
                                 "INVALID_ARGUMENT", "remain"),
        "two raw contents for one input": (_infer_message("image", "BYTES", [1], [b"\x01\x00\x00\x00a"] * 2),
                                           "INVALID_ARGUMENT", "raw_input_contents"),
        "no inputs": (_infer_message("", "", [], []), "INVALID_ARGUMENT", "input"),
        "10,000 inputs": (many, "INVALID_ARGUMENT", "inputs"),
        "class_count 1e9": (class_count, "INVALID_ARGUMENT", "classification"),
        "unknown model": (_infer_message("image", "BYTES", [1], [b"\x01\x00\x00\x00a"], "resnet50"), "NOT_FOUND",
                          "resnet50"),
        "garbage image": (_infer_message("image", "BYTES", [1], [b"\x0c\x00\x00\x00not an image"]),
                          "INVALID_ARGUMENT", "image"),
        "shape [1e9, 3, 224, 224] with 16 bytes": (_infer_message("input", "FP32", [10**9, 3, 224, 224],
                                                                  [b"\x00" * 16]), "INVALID_ARGUMENT", "too large"),
        "negative shape": (_infer_message("input", "FP32", [-1, 3, 224, 224], [b"\x00" * 16]), "INVALID_ARGUMENT",
                           "shape"),
    }


def _assert_still_serving(server, http_client, photos) -> None:
    result = http_client.infer(MODEL, [image_input(thttp, photos, ["coffee.jpg"])], headers={**BEARER})
    assert result.as_numpy("logits").shape == (1, 1000)
    logs = server.logs()
    assert "Traceback" not in logs and "unhandled error" not in logs, logs[-3000:]


def test_hostile_rest_requests_are_4xx_with_a_message(server, http_client, photos):
    """Each request of the hostile corpus over REST is answered 4xx in the protocol's shape with a message
    that says what is wrong; no allocation for a shape the data does not back, no traceback in the log,
    and the server answers normally right afterwards."""
    url = f"{server.url}/v2/models/{MODEL}/infer"
    with httpx.Client(headers=BEARER, timeout=60) as client:
        for name, (body, headers, status, word) in HOSTILE_REST.items():
            response = client.post(url, content=body, headers=headers)
            assert response.status_code == status, (name, response.text[:300])
            message = response.json()["error"]
            assert isinstance(message, str) and word.lower() in message.lower(), (name, message)
    _assert_still_serving(server, http_client, photos)


def test_hostile_grpc_requests_are_refused_with_a_status(server, http_client, photos):
    """The gRPC side of the corpus: INVALID_ARGUMENT / NOT_FOUND with a message, never INTERNAL."""
    with grpc.insecure_channel(server.grpc_url, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        for name, (request, code, word) in _grpc_hostile().items():
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfer(request, metadata=tuple(GRPC_AUTH.items()), timeout=60)
            assert info.value.code() == getattr(grpc.StatusCode, code), (name, info.value.details())
            assert word.lower() in (info.value.details() or "").lower(), (name, info.value.details())
    _assert_still_serving(server, http_client, photos)


def test_errors_outside_the_known_routes_are_in_the_protocols_shape(server, http_client):
    """An unknown /v2 path (404), a wrong method (405) and an unsupported encoding (415) answer
    {"error": "<message>"}; tritonclient shows the message (it used to fail formatting a dict)."""
    cases = [
        httpx.get(f"{server.url}/v2/models/{MODEL}/nothing-here"),
        httpx.get(f"{server.url}/v2/repository/nothing-here"),
        httpx.delete(f"{server.url}/v2/models/{MODEL}/infer", headers=BEARER),
        httpx.post(f"{server.url}/v2/models/{MODEL}/infer", content=b"{}",
                   headers={**BEARER, "Content-Encoding": "br"}),
    ]
    assert [r.status_code for r in cases] == [404, 404, 405, 415]
    for response in cases:
        assert set(response.json()) == {"error"} and isinstance(response.json()["error"], str), response.text
    with pytest.raises(InferenceServerException) as info:
        http_client.load_model(MODEL)  # the repository extension: behind the API key
    assert info.value.status() == "401" and isinstance(info.value.message(), str)
    with pytest.raises(InferenceServerException) as info:
        http_client.load_model(MODEL, headers=BEARER)  # and refused: EFFNET_MODEL_CONTROL is none
    assert info.value.status() == "403" and "EFFNET_MODEL_CONTROL is none" in info.value.message()
    # Outside /v2 the service's own shape stays.
    assert set(httpx.get(f"{server.url}/nothing-here").json()["error"]) >= {"code", "message"}


# -- statistics --------------------------------------------------------------------------------------------
def _stats(entry: dict) -> dict:
    """tritonclient's JSON (HTTP as sent; gRPC's as_json has uint64 as strings) as plain integers."""
    def number(value):
        return int(value) if value is not None else 0

    stats = entry["inference_stats"]
    return {
        "inference_count": number(entry.get("inference_count")),
        "execution_count": number(entry.get("execution_count")),
        **{f"{k}_{f}": number(stats.get(k, {}).get(f)) for k in
           ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output") for f in ("count", "ns")},
    }


def test_statistics_extension_counts_exactly(server, http_client, grpc_client, photos):
    """tritonclient's get_inference_statistics over HTTP and gRPC after a known number of requests: exact
    counts (one request of one image is one inference, one batch when sent one at a time; a garbage image
    is one failure) and durations that add up; "statistics" is listed in the server's extensions."""
    assert "statistics" in http_client.get_server_metadata()["extensions"]
    before = _stats(http_client.get_inference_statistics(MODEL)["model_stats"][0])
    for _ in range(3):
        http_client.infer(MODEL, [image_input(thttp, photos, ["coffee.jpg"])], headers={**BEARER})
    for _ in range(2):
        grpc_client.infer(MODEL, [image_input(tgrpc, photos, ["chelsea.jpg"])], headers=GRPC_AUTH)
    bad = thttp.InferInput("image", [1], "BYTES")
    bad.set_data_from_numpy(np.array([b"not an image at all"], dtype=object))
    with pytest.raises(InferenceServerException):
        http_client.infer(MODEL, [bad], headers={**BEARER})
    over_http = http_client.get_inference_statistics(MODEL, "1")["model_stats"]
    over_grpc = grpc_client.get_inference_statistics(MODEL, as_json=True)["model_stats"]
    assert [e["name"] for e in over_http] == [MODEL] and [e["name"] for e in over_grpc] == [MODEL]
    after = _stats(over_http[0])
    assert _stats(over_grpc[0]) == after  # nothing ran in between: the two doors read the same numbers
    delta = {k: after[k] - before[k] for k in after}
    assert delta["success_count"] == 5 and delta["fail_count"] == 1
    assert delta["inference_count"] == 5 and delta["execution_count"] == 5
    for phase in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert delta[f"{phase}_count"] == 5, phase
    assert 0 < delta["compute_infer_ns"] < delta["success_ns"] < 5 * 60 * 10**9
    assert delta["queue_ns"] + delta["compute_input_ns"] + delta["compute_infer_ns"] <= delta["success_ns"]
    assert delta["compute_input_ns"] > 0 and delta["fail_ns"] > 0
    assert int(over_http[0]["last_inference"]) > 1.7e12  # milliseconds since the epoch
    sizes = {int(b["batch_size"]) for b in over_http[0]["batch_stats"]}
    assert 1 in sizes
    everything = httpx.get(f"{server.url}/v2/models/stats").json()["model_stats"]
    assert [e["name"] for e in everything] == [MODEL]
    assert httpx.get(f"{server.url}/v2/models/resnet50/stats").status_code == 404
    with pytest.raises(InferenceServerException) as info:
        grpc_client.get_inference_statistics("resnet50")
    assert info.value.status() == "StatusCode.NOT_FOUND"
