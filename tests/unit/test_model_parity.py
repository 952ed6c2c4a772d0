"""Parity with the reference packages (efficientnet_pytorch 0.7.1, efficientnet_lite_pytorch 0.1.0), and
the network's feature APIs."""

from __future__ import annotations

import pytest
import torch

from model import EfficientNet
from tests.helpers.model import (
    B_SERIES,
    LITE_SERIES,
    assert_close_rel,
    ours_from_reference,
    random_net,
    reference_net,
)

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]

# Small inputs keep the large variants fast; 64 still leaves a 2x2 map after the /32 reduction.
SIZES = {name: 64 for name in B_SERIES + LITE_SERIES}
SIZES.update({"efficientnet-b7": 32, "efficientnet-b8": 32})


@pytest.mark.parametrize("name", B_SERIES + LITE_SERIES)
def test_reference_state_dict_loads_strictly_and_outputs_agree(name):
    torch.manual_seed(0)
    size = SIZES[name]
    ref = reference_net(name, size)
    ours = EfficientNet.from_name(name)
    result = ours.load_state_dict(ref.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    ours.eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = ref(x)
        got = ours(x)
    assert got.shape == (2, 1000)
    assert torch.isfinite(expected).all()
    assert_close_rel(got, expected, 1e-5)
    # Something non-trivial was compared: the two samples give different logits.
    assert float((expected[0] - expected[1]).abs().max()) > 0.1 * float(expected.abs().max())


@pytest.mark.parametrize("name", ["efficientnet-b0", "efficientnet-lite0"])
def test_state_dict_keys_and_shapes_identical_to_reference(name):
    ref = reference_net(name)
    ours = EfficientNet.from_name(name)
    ref_sd, ours_sd = ref.state_dict(), ours.state_dict()
    assert list(ours_sd) == list(ref_sd)
    assert {k: tuple(v.shape) for k, v in ours_sd.items()} == {k: tuple(v.shape) for k, v in ref_sd.items()}


@pytest.fixture(scope="module")
def b0_pair():
    torch.manual_seed(0)
    ref = reference_net("efficientnet-b0")
    return ref, ours_from_reference(ref, "efficientnet-b0")


def test_extract_endpoints_match_reference(b0_pair):
    ref, ours = b0_pair
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        got = ours.extract_endpoints(x)
        expected = ref.extract_endpoints(x)
    assert list(got) == [f"reduction_{i}" for i in range(1, 7)] == list(expected)
    spatial = [(48, 64), (24, 32), (12, 16), (6, 8), (3, 4), (3, 4)]
    channels = [16, 24, 40, 112, 320, 1280]
    for (key, value), (h, w), c in zip(got.items(), spatial, channels, strict=True):
        assert value.shape == (2, c, h, w), key
        assert_close_rel(value, expected[key], 1e-5)
    with torch.no_grad():
        torch.testing.assert_close(got["reduction_6"], ours.extract_features(x))


def test_extract_features_and_pooled_outputs(b0_pair):
    ref, ours = b0_pair
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        features = ours.extract_features(x)
        assert features.shape == (3, 1280, 2, 2)
        assert_close_rel(features, ref.extract_features(x), 1e-5)
        pooled, logits = ours.forward_features_and_logits(x)
        torch.testing.assert_close(pooled, features.mean((2, 3)))
        torch.testing.assert_close(logits, ours(x))

        headless = EfficientNet.from_name("efficientnet-b0", include_top=False)
        result = headless.load_state_dict(ref.state_dict(), strict=False)
        assert result.unexpected_keys == ["_fc.weight", "_fc.bias"] and not result.missing_keys
        headless.eval()
        out = headless(x)
        assert out.shape == (3, headless.num_features) == (3, 1280)
        torch.testing.assert_close(out, pooled)
        # No classifier: the same two outputs, logits of width 0 (a server refuses to classify).
        headless_pooled, no_logits = headless.forward_features_and_logits(x)
        torch.testing.assert_close(headless_pooled, pooled)
        assert no_logits.shape == (3, 0)


def test_eval_is_deterministic_and_train_is_stochastic(b0_pair):
    _, ours = b0_pair
    net = EfficientNet.from_name("efficientnet-b0")
    net.load_state_dict(ours.state_dict())
    x = torch.randn(4, 3, 32, 32)
    net.eval()
    with torch.no_grad():
        assert torch.equal(net(x), net(x))
        net.train()
        torch.manual_seed(0)
        a = net(x)
        b = net(x)  # dropout and drop connect draw new masks
    assert not torch.equal(a, b)


@pytest.mark.parametrize(("name", "size"), [("efficientnet-b0", 96), ("efficientnet-b0", (64, 80)),
                                            ("efficientnet-b3", 75), ("efficientnet-lite0", 224)])
def test_dynamic_and_static_padding_agree_at_static_size(name, size):
    h, w = (size, size) if isinstance(size, int) else size
    dynamic = random_net(name, size=min(h, w))
    static = EfficientNet.from_name(name, image_size=size)
    static.load_state_dict(dynamic.state_dict(), strict=True)
    static.eval()
    x = torch.randn(2, 3, h, w)
    with torch.no_grad():
        torch.testing.assert_close(static(x), dynamic(x), rtol=1e-5, atol=1e-6)
        ends_s, ends_d = static.extract_endpoints(x), dynamic.extract_endpoints(x)
    assert list(ends_s) == list(ends_d)
    for key in ends_d:
        torch.testing.assert_close(ends_s[key], ends_d[key], rtol=1e-5, atol=1e-6)
    # Fed a size it was not built for, the static network refuses instead of computing wrong maps.
    with pytest.raises(ValueError, match="static"):
        static(torch.randn(1, 3, h + 32, w + 32))


def test_dynamic_padding_takes_any_size(b0_pair):
    _, ours = b0_pair
    with torch.no_grad():
        for h, w in [(33, 33), (57, 91), (224, 160), (1, 1)]:
            assert ours(torch.randn(1, 3, h, w)).shape == (1, 1000)


@pytest.mark.parametrize(("shape", "pattern"), [((1, 1, 64, 64), "channels"), ((1, 4, 64, 64), "channels"),
                                                ((3, 64, 64), "4-D"), ((1, 1, 3, 64, 64), "4-D"),
                                                ((3,), "4-D")])
def test_bad_input_shape_is_a_clear_error(b0_pair, shape, pattern):
    _, ours = b0_pair
    x = torch.randn(*shape)
    for fn in (ours, ours.extract_features, ours.extract_endpoints):
        with pytest.raises(ValueError, match=pattern):
            fn(x)
    grey = EfficientNet.from_name("efficientnet-b0", in_channels=1).eval()
    assert grey(torch.randn(1, 1, 32, 32)).shape == (1, 1000)
    with pytest.raises(ValueError, match="channels"):
        grey(torch.randn(1, 3, 32, 32))
