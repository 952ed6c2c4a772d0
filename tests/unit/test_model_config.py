"""Configuration: the variant table, compound scaling, preprocessing and parameter counts."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import model
from model import (
    VARIANTS,
    BlockConfig,
    EfficientNet,
    GlobalConfig,
    PreprocessConfig,
    get_efficientnet_config,
    round_filters,
    round_repeats,
)
from model.config import IMAGENET_MEAN, IMAGENET_STD

ALL_NAMES = [f"efficientnet-b{i}" for i in range(9)] + ["efficientnet-l2"] + [
    f"efficientnet-lite{i}" for i in range(5)
]

# Published parameter counts (they are efficientnet_pytorch's and TF's).
PARAM_COUNTS = {
    "efficientnet-b0": 5_288_548,
    "efficientnet-b1": 7_794_184,
    "efficientnet-b2": 9_109_994,
    "efficientnet-b3": 12_233_232,
    "efficientnet-b4": 19_341_616,
    "efficientnet-b5": 30_389_784,
    "efficientnet-b6": 43_040_704,
    "efficientnet-b7": 66_347_960,
    "efficientnet-b8": 87_413_142,
    "efficientnet-l2": 480_309_308,
    "efficientnet-lite0": 4_652_008,
    "efficientnet-lite1": 5_416_680,
    "efficientnet-lite2": 6_092_072,
    "efficientnet-lite3": 8_197_096,
    "efficientnet-lite4": 13_006_568,
}

RESOLUTIONS = {
    "efficientnet-b0": 224, "efficientnet-b1": 240, "efficientnet-b2": 260, "efficientnet-b3": 300,
    "efficientnet-b4": 380, "efficientnet-b5": 456, "efficientnet-b6": 528, "efficientnet-b7": 600,
    "efficientnet-b8": 672, "efficientnet-l2": 800, "efficientnet-lite0": 224, "efficientnet-lite1": 240,
    "efficientnet-lite2": 260, "efficientnet-lite3": 280, "efficientnet-lite4": 300,
}


def meta_net(name: str, **kwargs) -> EfficientNet:
    with torch.device("meta"):
        return EfficientNet.from_name(name, **kwargs)


def test_variant_names_are_exactly_the_fifteen():
    assert sorted(VARIANTS) == sorted(ALL_NAMES)
    assert len(VARIANTS) == 15
    assert sorted(model.VARIANTS) == sorted(ALL_NAMES)


@pytest.mark.slow  # kept out of `make test-fast`, which must stay under a minute
@pytest.mark.parametrize("name", ALL_NAMES)
def test_parameter_count_is_the_published_one(name):
    net = meta_net(name)
    assert sum(p.numel() for p in net.parameters()) == PARAM_COUNTS[name]


@pytest.mark.parametrize("name", ALL_NAMES)
def test_resolution_and_variant_config(name):
    cfg = get_efficientnet_config(name)
    assert cfg.name == name
    assert cfg.resolution == RESOLUTIONS[name] == cfg.global_config.image_size
    lite = "lite" in name
    assert cfg.global_config.activation == ("relu6" if lite else "swish")
    assert cfg.global_config.use_se is (not lite)
    assert cfg.global_config.fix_head_stem is lite


def test_num_classes_and_in_channels_change_only_stem_and_classifier():
    base = meta_net("efficientnet-b0")
    other = meta_net("efficientnet-b0", num_classes=10, in_channels=1)
    assert other._fc.out_features == 10
    assert other._conv_stem.weight.shape[1] == 1
    expected = PARAM_COUNTS["efficientnet-b0"] - 1000 * 1281 + 10 * 1281 - 32 * 2 * 9
    assert sum(p.numel() for p in other.parameters()) == expected
    assert {k for k in base.state_dict()} == {k for k in other.state_dict()}


@pytest.mark.slow  # kept out of `make test-fast`, which must stay under a minute
def test_head_and_stem_widths():
    # TF num_features of each variant (timm/tf reference): 1280 scaled by the width coefficient.
    widths = {"efficientnet-b0": 1280, "efficientnet-b1": 1280, "efficientnet-b2": 1408,
              "efficientnet-b3": 1536, "efficientnet-b4": 1792, "efficientnet-b5": 2048,
              "efficientnet-b6": 2304, "efficientnet-b7": 2560, "efficientnet-b8": 2816,
              "efficientnet-l2": 5504, "efficientnet-lite4": 1280}
    stems = {"efficientnet-b3": 40, "efficientnet-b4": 48, "efficientnet-b7": 64, "efficientnet-l2": 136,
             "efficientnet-lite4": 32}
    for name, width in widths.items():
        net = meta_net(name)
        assert net.num_features == width, name
        assert net._conv_head.out_channels == width, name
        assert net._fc.in_features == width, name
    for name, width in stems.items():
        assert meta_net(name)._conv_stem.out_channels == width, name


@pytest.mark.slow  # kept out of `make test-fast`, which must stay under a minute
def test_lite_keeps_first_and_last_stage_repeats():
    # lite4 (depth 1.8): stages 1 and 7 keep one block; stages in between are scaled (ceil(1.8 * r)).
    net = meta_net("efficientnet-lite4")
    assert len(net._blocks) == 1 + 4 + 4 + 6 + 6 + 8 + 1
    b4 = meta_net("efficientnet-b4")
    assert len(b4._blocks) == 2 + 4 + 4 + 6 + 6 + 8 + 2
    assert len(meta_net("efficientnet-b0")._blocks) == 16
    assert len(meta_net("efficientnet-b7")._blocks) == 4 + 7 + 7 + 10 + 10 + 13 + 4


def _gc(width=1.0, depth=1.0, **kw) -> GlobalConfig:
    return GlobalConfig(width_coefficient=width, depth_coefficient=depth, **kw)


@pytest.mark.parametrize(
    ("width", "expected"),
    [
        # B-series stage widths (stem, stage outputs, head) as TF's round_filters gives them.
        (1.0, [32, 16, 24, 40, 80, 112, 192, 320, 1280]),
        (1.1, [32, 16, 24, 48, 88, 120, 208, 352, 1408]),
        (1.2, [40, 24, 32, 48, 96, 136, 232, 384, 1536]),
        (1.4, [48, 24, 32, 56, 112, 160, 272, 448, 1792]),
        (1.6, [48, 24, 40, 64, 128, 176, 304, 512, 2048]),
        (1.8, [56, 32, 40, 72, 144, 200, 344, 576, 2304]),
        (2.0, [64, 32, 48, 80, 160, 224, 384, 640, 2560]),
        (2.2, [72, 32, 56, 88, 176, 248, 424, 704, 2816]),
        (4.3, [136, 72, 104, 176, 344, 480, 824, 1376, 5504]),
    ],
)
def test_round_filters_matches_tf(width, expected):
    cfg = _gc(width)
    got = [round_filters(f, cfg) for f in [32, 16, 24, 40, 80, 112, 192, 320, 1280]]
    assert got == expected


def test_round_filters_rules():
    b7 = get_efficientnet_config("efficientnet-b7").global_config
    assert round_filters(32, b7) == 64
    assert round_filters(1280, b7) == 2560
    assert round_filters(1280, b7, skip=True) == 1280
    # Never below min_depth (the divisor by default) ...
    assert round_filters(4, _gc(0.5)) == 8
    assert round_filters(4, _gc(0.5, min_depth=16)) == 16
    # ... and never more than 10% below the scaled value: 0.75 * 28 = 21 -> 24 (not 16), 0.6 * 36 = 21.6 -> 24.
    assert round_filters(28, _gc(0.75)) == 24
    assert round_filters(36, _gc(0.6)) == 24
    for f in (8, 16, 24, 32, 40, 100, 1280):
        for w in (0.25, 0.5, 0.8, 1.3, 1.7, 3.3):
            r = round_filters(f, _gc(w))
            assert r % 8 == 0 and r >= 0.9 * f * w, (f, w, r)


def test_round_repeats_matches_tf():
    b7 = get_efficientnet_config("efficientnet-b7").global_config
    assert b7.depth_coefficient == 3.1
    assert [round_repeats(r, b7) for r in (1, 2, 3, 4)] == [4, 7, 10, 13]
    assert [round_repeats(r, _gc(depth=1.1)) for r in (1, 2, 3, 4)] == [2, 3, 4, 5]
    assert [round_repeats(r, _gc(depth=1.8)) for r in (1, 2, 3, 4)] == [2, 4, 6, 8]
    assert [round_repeats(r, _gc(depth=1.0)) for r in (1, 2, 3, 4)] == [1, 2, 3, 4]
    assert round_repeats(1, b7, skip=True) == 1


def test_unknown_variant_lists_valid_names():
    with pytest.raises(ValueError) as info:
        get_efficientnet_config("efficientnet-b9")
    message = str(info.value)
    assert "efficientnet-b9" in message
    for name in ALL_NAMES:
        assert name in message
    with pytest.raises(ValueError):
        get_efficientnet_config(None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="efficientnet-lite0"):
        EfficientNet.from_name("resnet50")


def test_from_name_validates_arguments():
    with pytest.raises(ValueError):
        EfficientNet.from_name("efficientnet-b0", num_classes=0)
    with pytest.raises(ValueError):
        EfficientNet.from_name("efficientnet-b0", in_channels=0)
    with pytest.raises(TypeError, match="no_such_field"):
        EfficientNet.from_name("efficientnet-b0", no_such_field=1)


def test_overrides_reach_the_modules():
    net = meta_net("efficientnet-b0", dropout_rate=0.0, drop_connect_rate=0.1, include_top=False)
    assert net.drop_connect_rate == 0.1
    assert not hasattr(net, "_fc")
    assert net.config.dropout_rate == 0.0 and net.variant.global_config.include_top is False
    # The table itself is untouched by overrides.
    assert VARIANTS["efficientnet-b0"].global_config.drop_connect_rate == 0.2
    assert VARIANTS["efficientnet-b0"].global_config.include_top is True


@pytest.mark.parametrize("name", ["efficientnet-b0", "efficientnet-b5", "efficientnet-lite2"])
def test_batchnorm_momentum_and_eps_are_tf_defaults(name):
    cfg = get_efficientnet_config(name).global_config
    assert cfg.batch_norm_momentum == 0.99 and cfg.batch_norm_epsilon == 1e-3
    assert cfg.torch_bn_momentum == pytest.approx(0.01)
    bns = [m for m in meta_net(name).modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns
    for bn in bns:
        assert bn.momentum == pytest.approx(0.01)
        assert bn.eps == 1e-3


def test_dataclasses_are_frozen():
    cfg = get_efficientnet_config("efficientnet-b0")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.name = "x"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.global_config.width_coefficient = 2.0  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.blocks[0].num_repeat = 5  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.preprocess.input_size = 1  # type: ignore[misc]
    assert cfg.global_config.width_coefficient == 1.0 and cfg.blocks[0].num_repeat == 1
    assert isinstance(cfg.blocks, tuple)


def test_block_config_validation_and_baseline_table():
    with pytest.raises(ValueError):
        BlockConfig(0, 3, 1, 1, 32, 16, 0.25)
    with pytest.raises(ValueError):
        BlockConfig(1, 3, 0, 1, 32, 16, 0.25)
    b0 = get_efficientnet_config("efficientnet-b0").blocks
    assert [(b.num_repeat, b.kernel_size, b.stride, b.expand_ratio, b.input_filters, b.output_filters)
            for b in b0] == [
        (1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
        (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320)]
    assert all(b.se_ratio == 0.25 and b.id_skip for b in b0)
    assert all(b.se_ratio is None for b in get_efficientnet_config("efficientnet-lite0").blocks)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_preprocess_config(name):
    pre = get_efficientnet_config(name).preprocess
    assert isinstance(pre, PreprocessConfig)
    assert pre.input_size == RESOLUTIONS[name]
    assert pre.resize_size == RESOLUTIONS[name] + 32
    assert pre.crop_fraction == pytest.approx(RESOLUTIONS[name] / (RESOLUTIONS[name] + 32))
    assert pre.interpolation == "bicubic"
    if "lite" in name:
        assert pre.mean == pytest.approx((127 / 255,) * 3)
        assert pre.std == pytest.approx((128 / 255,) * 3)
    else:
        assert pre.mean == pytest.approx((0.485, 0.456, 0.406))
        assert pre.std == pytest.approx((0.229, 0.224, 0.225))
        assert (pre.mean, pre.std) == (IMAGENET_MEAN, IMAGENET_STD)


def test_resize_sizes_of_b0_and_b7():
    assert get_efficientnet_config("efficientnet-b0").preprocess.resize_size == 256
    assert get_efficientnet_config("efficientnet-b7").preprocess.resize_size == 632
    assert get_efficientnet_config("efficientnet-lite4").preprocess.resize_size == 332


def test_lite_normalisation_is_tf_pixel_minus_127_over_128():
    import numpy as np
    from PIL import Image

    pre = get_efficientnet_config("efficientnet-lite0").preprocess
    pixels = np.array([[[0, 127, 255]]], dtype=np.uint8).repeat(3, 0).repeat(3, 1)  # 3x3x3
    out = model.normalize(Image.fromarray(pixels), pre)
    assert out.shape == (3, 3, 3) and out.dtype == np.float32
    expected = (pixels.astype(np.float64) - 127.0) / 128.0
    np.testing.assert_allclose(out, expected.transpose(2, 0, 1), atol=1e-6)

    pre_b = get_efficientnet_config("efficientnet-b0").preprocess
    out_b = model.normalize(Image.fromarray(pixels), pre_b)
    mean = np.array(IMAGENET_MEAN)[:, None, None]
    std = np.array(IMAGENET_STD)[:, None, None]
    np.testing.assert_allclose(out_b, (pixels.transpose(2, 0, 1) / 255.0 - mean) / std, atol=1e-5)


def test_preprocess_resizes_and_centre_crops():
    import numpy as np
    from PIL import Image

    pre = get_efficientnet_config("efficientnet-b0").preprocess
    # A 512x320 image: left and right quarters red-ish and blue-ish, middle green.
    w, h = 512, 320
    array = np.zeros((h, w, 3), dtype=np.uint8)
    array[:, :128, 0] = 255
    array[:, 128:384, 1] = 255
    array[:, 384:, 2] = 255
    x = model.preprocess_image(Image.fromarray(array), pre)
    assert isinstance(x, torch.Tensor) and x.shape == (3, 224, 224) and x.dtype == torch.float32
    # Shorter side 320 -> 256, width 512 -> 409.6; the central 224 window spans source x 116..396:
    # its outer columns come from the red / blue bands, its centre is pure green.
    centre = x[:, :, 112]
    green = (torch.tensor([0.0, 1.0, 0.0]) - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(centre.mean(1), green, atol=1e-4)
    assert x[0, :, 0].mean() > x[0, :, 112].mean() + 1.0  # red at the left edge
    assert x[2, :, -1].mean() > x[2, :, 112].mean() + 1.0  # blue at the right edge
    with pytest.raises(ValueError):
        model.preprocess_image(Image.new("L", (300, 300)), pre)
