"""Shared helpers of the model test suite (tests/unit/test_model_*.py)."""

from __future__ import annotations

import torch
from torch import nn

from model import EfficientNet

B_SERIES = [f"efficientnet-b{i}" for i in range(9)]
LITE_SERIES = [f"efficientnet-lite{i}" for i in range(5)]


def reference_net(name: str, size: int = 32) -> nn.Module:
    """The reference implementation of ``name`` with dynamic padding (efficientnet_pytorch /
    efficientnet_lite_pytorch), random weights and randomised, calibrated BatchNorm statistics."""
    if "lite" in name:
        from efficientnet_lite_pytorch import EfficientNet as Reference
    else:
        from efficientnet_pytorch import EfficientNet as Reference
    ref = Reference.from_name(name, image_size=None)
    randomize_batchnorm(ref, size=size)
    return ref.eval()


def randomize_batchnorm(net: nn.Module, seed: int = 0, size: int = 32) -> nn.Module:
    """Non-trivial BatchNorm affine parameters and running statistics, so that comparisons mean something.

    With default initialisation and unit running statistics the signal of a deep network dies out and the
    logits hardly depend on the input (every comparison would be near-trivial). So the running statistics
    are first calibrated on a random batch of ``size`` x ``size`` images (each layer then passes on a
    normalised signal; calibrate at the size the test uses), then perturbed, and the affine parameters are
    random. B0/Lite0 are then well conditioned (a 1e-6 input change moves the logits by ~1e-5 relative);
    the deepest variants (B6-B8) stay chaotic in eval mode, which a bit-exact comparison tolerates.
    """
    g = torch.Generator().manual_seed(seed)
    named = [(k, m) for k, m in net.named_modules() if isinstance(m, nn.BatchNorm2d)]
    bns = [m for _, m in named]
    with torch.no_grad():
        for key, m in named:
            n = m.num_features
            # Residual branches (the projection's BN) start small, so that the deep random network stays
            # stable (near identity per block) instead of chaotic in eval mode.
            gain = 0.2 if key.startswith("_blocks.") and key.endswith("_bn2") else 1.0
            m.weight.copy_((torch.rand(n, generator=g) + 0.5) * gain)
            m.bias.copy_(torch.randn(n, generator=g) * 0.1 * gain)
            m.reset_running_stats()
        momenta = [m.momentum for m in bns]
        for m in bns:
            m.momentum = 1.0
        mode = net.training
        net.eval()
        for m in bns:
            m.train()
        in_channels = next(m for m in net.modules() if isinstance(m, nn.Conv2d)).in_channels
        net(torch.randn(32 if size <= 64 else 8, in_channels, size, size, generator=g))
        net.train(mode)
        for m, momentum in zip(bns, momenta, strict=True):
            m.momentum = momentum
            n = m.num_features
            m.running_mean.add_(torch.randn(n, generator=g) * 0.1 * m.running_var.sqrt())
            # Channels that barely varied on the calibration batch would amplify any other input
            # (1 / sqrt(var + eps)) and make the random network chaotic: floor their variance.
            m.running_var.clamp_(min=0.25 * float(m.running_var.mean()))
            m.running_var.mul_(torch.rand(n, generator=g) * 0.5 + 0.75)
    return net


def ours_from_reference(ref: nn.Module, name: str, **kwargs) -> EfficientNet:
    """Our network of ``name`` holding the reference's state dict (loaded strictly)."""
    net = EfficientNet.from_name(name, **kwargs)
    net.load_state_dict(ref.state_dict(), strict=True)
    return net.eval()


def random_net(name: str = "efficientnet-b0", seed: int = 0, size: int = 32, **kwargs) -> EfficientNet:
    """Our randomly initialised network with randomised BatchNorm, in eval mode."""
    torch.manual_seed(seed)
    return randomize_batchnorm(EfficientNet.from_name(name, **kwargs), seed, size).eval()


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    """``actual`` equals ``expected`` to ``rel`` relative to the largest magnitude of ``expected``."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = float(expected.abs().max())
    assert scale > 0
    err = float((actual - expected).abs().max())
    assert err <= rel * scale, f"max abs error {err:.3g} > {rel:g} * {scale:.3g}"


def count_modules(net: nn.Module) -> dict[str, int]:
    counts: dict[str, int] = {}
    for m in net.modules():
        counts[type(m).__name__] = counts.get(type(m).__name__, 0) + 1
    return counts
