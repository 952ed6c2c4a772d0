"""Building blocks: Swish, TF "SAME" convolutions, drop connect, MBConvBlock."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model import (
    BlockConfig,
    Conv2dDynamicSamePadding,
    Conv2dStaticSamePadding,
    DropConnect,
    EfficientNet,
    GlobalConfig,
    MBConvBlock,
    MemoryEfficientSwish,
    Swish,
    calculate_output_image_size,
    drop_connect,
    get_activation,
    get_same_padding_conv2d,
)
from tests.helpers.model import count_modules


# ---------------------------------------------------------------------------------------------------------
# Swish
# ---------------------------------------------------------------------------------------------------------
def test_swish_is_x_times_sigmoid():
    x = torch.linspace(-20, 20, 4001, dtype=torch.float64)
    expected = x * torch.sigmoid(x)
    torch.testing.assert_close(Swish()(x), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(MemoryEfficientSwish()(x), expected, rtol=1e-12, atol=1e-12)
    xf = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(MemoryEfficientSwish()(xf), Swish()(xf))


def test_memory_efficient_swish_gradcheck():
    x = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(MemoryEfficientSwish(), (x,), eps=1e-6, atol=1e-8)


def test_memory_efficient_swish_backward_formula():
    x = (torch.randn(1000, dtype=torch.float64) * 6).requires_grad_()
    g = torch.randn(1000, dtype=torch.float64)
    (ours,) = torch.autograd.grad(MemoryEfficientSwish()(x), x, g)
    x2 = x.detach().clone().requires_grad_()
    (plain,) = torch.autograd.grad(x2 * torch.sigmoid(x2), x2, g)
    assert float((ours - plain).abs().max()) < 1e-10
    s = torch.sigmoid(x.detach())
    assert float((ours - g * s * (1 + x.detach() * (1 - s))).abs().max()) < 1e-12


def test_memory_efficient_swish_saves_only_its_input():
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    x = torch.randn(4, 8, requires_grad=True)
    h = x * 2  # a non-leaf input, as inside a network
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = MemoryEfficientSwish()(h)
    assert len(saved) == 1
    assert saved[0] is h or (saved[0].data_ptr() == h.data_ptr() and torch.equal(saved[0], h))
    assert not torch.equal(saved[0], y)
    # Whereas the naive formulation keeps x and sigmoid(x) alive.
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        h * torch.sigmoid(h)
    assert len(saved) >= 2
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_get_activation_factory():
    assert type(get_activation("swish")) is MemoryEfficientSwish
    assert type(get_activation("swish", memory_efficient=True)) is MemoryEfficientSwish
    assert type(get_activation("swish", memory_efficient=False)) is Swish
    relu6 = get_activation("relu6")
    assert isinstance(relu6, nn.ReLU6)
    assert torch.equal(relu6(torch.tensor([-1.0, 3.0, 7.0])), torch.tensor([0.0, 3.0, 6.0]))
    with pytest.raises(ValueError, match="gelu"):
        get_activation("gelu")


def test_set_swish_switches_every_activation():
    net = EfficientNet.from_name("efficientnet-b0", image_size=None)
    before = count_modules(net)
    n = before.get("MemoryEfficientSwish", 0)
    assert n == 2 + len(net._blocks) and before.get("Swish", 0) == 0  # stem, head and each block
    net.set_swish(memory_efficient=False)
    after = count_modules(net)
    assert after.get("MemoryEfficientSwish", 0) == 0 and after.get("Swish", 0) == n
    net.set_swish(memory_efficient=True)
    again = count_modules(net)
    assert again.get("MemoryEfficientSwish", 0) == n and again.get("Swish", 0) == 0
    plain = count_modules(EfficientNet.from_name("efficientnet-b0", memory_efficient=False))
    assert plain.get("Swish", 0) == n and plain.get("MemoryEfficientSwish", 0) == 0


def test_set_swish_keeps_relu6_in_lite():
    net = EfficientNet.from_name("efficientnet-lite0")
    before = count_modules(net)
    assert before.get("ReLU6", 0) == 2 + len(net._blocks)
    for flag in (False, True):
        net.set_swish(memory_efficient=flag)
        after = count_modules(net)
        assert after.get("ReLU6", 0) == before["ReLU6"]
        assert after.get("Swish", 0) == 0 and after.get("MemoryEfficientSwish", 0) == 0


# ---------------------------------------------------------------------------------------------------------
# TF "SAME" padding
# ---------------------------------------------------------------------------------------------------------
def tf_same_conv(x, weight, stride, dilation):
    """TensorFlow's padding='SAME' written out from its documentation: out = ceil(in / stride), total padding
    max((out - 1) * stride + effective_kernel - in, 0), the smaller half before, the larger after."""
    pads = []
    for axis in (3, 2):  # F.pad order: width first
        n = x.shape[axis]
        k_eff = (weight.shape[axis] - 1) * dilation + 1
        out = -(-n // stride)
        total = max((out - 1) * stride + k_eff - n, 0)
        pads += [total // 2, total - total // 2]
    return F.conv2d(F.pad(x, pads), weight, None, stride, 0, dilation)


SAME_CASES = [
    (h, w, k, s, d)
    for (h, w) in [(1, 1), (5, 5), (7, 10), (8, 8), (9, 4), (13, 13), (16, 15)]
    for (k, s, d) in [(1, 1, 1), (1, 2, 1), (2, 1, 1), (2, 2, 1), (3, 1, 1), (3, 2, 1), (5, 1, 1), (5, 2, 1),
                      (3, 1, 2), (3, 2, 2), (5, 2, 2), (4, 3, 1), (3, 3, 1)]
]


@pytest.mark.parametrize(("h", "w", "k", "s", "d"), SAME_CASES)
def test_dynamic_same_padding_matches_tf(h, w, k, s, d):
    torch.manual_seed(h * 1000 + w * 100 + k * 10 + s + d)
    conv = Conv2dDynamicSamePadding(3, 4, kernel_size=k, stride=s, dilation=d, bias=False)
    x = torch.randn(2, 3, h, w)
    y = conv(x)
    assert y.shape == (2, 4, math.ceil(h / s), math.ceil(w / s))
    torch.testing.assert_close(y, tf_same_conv(x, conv.weight, s, d), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("h", "w", "k", "s", "d"), SAME_CASES[::4])
def test_dynamic_same_padding_matches_efficientnet_pytorch(h, w, k, s, d):
    from efficientnet_pytorch.utils import Conv2dDynamicSamePadding as Reference

    ref = Reference(3, 4, kernel_size=k, stride=s, dilation=d, bias=True)
    conv = Conv2dDynamicSamePadding(3, 4, kernel_size=k, stride=s, dilation=d, bias=True)
    conv.load_state_dict(ref.state_dict())
    x = torch.randn(1, 3, h, w)
    torch.testing.assert_close(conv(x), ref(x), rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:Using padding='same'")
def test_stride_one_same_padding_matches_pytorch_same():
    # PyTorch's own padding="same" (stride 1) also puts the odd pixel after: an independent oracle.
    for k, d in [(2, 1), (3, 1), (4, 1), (3, 2), (4, 2), (5, 3)]:
        conv = Conv2dDynamicSamePadding(2, 3, kernel_size=k, dilation=d)
        x = torch.randn(1, 2, 9, 6)
        expected = F.conv2d(x, conv.weight, conv.bias, 1, "same", d)
        torch.testing.assert_close(conv(x), expected)


def test_odd_padding_goes_bottom_right():
    ones = torch.ones(1, 1, 8, 8)
    # k=3, s=2 on 8: out 4, total padding 1 -> after (bottom/right) only.
    conv = Conv2dDynamicSamePadding(1, 1, kernel_size=3, stride=2, bias=False)
    nn.init.ones_(conv.weight)
    y = conv(ones)[0, 0]
    assert y.shape == (4, 4)
    assert y[0, 0] == 9  # top-left window fully inside: nothing padded before
    assert y[-1, -1] == 4  # bottom-right window has one padded row and column
    assert y[0, -1] == 6 and y[-1, 0] == 6
    # k=2, s=1: total 1, after only.
    conv2 = Conv2dDynamicSamePadding(1, 1, kernel_size=2, stride=1, bias=False)
    nn.init.ones_(conv2.weight)
    y2 = conv2(ones)[0, 0]
    assert y2.shape == (8, 8) and y2[0, 0] == 4 and y2[-1, -1] == 1
    # Asymmetric input: a single pixel in the top-left corner is seen by the top-left output only.
    impulse = torch.zeros(1, 1, 8, 8)
    impulse[0, 0, 0, 0] = 1
    assert conv(impulse)[0, 0].nonzero().tolist() == [[0, 0]]
    static = Conv2dStaticSamePadding(1, 1, kernel_size=3, stride=2, image_size=8, bias=False)
    static.load_state_dict(conv.state_dict())
    assert torch.equal(static(ones), conv(ones))
    assert isinstance(static.static_padding, nn.ZeroPad2d)
    assert tuple(static.static_padding.padding) == (0, 1, 0, 1)


@pytest.mark.parametrize(("size", "k", "s", "d"), [(8, 3, 2, 1), (7, 3, 2, 1), (9, 5, 2, 1), (10, 5, 1, 1),
                                                    ((7, 12), 3, 2, 1), (11, 3, 1, 2), (6, 1, 1, 1), (5, 1, 2, 1)])
def test_static_same_padding_equals_dynamic_at_its_size(size, k, s, d):
    h, w = (size, size) if isinstance(size, int) else size
    static = Conv2dStaticSamePadding(3, 5, kernel_size=k, stride=s, dilation=d, image_size=size)
    dynamic = Conv2dDynamicSamePadding(3, 5, kernel_size=k, stride=s, dilation=d)
    dynamic.load_state_dict(static.state_dict())
    x = torch.randn(2, 3, h, w)
    assert torch.equal(static(x), dynamic(x))
    if k == 1 and s == 1:
        assert isinstance(static.static_padding, nn.Identity)
    with pytest.raises(ValueError, match=f"{h}x{w}"):
        static(torch.randn(2, 3, h + 1, w))
    with pytest.raises(ValueError):
        static(torch.randn(2, 3, h, w + 2))


def test_static_same_padding_needs_a_size():
    with pytest.raises(ValueError):
        Conv2dStaticSamePadding(3, 4, kernel_size=3, image_size=None)


def test_get_same_padding_conv2d_factory():
    assert get_same_padding_conv2d(None) is Conv2dDynamicSamePadding
    conv = get_same_padding_conv2d(32)(3, 8, kernel_size=3, stride=2, bias=False)
    assert isinstance(conv, Conv2dStaticSamePadding)
    assert conv.input_size == (32, 32) and conv.bias is None and conv.stride == (2, 2)
    assert conv(torch.randn(1, 3, 32, 32)).shape == (1, 8, 16, 16)
    rect = get_same_padding_conv2d((20, 30))(3, 8, kernel_size=3)
    assert rect.input_size == (20, 30)


def test_calculate_output_image_size():
    assert calculate_output_image_size(None, 2) is None
    assert calculate_output_image_size(224, 2) == [112, 112]
    assert calculate_output_image_size(7, 2) == [4, 4]
    assert calculate_output_image_size(7, 1) == [7, 7]
    assert calculate_output_image_size((15, 8), 2) == [8, 4]
    assert calculate_output_image_size([9, 10], 3) == [3, 4]
    for n in range(1, 40):
        for s in (1, 2, 3):
            assert calculate_output_image_size(n, s) == [math.ceil(n / s)] * 2


# ---------------------------------------------------------------------------------------------------------
# Drop connect
# ---------------------------------------------------------------------------------------------------------
def test_drop_connect_identity_in_eval_and_at_zero():
    x = torch.randn(8, 3, 4, 4)
    assert drop_connect(x, 0.5, training=False) is x
    assert drop_connect(x, 0.0, training=True) is x
    module = DropConnect(0.5).eval()
    assert torch.equal(module(x), x)


def test_drop_connect_masks_whole_samples():
    torch.manual_seed(0)
    p = 0.3
    x = torch.rand(256, 2, 3, 3) + 0.5
    y = drop_connect(x, p, training=True)
    assert y.shape == x.shape
    dropped = kept = 0
    for xi, yi in zip(x, y, strict=True):
        if torch.all(yi == 0):
            dropped += 1
        else:
            torch.testing.assert_close(yi, xi / (1 - p))
            kept += 1
    assert dropped > 0 and kept > 0
    assert abs(dropped / 256 - p) < 0.1
    module = DropConnect(p).train()
    assert module.p == p
    z = module(x)
    assert torch.all((z == 0).flatten(1).all(1) | torch.isclose(z, x / (1 - p)).flatten(1).all(1))


def test_drop_connect_preserves_the_expectation():
    torch.manual_seed(1234)
    x = torch.randn(1, 4, 2, 2)
    for p in (0.2, 0.5):
        samples = drop_connect(x.expand(20000, -1, -1, -1).contiguous(), p, training=True)
        torch.testing.assert_close(samples.mean(0, keepdim=True), x, rtol=0, atol=0.05 * float(x.abs().max()))
        # Not the identity: the variance is there.
        assert float(samples.std(0).mean()) > 0.1


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5])
def test_drop_connect_invalid_probability(p):
    with pytest.raises(ValueError):
        drop_connect(torch.randn(2, 3), p, training=True)
    with pytest.raises(ValueError):
        DropConnect(p)


def test_drop_connect_rate_grows_linearly_with_block_index():
    net = EfficientNet.from_name("efficientnet-b0", drop_connect_rate=0.3)
    n = len(net._blocks)
    seen: list[float] = []
    hooks = [b.register_forward_pre_hook(lambda m, args: seen.append(float(args[1]))) for b in net._blocks]
    net.train()
    net(torch.randn(2, 3, 32, 32))
    for h in hooks:
        h.remove()
    assert seen == pytest.approx([0.3 * i / n for i in range(n)])
    assert [net._block_drop_rate(i) for i in range(n)] == pytest.approx([0.3 * i / n for i in range(n)])
    assert seen[0] == 0 and all(b > a for a, b in zip(seen, seen[1:]))  # noqa: B905


# ---------------------------------------------------------------------------------------------------------
# MBConvBlock
# ---------------------------------------------------------------------------------------------------------
B0 = GlobalConfig()
LITE = GlobalConfig(activation="relu6", use_se=False)


def test_mbconv_structure():
    first = MBConvBlock(BlockConfig(1, 3, 1, 1, 32, 16, 0.25), B0)
    assert not hasattr(first, "_expand_conv") and not first.use_skip
    assert first._se_reduce.out_channels == 8 and first._se_expand.out_channels == 32
    block = MBConvBlock(BlockConfig(1, 5, 1, 6, 40, 40, 0.25), B0)
    assert block._expand_conv.out_channels == 240 and block._depthwise_conv.groups == 240
    assert block._se_reduce.out_channels == 10  # int(40 * 0.25), from the block's input width
    assert block._project_conv.out_channels == 40 and block.use_skip
    tiny = MBConvBlock(BlockConfig(1, 3, 1, 6, 3, 3, 0.25), B0)
    assert tiny._se_reduce.out_channels == 1  # max(1, int(0.75))
    assert not MBConvBlock(BlockConfig(1, 3, 2, 6, 40, 40, 0.25), B0).use_skip
    assert not MBConvBlock(BlockConfig(1, 3, 1, 6, 40, 80, 0.25), B0).use_skip
    assert not MBConvBlock(BlockConfig(1, 3, 1, 6, 40, 40, 0.25, id_skip=False), B0).use_skip
    lite = MBConvBlock(BlockConfig(1, 3, 1, 6, 40, 40, None), LITE)
    assert not hasattr(lite, "_se_reduce") and isinstance(lite._swish, nn.ReLU6)


def test_mbconv_skip_and_drop_connect():
    torch.manual_seed(0)
    cfg = BlockConfig(1, 3, 1, 6, 8, 8, 0.25)
    block = MBConvBlock(cfg, B0).eval()
    x = torch.randn(64, 8, 6, 6)
    no_skip = MBConvBlock(replace(cfg, id_skip=False), B0).eval()
    no_skip.load_state_dict(block.state_dict())
    branch = no_skip(x)
    # eval: residual add, drop connect ignored.
    torch.testing.assert_close(block(x, 0.5), x + branch)
    torch.testing.assert_close(block(x), x + branch)
    # training (BN on batch statistics): each sample either skips the branch or gets it scaled by 1/keep.
    block.train()
    no_skip.train()
    branch = no_skip(x)
    out = block(x, 0.5)
    dropped = 0
    for i in range(64):
        if torch.equal(out[i], x[i]):
            dropped += 1
        else:
            torch.testing.assert_close(out[i], x[i] + branch[i] / 0.5)
    assert 10 < dropped < 54
    torch.testing.assert_close(block(x, 0.0), x + branch)


def test_mbconv_forward_shapes_static_and_dynamic():
    cfg = BlockConfig(1, 5, 2, 6, 16, 24, 0.25)
    dynamic = MBConvBlock(cfg, B0).eval()
    static = MBConvBlock(cfg, B0, image_size=[15, 15]).eval()
    static.load_state_dict(dynamic.state_dict())
    x = torch.randn(2, 16, 15, 15)
    assert dynamic(x).shape == (2, 24, 8, 8)
    assert torch.equal(static(x), dynamic(x))
    with pytest.raises(ValueError):
        static(torch.randn(2, 16, 16, 16))
