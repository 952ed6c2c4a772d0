"""A user's own timm and torchvision checkpoints served by a real server process: the answers over HTTP
equal the source library's own pipeline (its preprocessing and its network) on the shared photos."""

from __future__ import annotations

import argparse
import io

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from model import default_weights_path, read_state_dict
from tests.helpers.foreign import reference_model, timm_module, timm_with_lite0_weights, torchvision_models
from tests.helpers.images import load_photos

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]


def predict(url: str, data: bytes, k: int) -> dict:
    response = httpx.post(f"{url}/predict?top_k={k}&logits=true", content=data,
                          headers={"content-type": "image/jpeg"}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["results"][0]


def test_timm_checkpoint_answers_like_timm(tmp_path, start_service):
    from safetensors.torch import save_file

    timm = timm_module()
    lite0 = read_state_dict(default_weights_path("efficientnet-lite0"))
    reference = timm_with_lite0_weights("tf_efficientnet_lite0", lite0)
    path = tmp_path / "model.safetensors"  # what timm writes with --save-safetensors: no architecture inside
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=reference))
    server = start_service({"EFFNET_MODEL": "tf_efficientnet_lite0", "EFFNET_WEIGHTS": str(path)})
    try:
        info = httpx.get(f"{server.url}/info").json()
        assert info["weights_format"] == "timm_tf" and info["num_classes"] == 1000
        assert info["config"]["padding"] == "same" and info["config"]["batch_norm_epsilon"] == 1e-3
        pre = info["preprocessing"]
        assert (pre["input_size"], pre["resize_size"], pre["interpolation"]) == (224, 256, "bicubic")
        assert pre["mean"] == [0.5, 0.5, 0.5] and pre["std"] == [0.5, 0.5, 0.5]
        for name, data in load_photos().items():
            result = predict(server.url, data, 5)
            with torch.no_grad():
                expected = reference(transform(Image.open(io.BytesIO(data)).convert("RGB"))[None])[0].numpy()
            got = np.asarray(result["logits"])
            assert int(got.argmax()) == int(expected.argmax()), name
            assert np.abs(got - expected).max() <= 1e-2 * np.abs(expected).max(), name
    finally:
        server.close()


def test_torchvision_fine_tune_answers_like_torchvision_in_its_labels(tmp_path, start_service):
    models = torchvision_models()
    from torchvision import transforms as T
    reference = reference_model("torchvision", "efficientnet_b0", 10, size=224)
    path, labels = tmp_path / "checkpoint.pth", tmp_path / "labels.txt"
    # What torchvision's reference training script writes.
    torch.save({"model": reference.state_dict(), "epoch": 9, "args": argparse.Namespace(model="efficientnet_b0")},
               path)
    names = [f"part-{i}" for i in range(10)]
    labels.write_text("\n".join(names) + "\n")
    transform = models.get_model_weights("efficientnet_b0").DEFAULT.transforms()

    # The same steps on PIL images (its tensor kernels need torchvision's compiled operators).
    pil_transform = T.Compose([T.Resize(transform.resize_size, interpolation=transform.interpolation),
                               T.CenterCrop(transform.crop_size), T.ToTensor(),
                               T.Normalize(transform.mean, transform.std)])
    server = start_service({"EFFNET_MODEL": "efficientnet_b0", "EFFNET_WEIGHTS": str(path),
                            "EFFNET_LABELS": str(labels)})
    try:
        info = httpx.get(f"{server.url}/info").json()
        assert info["weights_format"] == "torchvision" and info["num_classes"] == 10
        assert info["labels_source"] == "file" and info["config"]["padding"] == "symmetric"
        pre = info["preprocessing"]
        assert (pre["input_size"], pre["resize_size"], pre["interpolation"]) == (224, 256, "bicubic")
        meta = httpx.get(f"{server.url}/v2/models/efficientnet-b0").json()
        assert {o["name"]: o["shape"] for o in meta["outputs"]}["probabilities"] == [-1, 10]
        for name, data in load_photos().items():
            result = predict(server.url, data, 3)
            with torch.no_grad():
                expected = reference(pil_transform(Image.open(io.BytesIO(data)).convert("RGB"))[None])[0].numpy()
            got = np.asarray(result["logits"])
            assert np.abs(got - expected).max() <= 1e-2 * np.abs(expected).max(), name
            assert result["top_k"][0]["label"] == names[int(expected.argmax())], name
    finally:
        server.close()
