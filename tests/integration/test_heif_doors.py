"""HEIC/HEIF and AVIF through every network door of one real Lite0 server: /predict and /features as
multipart and as raw bodies (image/heic, image/heif, image/avif), V2 REST BYTES and gRPC BYTES (Triton's
own clients). The shared real photos, re-encoded to HEIC and AVIF and stored sideways as an iPhone does,
get the top-1 of their JPEG original; hostile files get a 4xx (gRPC: its status) without raising the
server's peak memory. The batch command's door is in tests/unit/test_service_heif.py (in-process).
"""

from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from PIL import Image
from tritonclient.utils import InferenceServerException

from tests.helpers.heif import assert_same_top1, declaring, iphone_style_heic, to_avif, to_heic, top_k
from tests.helpers.images import PHOTO_NAMES
from tests.helpers.server import ServiceProcess, free_port

MODEL = "efficientnet-lite0"
MEDIA = {"HEIC": "image/heic", "AVIF": "image/avif", "iPhone HEIC": "image/heif"}


@pytest.fixture(scope="module")
def server():
    grpc_port = free_port()
    with ServiceProcess({"EFFNET_MODEL": MODEL, "EFFNET_GRPC_PORT": str(grpc_port)}) as service:
        service.grpc_url = f"127.0.0.1:{grpc_port}"
        yield service


@pytest.fixture(scope="module")
def encoded(photos) -> dict[str, dict[str, bytes]]:
    """Each photo as its JPEG original, HEIC, AVIF and an iPhone-style HEIC (sideways + orientation 6)."""
    out = {}
    for name in PHOTO_NAMES:
        upright = Image.open(io.BytesIO(photos[name])).convert("RGB")
        out[name] = {
            "JPEG": photos[name],
            "HEIC": to_heic(upright),
            "AVIF": to_avif(upright),
            "iPhone HEIC": iphone_style_heic(upright),
        }
    return out


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def reference(client, photos):
    """/predict's top-5 and /features' embedding for each JPEG original."""
    out = {}
    for name in PHOTO_NAMES:
        files = {"file": (name, photos[name], "image/jpeg")}
        predicted = client.post("/predict", params={"logits": "true", "top_k": 1}, files=files).json()
        features = client.post("/features", files=files).json()
        out[name] = {
            "top5": top_k(predicted["results"][0]["logits"]),
            "features": np.array(features["results"][0]["embedding"], dtype=np.float32),
        }
    return out


def _logits_top5(response: httpx.Response) -> list[tuple[int, float]]:
    assert response.status_code == 200, response.text
    return top_k(response.json()["results"][0]["logits"])


def test_multipart_and_raw_predict_give_the_jpeg_top1(client, encoded, reference):
    for name, variants in encoded.items():
        for what, data in variants.items():
            if what == "JPEG":
                continue
            label = f"{name} as {what}"
            files = {"file": (f"IMG_0001.{what[-4:]}", data, MEDIA[what])}
            multipart = client.post("/predict", params={"logits": "true", "top_k": 1}, files=files)
            assert_same_top1(reference[name]["top5"], _logits_top5(multipart), f"{label}, multipart")
            raw = client.post("/predict", params={"logits": "true", "top_k": 1}, content=data,
                              headers={"Content-Type": MEDIA[what]})
            assert_same_top1(reference[name]["top5"], _logits_top5(raw), f"{label}, raw {MEDIA[what]}")


def test_features_of_heic_and_avif_are_close_to_the_jpegs(client, encoded, reference):
    for name, variants in encoded.items():
        for what in ("HEIC", "AVIF", "iPhone HEIC"):
            response = client.post("/features", content=variants[what], headers={"Content-Type": MEDIA[what]})
            assert response.status_code == 200, response.text
            embedding = np.array(response.json()["results"][0]["embedding"], dtype=np.float32)
            expected = reference[name]["features"]
            cosine = float(embedding @ expected / np.linalg.norm(embedding) / np.linalg.norm(expected))
            assert cosine > 0.97, (name, what, cosine)


def _bytes_input(module, blobs: list[bytes]):
    tensor = module.InferInput("image", [len(blobs)], "BYTES")
    tensor.set_data_from_numpy(np.array(blobs, dtype=object))
    return tensor


@pytest.mark.parametrize("protocol", ["rest", "grpc"])
def test_v2_bytes_give_the_jpeg_top1(server, encoded, reference, protocol):
    module = thttp if protocol == "rest" else tgrpc
    url = server.url.removeprefix("http://") if protocol == "rest" else server.grpc_url
    client = module.InferenceServerClient(url)
    try:
        for name, variants in encoded.items():
            whats = ["HEIC", "AVIF", "iPhone HEIC"]
            result = client.infer(MODEL, [_bytes_input(module, [variants[w] for w in whats])])
            logits = result.as_numpy("logits")
            for row, what in zip(logits, whats, strict=True):
                assert_same_top1(reference[name]["top5"], top_k(row), f"{name} as {what} over {protocol}")
    finally:
        client.close()


def test_hostile_files_are_refused_everywhere_without_a_memory_spike(server, client, encoded):
    heic, avif = encoded["coffee.jpg"]["HEIC"], encoded["coffee.jpg"]["AVIF"]
    noise = np.random.default_rng(1).bytes(50_000)
    hostile = {
        "HEIC claiming 100000x100000": (declaring(heic, 100_000, 100_000), 413, "RESOURCE_EXHAUSTED"),
        "AVIF claiming 100000x100000": (declaring(avif, 100_000, 100_000), 413, "RESOURCE_EXHAUSTED"),
        "truncated HEIC": (heic[: len(heic) // 3], 400, "INVALID_ARGUMENT"),
        "truncated AVIF": (avif[: len(avif) // 3], 400, "INVALID_ARGUMENT"),
        "random bytes after a HEIC ftyp": (heic[:32] + noise, 400, "INVALID_ARGUMENT"),
        "random bytes after an AVIF ftyp": (avif[:32] + noise, 400, "INVALID_ARGUMENT"),
    }
    client.post("/predict", content=heic, headers={"Content-Type": "image/heic"})  # decoder libraries loaded
    before = server.memory_kib()["VmHWM"]
    grpc_client = tgrpc.InferenceServerClient(server.grpc_url)
    try:
        for what, (data, status, grpc_code) in hostile.items():
            for media in ("image/heic", "image/avif"):
                response = client.post("/predict", content=data, headers={"Content-Type": media})
                assert response.status_code == status, (what, response.text)
                assert response.json()["error"]["code"] in ("image_too_large", "invalid_image")
            response = client.post("/features", files={"file": ("x.heic", data, "image/heic")})
            assert response.status_code == status, (what, response.text)
            with pytest.raises(InferenceServerException) as info:
                grpc_client.infer(MODEL, [_bytes_input(tgrpc, [data])])
            assert info.value.status() == f"StatusCode.{grpc_code}", (what, info.value.message())
    finally:
        grpc_client.close()
    assert client.get("/healthz").status_code == 200
    grown_mib = (server.memory_kib()["VmHWM"] - before) / 1024
    assert grown_mib < 64, f"peak memory grew by {grown_mib:.0f} MiB on hostile files"
