"""Every inference engine computes the eager float32 model: same top-1 on real photos, logits within 1e-3."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from model import EfficientNet, default_weights_path
from service.core.imaging import Preprocessor
from service.core.loading import load_model
from service.core.settings import Settings

pytestmark = pytest.mark.slow  # real networks or many generated cases: not in `make test-fast`

BACKENDS = ["torch", "onnxruntime", "openvino"]


@pytest.fixture(scope="module")
def reference(photos):
    """Eager float32 Lite0 (dynamic padding, unfused) on the real photos, preprocessed as the service does."""
    net = EfficientNet.from_pretrained("efficientnet-lite0", default_weights_path("efficientnet-lite0")).eval()
    pre = Preprocessor(net.variant.preprocess, max_pixels=10**8)
    batch = np.stack([pre(data) for data in photos.values()])
    with torch.inference_mode():
        features, logits = net.forward_features_and_logits(torch.from_numpy(batch))
    return batch, features.numpy(), logits.numpy()


@pytest.mark.parametrize("backend", BACKENDS)
def test_engine_matches_the_eager_model(backend, reference):
    if backend == "openvino" and importlib.util.find_spec("openvino") is None:
        pytest.skip("openvino is not installed (pip install 'effnet-serve[openvino]')")
    batch, features, logits = reference
    loaded = load_model(Settings(backend=backend, num_threads=2))
    assert loaded.engine.backend == backend
    got_features, got_logits = loaded.engine.run(batch)
    assert np.array_equal(got_logits.argmax(1), logits.argmax(1))
    np.testing.assert_allclose(got_logits, logits, atol=1e-3, rtol=0)
    np.testing.assert_allclose(got_features, features, atol=1e-3, rtol=0)
    # Batch 1 gives the same rows as the batch.
    one_features, one_logits = loaded.engine.run(batch[:1])
    np.testing.assert_allclose(one_logits[0], got_logits[0], atol=1e-4, rtol=0)


def test_bfloat16_torch_engine_keeps_the_top1(reference):
    batch, _, logits = reference
    loaded = load_model(Settings(backend="torch", dtype="bfloat16", num_threads=2))
    _, got = loaded.engine.run(batch)
    assert loaded.engine.dtype == "bfloat16"
    assert np.array_equal(got.argmax(1), logits.argmax(1))


def test_auto_picks_onnxruntime_for_float32_on_cpu_and_torch_otherwise():
    from service.core.loading import resolve_backend

    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu, "float32") == "onnxruntime"
    assert resolve_backend("auto", cpu, "bfloat16") == "torch"
    assert resolve_backend("auto", torch.device("cuda"), "float16") == "torch"
