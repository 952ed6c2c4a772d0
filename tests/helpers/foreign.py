"""timm and torchvision as reference libraries for the tests of user checkpoints (model/sources.py).

The torchvision wheel on the package index is built for the CUDA torch: its compiled operators do not load
beside the CPU torch, and ``import torchvision`` fails while registering them. ``torchvision.models`` is pure
Python and needs none of them, so the two modules that register the operators are replaced by empty ones
before the import; timm (which imports torchvision) then imports too. Only the networks and the transforms
on PIL images (pure Python and Pillow) are used, never torchvision's compiled operators.
"""

from __future__ import annotations

import io
import re
import sys
import types

import numpy as np
import torch
from PIL import Image
from torch import nn

from tests.helpers.components import missing_component
from tests.helpers.images import load_photos

_OPS_MODULES = ("torchvision._meta_registrations", "torchvision._autograd_registrations")


def _import_torchvision():
    if "torchvision" not in sys.modules:
        try:
            import torchvision  # noqa: F401
        except RuntimeError:
            for name in list(sys.modules):
                if name == "torchvision" or name.startswith("torchvision."):
                    del sys.modules[name]
            for name in _OPS_MODULES:
                sys.modules[name] = types.ModuleType(name)
            import torchvision  # noqa: F401
        except ImportError:
            missing_component("torchvision is not installed (pip install '.[dev]')")
    return sys.modules["torchvision"]


def torchvision_models():
    """``torchvision.models`` (skips, or fails under CI, when torchvision is missing)."""
    _import_torchvision()
    import torchvision.models

    return torchvision.models


def timm_module():
    """``timm`` (skips, or fails under CI, when timm is missing)."""
    _import_torchvision()
    try:
        import timm
    except ImportError:
        missing_component("timm is not installed (pip install '.[dev]')")
    return timm


def calibrate_batchnorm(net: nn.Module, photos: torch.Tensor, passes: int = 3, seed: int = 0) -> nn.Module:
    """Realistic BatchNorm statistics for a randomly initialised network: random affine parameters, then a
    few train-mode passes over real photos (cumulative averages), back to eval mode.

    Without this a random network's activations die out or explode and every comparison is near-trivial.
    """
    g = torch.Generator().manual_seed(seed)
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    # The last BatchNorm of each block (its projection, on the residual branch) starts small, as in
    # tests/helpers/model.py: the deep random network then stays near identity per block instead of
    # chaotic, and stays so for photos other than the calibration ones.
    block_re = re.compile(r"(blocks|features)\.\d+\.\d+")
    residual = set()
    for name, module in net.named_modules():
        if block_re.fullmatch(name):
            last = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
            if last:
                residual.add(id(last[-1]))
    with torch.no_grad():
        for m in bns:
            gain = 0.2 if id(m) in residual else 1.0
            m.weight.copy_((torch.rand(m.num_features, generator=g) * 0.5 + 0.75) * gain)
            m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1 * gain)
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the passes
        net.train()
        for _ in range(passes):
            net(photos)
    for m in bns:
        m.momentum = 0.1
    return net.eval()




SIZE = 64  # the arithmetic tests' input size: small, still a 2x2 map after /32


def photo_batch(size: int = SIZE) -> torch.Tensor:
    """The real photos (and their mirror images) as a normalised float batch at ``size``."""
    images = []
    for data in load_photos().values():
        image = Image.open(io.BytesIO(data)).convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
        for im in (image, image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)):
            images.append(torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1))
    return _imagenet_normalised(torch.stack(images))


def photo_crops(count: int, size: int, seed: int = 0) -> torch.Tensor:
    """``count`` random views of the real photos (square crops of 35-100% of the shorter side at random
    places, half of them mirrored), bilinear to ``size``, normalised with ImageNet's mean/std: a stand-in
    for the many photos a user's BatchNorm statistics come from."""
    rng = np.random.default_rng(seed)
    photos = [Image.open(io.BytesIO(data)).convert("RGB") for data in load_photos().values()]
    views = []
    for i in range(count):
        image = photos[i % len(photos)]
        w, h = image.size
        side = rng.uniform(0.35, 1.0) * min(w, h)
        left, top = rng.uniform(0, w - side), rng.uniform(0, h - side)
        view = image.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side))
        if rng.random() < 0.5:
            view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        views.append(torch.from_numpy(np.asarray(view, dtype=np.float32) / 255.0).permute(2, 0, 1))
    return _imagenet_normalised(torch.stack(views))


def _imagenet_normalised(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (x - mean) / std


def foreign_model(library: str, arch: str, num_classes: int = 1000):
    """timm's or torchvision's ``arch``, randomly initialised (seed with ``torch.manual_seed`` first)."""
    if library == "timm":
        return timm_module().create_model(arch, num_classes=num_classes)
    return torchvision_models().get_model(arch, num_classes=num_classes)


def reference_model(library: str, arch: str, num_classes: int, size: int = SIZE):
    """timm's or torchvision's ``arch`` with random weights and BatchNorm statistics from the photos only,
    as a network trained on photos has them (it amplifies random pixels: compare it on photos)."""
    torch.manual_seed(0)
    return calibrate_batchnorm(foreign_model(library, arch, num_classes), photo_batch(size))


def timm_with_lite0_weights(arch: str, lite0_state_dict: dict):
    """timm's ``arch`` holding the real Lite0 weights: the two map one-to-one, in order and shape."""
    net = timm_module().create_model(arch)
    theirs = net.state_dict()
    ours = [(k, v) for k, v in lite0_state_dict.items() if not k.endswith("num_batches_tracked")]
    keys = [k for k in theirs if not k.endswith("num_batches_tracked")]
    assert len(keys) == len(ours)
    mapped = {}
    for key, (_, value) in zip(keys, ours, strict=True):
        assert tuple(theirs[key].shape) == tuple(value.shape), key
        mapped[key] = value
    net.load_state_dict(mapped, strict=False)
    return net.eval()
