"""Class activation maps at every door of a real Lite0 server: /explain (JSON and PNG), V2 REST and gRPC
through tritonclient, the same maps from a server of two worker processes (computed in its engine process),
and the batch command's --cam."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from PIL import Image

from model import EfficientNet, Normalize, default_weights_path
from service.core.cam import class_maps
from service.core.imaging import Preprocessor
from tests.helpers.images import DATA, load_photos
from tests.helpers.server import REPO, ServiceProcess, free_port

MODEL = "efficientnet-lite0"
PHOTOS = load_photos()


@pytest.fixture(scope="module")
def server():
    port = free_port()
    with ServiceProcess({"EFFNET_MODEL": MODEL, "EFFNET_GRPC_PORT": str(port),
                         "EFFNET_MAX_IMAGES_PER_REQUEST": "4"}) as process:
        process.grpc_target = f"127.0.0.1:{port}"
        yield process


@pytest.fixture(scope="module")
def reference():
    """Lite0 in PyTorch: per photo its pixels, crop, logits and feature map, and the classifier weights."""
    net = EfficientNet.from_pretrained(MODEL, default_weights_path(MODEL)).eval()
    preprocessor = Preprocessor(net.variant.preprocess, max_pixels=10**8)
    out = {}
    for name, data in PHOTOS.items():
        pixels, crop = preprocessor.with_crop(data)
        x = Normalize(net.variant.preprocess)(torch.from_numpy(pixels[None]))
        with torch.inference_mode():
            _, logits, feature_map = net.forward_with_feature_map(x)
        out[name] = (crop, logits[0].numpy(), feature_map[0].numpy())
    return out, net._fc.weight.detach().numpy()


def _explain(url: str, names: list[str], **params) -> httpx.Response:
    files = [("file", (name, PHOTOS[name], "image/jpeg")) for name in names]
    return httpx.post(f"{url}/explain", files=files, params=params, timeout=120)


def test_explain_gives_predicts_top_k_and_a_map_per_class_on_the_crop(server, reference):
    maps_of, weights = reference
    names = ["coffee.jpg", "chelsea.jpg"]
    r = _explain(server.url, names, top_k=3)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == MODEL and body["grid"] == [7, 7]
    for name, result in zip(names, body["results"], strict=True):
        predicted = httpx.post(f"{server.url}/predict", files={"file": (name, PHOTOS[name])}, params={"top_k": 3},
                               timeout=60).json()["results"][0]["top_k"]
        assert [c["index"] for c in result["top_k"]] == [c["index"] for c in predicted]
        assert [m["index"] for m in result["maps"]] == [c["index"] for c in predicted]
        crop, _, feature_map = maps_of[name]
        assert result["crop"] == pytest.approx(crop.as_dict())
        for entry in result["maps"]:
            grid = np.asarray(entry["map"])
            assert grid.shape == (7, 7) and grid.min() >= 0 and grid.max() == 1.0
            expected = class_maps(feature_map, weights, [entry["index"]])[0]
            np.testing.assert_allclose(grid, expected, atol=2e-3)  # onnxruntime's map, rounded to 4 places
    named = _explain(server.url, ["chelsea.jpg"], **{"class": ["tabby", "967"]}).json()["results"][0]["maps"]
    assert [(m["index"], m["label"]) for m in named] == [(281, "tabby"), (967, "espresso")]


def test_explain_as_png_draws_the_top1_map_over_the_photo(server, reference):
    maps_of, weights = reference
    r = httpx.post(f"{server.url}/explain", params={"format": "png"}, content=PHOTOS["chelsea.jpg"],
                   headers={"Content-Type": "image/jpeg"}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    crop, logits, feature_map = maps_of["chelsea.jpg"]
    assert int(r.headers["x-class-index"]) == int(np.argmax(logits))
    drawn = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"), dtype=int)
    photo = np.asarray(Image.open(DATA / "chelsea.jpg").convert("RGB"), dtype=int)
    assert drawn.shape == photo.shape  # 451 x 300: drawn at the photo's own size
    grid = class_maps(feature_map, weights, [int(np.argmax(logits))])[0]
    left, top, right, bottom = crop.box
    cell = (right - left) / 7

    def centre(index: int) -> tuple[int, int]:
        i, j = divmod(index, 7)
        return int(top + (i + 0.5) * cell), int(left + (j + 0.5) * cell)

    hot, cold = drawn[centre(int(grid.argmax()))], drawn[centre(int(grid.argmin()))]
    assert hot[0] > hot[2] and cold[2] > cold[0], (hot, cold)  # red where the map peaks, blue where it is low
    outside = drawn[:, : int(left) - 3].mean()  # the strip the network never saw: dimmed
    assert outside < 0.6 * photo[:, : int(left) - 3].mean()


def test_v2_rest_and_grpc_give_the_cam_output_through_tritonclient(server):
    images = np.array([PHOTOS["coffee.jpg"], PHOTOS["chelsea.jpg"]], dtype=object)
    explained = _explain(server.url, ["coffee.jpg", "chelsea.jpg"], top_k=1).json()["results"]
    top1 = np.array([r["maps"][0]["map"] for r in explained])
    tabby = np.array(_explain(server.url, ["coffee.jpg", "chelsea.jpg"], **{"class": "tabby"}).json()["results"][0]
                     ["maps"][0]["map"])

    http = thttp.InferenceServerClient(server.url.removeprefix("http://"))
    meta = http.get_model_metadata(MODEL)
    assert {"name": "cam", "datatype": "FP32", "shape": [-1, 7, 7]} in meta["outputs"]
    image = thttp.InferInput("image", [2], "BYTES")
    image.set_data_from_numpy(images)
    result = http.infer(MODEL, [image], outputs=[thttp.InferRequestedOutput("cam"),
                                                  thttp.InferRequestedOutput("probabilities", class_count=1)])
    cam = result.as_numpy("cam")
    assert cam.shape == (2, 7, 7) and cam.dtype == np.float32
    np.testing.assert_allclose(cam, top1, atol=1e-4)
    named = http.infer(MODEL, [image], outputs=[thttp.InferRequestedOutput("cam")], parameters={"cam_class": "tabby"})
    np.testing.assert_allclose(named.as_numpy("cam")[0], tabby, atol=1e-4)

    grpc = tgrpc.InferenceServerClient(server.grpc_target)
    meta = grpc.get_model_metadata(MODEL, as_json=True)
    assert {"name": "cam", "datatype": "FP32", "shape": ["-1", "7", "7"]} in meta["outputs"]
    image = tgrpc.InferInput("image", [2], "BYTES")
    image.set_data_from_numpy(images)
    result = grpc.infer(MODEL, [image], outputs=[tgrpc.InferRequestedOutput("cam")], client_timeout=60)
    np.testing.assert_allclose(result.as_numpy("cam"), top1, atol=1e-4)
    named = grpc.infer(MODEL, [image], outputs=[tgrpc.InferRequestedOutput("cam")], parameters={"cam_class": 281},
                       client_timeout=60)
    np.testing.assert_allclose(named.as_numpy("cam")[0], tabby, atol=1e-4)


def test_two_workers_answer_the_same_maps_computed_in_the_engine_process(server):
    """EFFNET_WORKERS=2: only the maps cross back from the engine process; they equal one process's."""
    one = _explain(server.url, ["chelsea.jpg", "grace_hopper.jpg"], top_k=2).json()
    with ServiceProcess({"EFFNET_MODEL": MODEL, "EFFNET_WORKERS": "2", "EFFNET_GRPC_PORT": "0"}) as two:
        answer = _explain(two.url, ["chelsea.jpg", "grace_hopper.jpg"], top_k=2)
        assert answer.status_code == 200, answer.text
        png = httpx.post(f"{two.url}/explain", params={"format": "png", "class": "tabby"},
                         content=PHOTOS["chelsea.jpg"], headers={"Content-Type": "image/jpeg"}, timeout=60)
    assert png.status_code == 200 and png.headers["x-class-index"] == "281"
    for a, b in zip(one["results"], answer.json()["results"], strict=True):
        assert a["crop"] == b["crop"] and [m["index"] for m in a["maps"]] == [m["index"] for m in b["maps"]]
        for m, n in zip(a["maps"], b["maps"], strict=True):
            np.testing.assert_allclose(m["map"], n["map"], atol=1e-4)


def _batch(*args: str) -> subprocess.CompletedProcess[str]:
    from tests.integration.test_batch_cli import command_env

    return subprocess.run([sys.executable, "-m", "service.cli", *args], cwd=REPO, env=command_env(),
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("where", ["in-process", "server"])
def test_the_batch_commands_cam_writes_an_overlay_and_the_map_per_image(where, server, tmp_path):
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    (photos / "coffee.jpg").write_bytes(PHOTOS["coffee.jpg"])
    (photos / "sub" / "chelsea.jpg").write_bytes(PHOTOS["chelsea.jpg"])
    (photos / "notes.jpg").write_text("not an image")
    out, cams = tmp_path / "rows.jsonl", tmp_path / "cams"
    extra = ["--server", server.url] if where == "server" else []
    done = _batch("predict", str(photos), "-o", str(out), "--top-k", "2", "--cam", str(cams), *extra)
    assert done.returncode == 1, done.stderr  # the non-image is an error row, the photos succeed
    rows = {Path(row["path"]).name: row for row in map(json.loads, out.read_text().splitlines())}
    explained = _explain(server.url, ["coffee.jpg", "chelsea.jpg"], top_k=1).json()["results"]
    for name, expected in zip(["coffee.jpg", "chelsea.jpg"], explained, strict=True):
        row = rows[name]
        assert row["cam"]["index"] == row["top_k"][0]["index"] == expected["maps"][0]["index"]
        png = Image.open(row["cam"]["png"])
        assert png.format == "PNG" and png.size == Image.open(io.BytesIO(PHOTOS[name])).size
        grid = np.load(row["cam"]["npy"])
        assert grid.shape == (7, 7) and grid.dtype == np.float32
        np.testing.assert_allclose(grid, expected["maps"][0]["map"], atol=2e-3)
    assert (cams / str(photos).lstrip("/") / "sub" / "chelsea.jpg.png").is_file()  # the path mirrored under DIR
    assert "error" in rows["notes.jpg"] and "cam" not in rows["notes.jpg"]
