"""Configuration of the EfficientNet family as data.

Every per-variant fact lives here: compound-scaling coefficients, regularisation, the activation, and
the evaluation preprocessing the published weights expect. Adding a variant is one row in
``_VARIANT_TABLE``; nothing else in the package or the service changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

Activation = Literal["swish", "relu6"]
# "same": TensorFlow's "SAME" padding (asymmetric where needed: efficientnet_pytorch, the TF ports, timm's
# tf_* models); "symmetric": PyTorch's (k - 1) // 2 on every side (torchvision, timm's native models).
Padding = Literal["same", "symmetric"]
Interpolation = Literal["bicubic", "bilinear", "nearest"]

# ImageNet statistics on a 0..1 pixel scale (what the TF B-series reference subtracts, times 255).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# TF normalises Lite input as (pixel - 127) / 128 on 0..255 pixels: the same thing on a 0..1 scale.
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3
# TF's evaluation resizes to (size + 32) and centre-crops ``size``: crop fraction = size / (size + 32).
TF_CROP_PADDING = 32


@dataclass(frozen=True)
class BlockConfig:
    """One stage of MBConv blocks, as written in the paper's table (before compound scaling)."""

    num_repeat: int
    kernel_size: int
    stride: int
    expand_ratio: int
    input_filters: int
    output_filters: int
    se_ratio: float | None
    id_skip: bool = True

    def __post_init__(self) -> None:
        if self.num_repeat < 1 or self.kernel_size < 1 or self.stride < 1 or self.expand_ratio < 1:
            raise ValueError(f"invalid block config: {self}")


@dataclass(frozen=True)
class PreprocessConfig:
    """Evaluation preprocessing the published weights were trained and measured with.

    Pixels are scaled to 0..1, then ``(x - mean) / std`` per channel, RGB order, NCHW.
    """

    input_size: int
    crop_fraction: float
    interpolation: Interpolation = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # The shorter side after resizing, when a source states it (torchvision's resize_size, timm's
    # floor(input / crop_pct)); else derived from crop_fraction.
    resize: int | None = None
    # Crop geometry of torchvision's / timm's Resize + CenterCrop (whole-pixel resize and crop offsets),
    # rather than the exact central window (see model.preprocess.resize_and_crop).
    pixel_aligned: bool = False

    def __post_init__(self) -> None:
        if self.input_size < 8 or not 0.0 < self.crop_fraction <= 1.0:
            raise ValueError(f"invalid preprocessing: input size {self.input_size}, crop fraction {self.crop_fraction}")
        if self.resize is not None and self.resize < self.input_size:
            raise ValueError(f"resize size {self.resize} is smaller than the input size {self.input_size}")
        if len(self.mean) != 3 or len(self.std) != 3 or any(v <= 0 for v in self.std):
            raise ValueError(f"mean and std need three values each, std positive: {self.mean}, {self.std}")

    @property
    def resize_size(self) -> int:
        """Length of the shorter side after resizing, before the centre crop."""
        if self.resize is not None:
            return self.resize
        return int(math.floor(self.input_size / self.crop_fraction + 0.5))


@dataclass(frozen=True)
class GlobalConfig:
    """Network-wide hyper-parameters of one variant."""

    width_coefficient: float = 1.0
    depth_coefficient: float = 1.0
    image_size: int = 224
    dropout_rate: float = 0.2
    drop_connect_rate: float = 0.2
    # TF's BatchNormalization momentum (0.99) is PyTorch's 1 - 0.99 = 0.01; both are kept here so the
    # table reads like the paper and the modules get what PyTorch expects.
    batch_norm_momentum: float = 0.99
    batch_norm_epsilon: float = 1e-3
    padding: Padding = "same"
    depth_divisor: int = 8
    min_depth: int | None = None
    activation: Activation = "swish"
    use_se: bool = True
    # Lite: stem and head widths, and the repeats of the first and last stage, are not scaled.
    fix_head_stem: bool = False
    num_classes: int = 1000
    include_top: bool = True
    in_channels: int = 3

    @property
    def torch_bn_momentum(self) -> float:
        return 1.0 - self.batch_norm_momentum


@dataclass(frozen=True)
class VariantConfig:
    """Everything that defines one named variant."""

    name: str
    global_config: GlobalConfig
    blocks: tuple[BlockConfig, ...]
    preprocess: PreprocessConfig

    @property
    def resolution(self) -> int:
        return self.global_config.image_size


# The B0 baseline of the paper (Table 1): repeats, kernel, stride, expand, in, out, se ratio.
BASE_BLOCKS: tuple[BlockConfig, ...] = (
    BlockConfig(1, 3, 1, 1, 32, 16, 0.25),
    BlockConfig(2, 3, 2, 6, 16, 24, 0.25),
    BlockConfig(2, 5, 2, 6, 24, 40, 0.25),
    BlockConfig(3, 3, 2, 6, 40, 80, 0.25),
    BlockConfig(3, 5, 1, 6, 80, 112, 0.25),
    BlockConfig(4, 5, 2, 6, 112, 192, 0.25),
    BlockConfig(1, 3, 1, 6, 192, 320, 0.25),
)
LITE_BLOCKS: tuple[BlockConfig, ...] = tuple(replace(b, se_ratio=None) for b in BASE_BLOCKS)

# name: (width, depth, resolution, dropout, lite)
_VARIANT_TABLE: dict[str, tuple[float, float, int, float, bool]] = {
    "efficientnet-b0": (1.0, 1.0, 224, 0.2, False),
    "efficientnet-b1": (1.0, 1.1, 240, 0.2, False),
    "efficientnet-b2": (1.1, 1.2, 260, 0.3, False),
    "efficientnet-b3": (1.2, 1.4, 300, 0.3, False),
    "efficientnet-b4": (1.4, 1.8, 380, 0.4, False),
    "efficientnet-b5": (1.6, 2.2, 456, 0.4, False),
    "efficientnet-b6": (1.8, 2.6, 528, 0.5, False),
    "efficientnet-b7": (2.0, 3.1, 600, 0.5, False),
    "efficientnet-b8": (2.2, 3.6, 672, 0.5, False),
    "efficientnet-l2": (4.3, 5.3, 800, 0.5, False),
    "efficientnet-lite0": (1.0, 1.0, 224, 0.2, True),
    "efficientnet-lite1": (1.0, 1.1, 240, 0.2, True),
    "efficientnet-lite2": (1.1, 1.2, 260, 0.3, True),
    "efficientnet-lite3": (1.2, 1.4, 280, 0.3, True),
    "efficientnet-lite4": (1.4, 1.8, 300, 0.3, True),
}


def _make_variant(name: str) -> VariantConfig:
    width, depth, res, dropout, lite = _VARIANT_TABLE[name]
    global_config = GlobalConfig(
        width_coefficient=width,
        depth_coefficient=depth,
        image_size=res,
        dropout_rate=dropout,
        activation="relu6" if lite else "swish",
        use_se=not lite,
        fix_head_stem=lite,
    )
    preprocess = PreprocessConfig(
        input_size=res,
        crop_fraction=res / (res + TF_CROP_PADDING),
        interpolation="bicubic",
        mean=LITE_MEAN if lite else IMAGENET_MEAN,
        std=LITE_STD if lite else IMAGENET_STD,
    )
    return VariantConfig(name, global_config, LITE_BLOCKS if lite else BASE_BLOCKS, preprocess)


VARIANTS: dict[str, VariantConfig] = {name: _make_variant(name) for name in _VARIANT_TABLE}


def get_efficientnet_config(name: str) -> VariantConfig:
    """The configuration of a named variant; ``ValueError`` naming the valid ones otherwise."""
    try:
        return VARIANTS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown EfficientNet variant {name!r}; valid names: {', '.join(VARIANTS)}") from None


def round_filters(filters: int, config: GlobalConfig, skip: bool = False) -> int:
    """Scale a channel count by the width coefficient, rounded to the depth divisor as TF does.

    The result never drops more than 10% below the scaled value.
    """
    if skip or config.width_coefficient == 1.0:
        return filters
    divisor = config.depth_divisor
    min_depth = config.min_depth or divisor
    scaled = filters * config.width_coefficient
    new_filters = max(min_depth, int(scaled + divisor / 2) // divisor * divisor)
    if new_filters < 0.9 * scaled:
        new_filters += divisor
    return int(new_filters)


def round_repeats(repeats: int, config: GlobalConfig, skip: bool = False) -> int:
    """Scale a stage's block count by the depth coefficient, rounding up as TF does."""
    if skip or config.depth_coefficient == 1.0:
        return repeats
    return int(math.ceil(config.depth_coefficient * repeats))
