"""Every inference engine computes the eager float32 model: same top-1 on real photos, logits within 1e-3;
and taking uint8 pixels (normalised by the engine) changes nothing against the float input path."""

from __future__ import annotations

import importlib.util

import numpy as np
import onnx
import pytest
import torch

from model import EfficientNet, default_weights_path, normalize, resize_and_crop
from model.export import export_onnx_bytes
from service.core.engines import TorchEngine, build_engine
from service.core.imaging import DRAFT_OVERSAMPLE, Preprocessor, decode_image
from service.core.loading import load_model
from service.core.settings import ModelSettings
from tests.helpers.components import missing_component
from tests.helpers.images import float_preprocessed

pytestmark = pytest.mark.slow  # real networks or many generated cases: not in `make test-fast`

BACKENDS = ["torch", "onnxruntime", "openvino"]


@pytest.fixture(scope="module")
def lite0():
    return EfficientNet.from_pretrained("efficientnet-lite0", default_weights_path("efficientnet-lite0")).eval()


@pytest.fixture(scope="module")
def float_batch(lite0, photos):
    """The real photos through the float preprocessing the service used before engines took uint8:
    decode, resize/crop, then ``model.normalize`` on the CPU."""
    spec = lite0.variant.preprocess
    images = [decode_image(data, max_pixels=10**8, min_size=DRAFT_OVERSAMPLE * spec.resize_size)
              for data in photos.values()]
    return np.stack([normalize(resize_and_crop(image, spec), spec) for image in images])


@pytest.fixture(scope="module")
def reference(lite0, photos, float_batch):
    """Eager float32 Lite0 (dynamic padding, unfused) on the real photos: the service's uint8 batch, and
    the eager model's outputs on the same photos normalised on the CPU."""
    pre = Preprocessor(lite0.variant.preprocess, max_pixels=10**8)
    batch = np.stack([pre(data) for data in photos.values()])
    assert batch.dtype == np.uint8
    with torch.inference_mode():
        features, logits = lite0.forward_features_and_logits(torch.from_numpy(float_batch))
    return batch, features.numpy(), logits.numpy()


@pytest.mark.parametrize("backend", BACKENDS)
def test_engine_matches_the_eager_model(backend, reference):
    if backend == "openvino" and importlib.util.find_spec("openvino") is None:
        pytest.skip("openvino is not installed (pip install 'effnet-serve[openvino]')")
    batch, features, logits = reference
    loaded = load_model(ModelSettings(backend=backend, num_threads=2))
    assert loaded.engine.backend == backend
    got_features, got_logits = loaded.engine.run(batch)
    assert np.array_equal(got_logits.argmax(1), logits.argmax(1))
    np.testing.assert_allclose(got_logits, logits, atol=1e-3, rtol=0)
    np.testing.assert_allclose(got_features, features, atol=1e-3, rtol=0)
    # Batch 1 gives the same rows as the batch.
    one_features, one_logits = loaded.engine.run(batch[:1])
    np.testing.assert_allclose(one_logits[0], got_logits[0], atol=1e-4, rtol=0)


def _float_input_runner(backend: str, net: EfficientNet):
    """The engine as it was before uint8 input: the float32 export (or eager form), fed normalised floats."""
    size = net.variant.preprocess.input_size
    if backend == "torch":
        engine = TorchEngine(net, torch.device("cpu"), torch.float32, image_size=size)
        return engine.run  # a float batch is taken as already normalised
    onnx_bytes = export_onnx_bytes(net, image_size=size, with_features=True)
    if backend == "onnxruntime":
        import onnxruntime as ort

        session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
        return lambda x: session.run(None, {"input": x})
    import openvino as ov

    compiled = ov.Core().compile_model(ov.Core().read_model(onnx_bytes), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return lambda x: tuple(compiled({0: x}).values())


@pytest.mark.parametrize("backend", BACKENDS)
def test_uint8_input_equals_normalising_in_float_first_within_1e5(backend, lite0, reference, float_batch):
    """uint8 pixels normalised by the engine (on its device, or inside the ONNX graph) give today's float
    path's features and logits within 1e-5 (relative to each output's scale) on the real photos."""
    if backend == "openvino" and importlib.util.find_spec("openvino") is None:
        pytest.skip("openvino is not installed (pip install 'effnet-serve[openvino]')")
    batch = reference[0]
    engine = load_model(ModelSettings(backend=backend, num_threads=2)).engine
    old_features, old_logits = _float_input_runner(backend, lite0)(float_batch)
    new_features, new_logits = engine.run(batch)
    for old, new in ((old_features, new_features), (old_logits, new_logits)):
        old = np.asarray(old)
        scale = max(1.0, float(np.abs(old).max()))
        assert float(np.abs(new - old).max()) <= 1e-5 * scale
    assert np.array_equal(new_logits.argmax(1), np.asarray(old_logits).argmax(1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_float_batch_runs_as_sent_within_1e4_of_the_eager_model(backend, lite0, photos):
    """A float32 batch (a normalised tensor off the 8-bit grid) enters each engine after its
    normalisation and gives the eager model's features and logits on the same tensor within 1e-4; the
    uint8 path of the same engine is untouched; other dtypes are refused, never cast."""
    if backend == "openvino" and importlib.util.find_spec("openvino") is None:
        missing_component("openvino is not installed (pip install 'effnet-serve[openvino]')")
    spec = lite0.variant.preprocess
    x = np.concatenate([float_preprocessed(data, spec.mean, spec.std) for data in photos.values()])
    pixels = np.rint((x * np.asarray(lite0.variant.preprocess.std, dtype=np.float32).reshape(1, 3, 1, 1)
                      + np.asarray(lite0.variant.preprocess.mean, dtype=np.float32).reshape(1, 3, 1, 1)) * 255)
    assert np.abs(x - normalize_pixels(np.clip(pixels, 0, 255).astype(np.uint8), lite0)).max() > 1e-3  # off the grid
    with torch.inference_mode():
        features, logits = lite0.forward_features_and_logits(torch.from_numpy(x))
    engine = build_engine(backend, lite0, torch.device("cpu"), torch.float32, num_threads=2, image_size=224)
    got_features, got_logits = engine.run(x)
    np.testing.assert_allclose(got_logits, logits.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(got_features, features.numpy(), atol=1e-4, rtol=0)
    uint8_features, uint8_logits = engine.run(np.clip(pixels, 0, 255).astype(np.uint8))
    assert uint8_logits.shape == got_logits.shape
    assert (np.argmax(uint8_logits, 1) == np.argmax(got_logits, 1)).all()
    for dtype in (np.float64, np.int16):
        with pytest.raises(TypeError, match="uint8 or float32"):
            engine.run(x.astype(dtype))


def normalize_pixels(pixels: np.ndarray, net) -> np.ndarray:
    spec = net.variant.preprocess
    mean = np.asarray(spec.mean, dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(spec.std, dtype=np.float32).reshape(1, 3, 1, 1)
    return (pixels.astype(np.float32) / np.float32(255) - mean) / std


def test_float_twin_graph_is_the_export_without_its_normalisation():
    """The float twin of a uint8 export: the normalisation (Cast, Mul, Sub) and its constants cut away, a
    float32 input feeding the first convolution; a graph without that entry is refused. (The int8 model's
    twin: tests/unit/test_quantize.py.)"""
    from model.export import ExportError, float_input_graph

    net = EfficientNet.from_name("efficientnet-lite0", image_size=32).eval()
    uint8_model = export_onnx_bytes(net, image_size=32, with_features=True, uint8_input=True)
    float_model = float_input_graph(uint8_model)
    graph = onnx.load_from_string(float_model).graph
    assert [i.name for i in graph.input] == ["input"]
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert len([n for n in graph.node if n.op_type == "Cast"]) < len(
        [n for n in onnx.load_from_string(uint8_model).graph.node if n.op_type == "Cast"])
    assert not {n.op_type for n in graph.node if "input" in n.input} & {"Cast", "Mul", "Sub"}
    pixels = np.random.default_rng(0).integers(0, 256, (2, 3, 32, 32), dtype=np.uint8)
    import onnxruntime as ort

    expected = ort.InferenceSession(uint8_model).run(None, {"input": pixels})
    got = ort.InferenceSession(float_model).run(None, {"input": normalize_pixels(pixels, net)})
    for e, g in zip(expected, got, strict=True):
        np.testing.assert_allclose(g, e, atol=1e-5 * max(1.0, float(np.abs(e).max())), rtol=0)
    with pytest.raises(ExportError, match="uint8"):
        float_input_graph(export_onnx_bytes(net, image_size=32, with_features=True))


def test_bfloat16_torch_engine_keeps_the_top1(reference):
    batch, _, logits = reference
    loaded = load_model(ModelSettings(backend="torch", dtype="bfloat16", num_threads=2))
    _, got = loaded.engine.run(batch)
    assert loaded.engine.dtype == "bfloat16"
    assert np.array_equal(got.argmax(1), logits.argmax(1))


def test_auto_picks_onnxruntime_for_float32_on_cpu_and_torch_otherwise():
    from service.core.loading import resolve_backend

    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu, "float32") == "onnxruntime"
    assert resolve_backend("auto", cpu, "bfloat16") == "torch"
    assert resolve_backend("auto", torch.device("cuda"), "float16") == "torch"


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_batches_in_two_slots_at_once_give_the_answers_of_one_slot(backend, lite0, reference):
    """With EFFNET_MAX_CONCURRENT_BATCHES=2 two inference threads run batches at once. The CPU engines must
    answer each as if alone (OpenVINO: one infer request per slot, since a request is not thread-safe)."""
    if backend == "openvino" and importlib.util.find_spec("openvino") is None:
        pytest.skip("openvino is not installed (pip install 'effnet-serve[openvino]')")
    from concurrent.futures import ThreadPoolExecutor

    from service.core.engines import build_engine

    batch, _, _ = reference
    engine = build_engine(backend, lite0, torch.device("cpu"), torch.float32, num_threads=1, image_size=224)
    expected = engine.run(batch)[1]

    def many(slot: int) -> list[np.ndarray]:
        return [engine.run(batch, slot)[1] for _ in range(8)]

    with ThreadPoolExecutor(2) as pool:
        results = [logits for future in [pool.submit(many, slot) for slot in (0, 1)] for logits in future.result()]
    for logits in results:
        np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=0)
