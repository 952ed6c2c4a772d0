"""Building blocks: activations, TensorFlow-style "SAME" convolutions and stochastic depth."""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

ImageSize = int | Sequence[int] | None


# ---------------------------------------------------------------------------------------------------------
# Activations
# ---------------------------------------------------------------------------------------------------------
class Swish(nn.Module):
    """x * sigmoid(x). Plain autograd; scriptable and exportable."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(x)


class _SwishFunction(torch.autograd.Function):
    """Swish that saves only its input and recomputes the sigmoid in backward.

    Autograd through ``x * sigmoid(x)`` keeps both x and sigmoid(x) alive for backward; keeping only x
    halves the activation memory of every Swish, at the price of one more sigmoid in the backward pass.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        return x * torch.sigmoid(x)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(x)
        return grad_output * (s * (1 + x * (1 - s)))


class MemoryEfficientSwish(nn.Module):
    """Swish whose backward recomputes sigmoid instead of storing it (see ``_SwishFunction``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _SwishFunction.apply(x)


def get_activation(name: str, memory_efficient: bool = True) -> nn.Module:
    """Activation module by name: ``swish`` (memory-efficient or plain) or ``relu6`` (EfficientNet-Lite)."""
    if name == "swish":
        return MemoryEfficientSwish() if memory_efficient else Swish()
    if name == "relu6":
        return nn.ReLU6(inplace=False)
    raise ValueError(f"unknown activation {name!r}; expected 'swish' or 'relu6'")


# ---------------------------------------------------------------------------------------------------------
# "SAME" padding
# ---------------------------------------------------------------------------------------------------------
def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    if isinstance(size, Sequence) and len(size) == 2:
        return int(size[0]), int(size[1])
    raise TypeError(f"image size must be an int or a (height, width) pair, got {size!r}")


def calculate_output_image_size(image_size: ImageSize, stride: int | Sequence[int]) -> list[int] | None:
    """Spatial size after a "SAME" convolution with ``stride``: ceil(in / stride). ``None`` passes through."""
    if image_size is None:
        return None
    h, w = _pair(image_size)
    sh, sw = _pair(stride)
    return [int(math.ceil(h / sh)), int(math.ceil(w / sw))]


def same_padding(in_size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """(before, after) padding of one axis so that out = ceil(in / stride); the odd pixel goes after."""
    out = math.ceil(in_size / stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - in_size, 0)
    return total // 2, total - total // 2


class Conv2dDynamicSamePadding(nn.Conv2d):
    """Conv2d with TF "SAME" padding computed from each input's size in forward.

    Works for any input size; costs a pad per call. Used when the model is built without an image size.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 dilation: int = 1, groups: int = 1, bias: bool = True):
        super().__init__(in_channels, out_channels, kernel_size, stride, 0, dilation, groups, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2], x.shape[-1]
        kh, kw = self.weight.shape[-2], self.weight.shape[-1]
        top, bottom = same_padding(ih, kh, self.stride[0], self.dilation[0])
        left, right = same_padding(iw, kw, self.stride[1], self.dilation[1])
        if top or bottom or left or right:
            x = F.pad(x, [left, right, top, bottom])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class Conv2dStaticSamePadding(nn.Conv2d):
    """Conv2d with TF "SAME" padding fixed at construction for one input size.

    The padding is a ``ZeroPad2d`` (or identity when none is needed), so the graph has no shape
    arithmetic: this is the form that exports to ONNX and scripts with TorchScript. Feeding another size
    would silently compute wrong feature maps, so forward checks the size and raises instead.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 image_size: ImageSize = None, dilation: int = 1, groups: int = 1, bias: bool = True):
        super().__init__(in_channels, out_channels, kernel_size, stride, 0, dilation, groups, bias)
        if image_size is None:
            raise ValueError("Conv2dStaticSamePadding needs an image_size")
        ih, iw = _pair(image_size)
        kh, kw = self.weight.shape[-2], self.weight.shape[-1]
        top, bottom = same_padding(ih, kh, self.stride[0], self.dilation[0])
        left, right = same_padding(iw, kw, self.stride[1], self.dilation[1])
        self.input_size = (ih, iw)
        self.static_padding: nn.Module = (
            nn.ZeroPad2d((left, right, top, bottom)) if (top or bottom or left or right) else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] != self.input_size[0] or x.shape[-1] != self.input_size[1]:
            raise ValueError(
                f"static-padding convolution built for {self.input_size[0]}x{self.input_size[1]} inputs got "
                f"{x.shape[-2]}x{x.shape[-1]}; build the model with image_size=None (dynamic padding) "
                "or with this image size"
            )
        x = self.static_padding(x)
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class Conv2dSymmetricPadding(nn.Conv2d):
    """Conv2d with PyTorch's symmetric padding, (k - 1) // 2 * dilation on every side (torchvision's and
    timm's native EfficientNets). For a stride-2 layer on an even input this pads one pixel more on the
    top/left than TF's "SAME" does, so weights trained one way give other answers the other way."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 image_size: ImageSize = None, dilation: int = 1, groups: int = 1, bias: bool = True):
        super().__init__(in_channels, out_channels, kernel_size, stride, (kernel_size - 1) // 2 * dilation,
                         dilation, groups, bias)


def get_same_padding_conv2d(image_size: ImageSize = None, padding: str = "same"):
    """Conv2d class for a padding mode. ``same``: TF "SAME", dynamic when ``image_size`` is None, else static
    for that size; ``symmetric``: PyTorch's symmetric padding (any input size)."""
    if padding == "symmetric":
        return Conv2dSymmetricPadding
    if padding != "same":
        raise ValueError(f"unknown padding mode {padding!r}; expected 'same' or 'symmetric'")
    if image_size is None:
        return Conv2dDynamicSamePadding
    return partial(Conv2dStaticSamePadding, image_size=image_size)


# ---------------------------------------------------------------------------------------------------------
# Stochastic depth
# ---------------------------------------------------------------------------------------------------------
def drop_connect(inputs: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Drop whole samples of a residual branch with probability ``p``, scaling survivors by 1/(1-p).

    The expectation is unchanged; in eval (or with p == 0) this is the identity.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"drop connect probability must be in [0, 1), got {p}")
    if not training or p == 0.0:
        return inputs
    keep_prob = 1.0 - p
    shape = (inputs.shape[0],) + (1,) * (inputs.dim() - 1)
    mask = torch.empty(shape, dtype=inputs.dtype, device=inputs.device).bernoulli_(keep_prob)
    return inputs * mask / keep_prob


class DropConnect(nn.Module):
    """Module form of :func:`drop_connect`."""

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop connect probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_connect(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
