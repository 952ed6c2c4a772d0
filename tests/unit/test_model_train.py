"""A training step on B0 with both Swish forms."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from model import EfficientNet
from tests.helpers.model import count_modules

pytestmark = pytest.mark.slow  # real networks or many generated cases: not in `make test-fast`


def make_b0(memory_efficient: bool, seed: int = 0) -> EfficientNet:
    torch.manual_seed(seed)
    return EfficientNet.from_name("efficientnet-b0", num_classes=5, dropout_rate=0.0, drop_connect_rate=0.0,
                                  memory_efficient=memory_efficient)


def batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 3, 64, 64, generator=g), torch.tensor([0, 1, 2, 3])


def grads_after_step(net: EfficientNet):
    x, y = batch()
    net.train()
    net.zero_grad()
    loss = F.cross_entropy(net(x), y)
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in net.named_parameters()}


def test_both_swish_forms_give_the_same_gradients():
    fast = make_b0(memory_efficient=True)
    plain = make_b0(memory_efficient=False)
    plain.load_state_dict(fast.state_dict())
    # One per block (16), the stem's, and the head's own (_head_swish, the layer a CAM hook targets).
    assert count_modules(fast).get("MemoryEfficientSwish", 0) == 18
    assert count_modules(plain).get("Swish", 0) == 18
    loss_a, grads_a = grads_after_step(fast)
    loss_b, grads_b = grads_after_step(plain)
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-6)
    assert set(grads_a) == set(grads_b)
    # Float32 rounding differs between the two formulas; compare against the gradient's overall scale (some
    # tensors, e.g. biases just before a training-mode BatchNorm, have gradients that are pure rounding noise).
    scale = max(float(g.abs().max()) for g in grads_b.values())
    for key in grads_a:
        assert torch.isfinite(grads_a[key]).all(), key
        assert float((grads_a[key] - grads_b[key]).abs().max()) <= 1e-4 * scale, key
        big = float(grads_b[key].abs().max())
        if big > 1e-3 * scale:
            torch.testing.assert_close(grads_a[key], grads_b[key], rtol=1e-3, atol=1e-3 * big)
    flat_a = torch.cat([g.flatten() for g in grads_a.values()])
    flat_b = torch.cat([g.flatten() for g in grads_b.values()])
    assert float((flat_a - flat_b).norm()) <= 1e-4 * float(flat_b.norm())
    # The gradient reaches the stem: nothing is detached on the way.
    assert float(grads_a["_conv_stem.weight"].abs().max()) > 0


@pytest.mark.parametrize("memory_efficient", [True, False])
def test_training_steps_update_parameters_and_reduce_the_loss(memory_efficient):
    net = make_b0(memory_efficient)
    before = copy.deepcopy(net.state_dict())
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    x, y = batch()
    net.train()
    losses = []
    for _ in range(3):
        optimizer.zero_grad()
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
        optimizer.step()
        losses.append(float(loss.detach()))
    after = net.state_dict()
    for key in ("_conv_stem.weight", "_blocks.0._depthwise_conv.weight", "_blocks.15._project_conv.weight",
                "_conv_head.weight", "_fc.weight", "_bn1.weight"):
        assert not torch.equal(before[key], after[key]), key
    # BatchNorm running statistics move in training mode.
    assert not torch.equal(before["_bn0.running_mean"], after["_bn0.running_mean"])
    assert int(after["_bn0.num_batches_tracked"]) == 3
    assert losses[-1] < 0.5 * losses[0], losses


def test_drop_connect_and_dropout_training_step_runs():
    torch.manual_seed(0)
    net = EfficientNet.from_name("efficientnet-b0", num_classes=5)  # default dropout 0.2, drop connect 0.2
    x, y = batch()
    net.train()
    loss = F.cross_entropy(net(x), y)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


def test_eval_mode_has_no_autograd_surprises():
    net = make_b0(True).eval()
    with torch.inference_mode():
        out = net(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 5) and not out.requires_grad
