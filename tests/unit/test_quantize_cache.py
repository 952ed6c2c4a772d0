"""The service's int8 model (service.core.quantized, load_model with EFFNET_DTYPE=int8): quantised once and
reused from EFFNET_CACHE_DIR on the next start; rebuilt when the entry is corrupt or the weights change;
EFFNET_INT8_MODEL served after a shape check; every unusable configuration is one clear StartupError."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

import service.core.quantized as quantized_module
from model import EfficientNet, default_weights_path
from service.core.errors import StartupError
from service.core.loading import load_model
from service.core.settings import ModelSettings
from tests.helpers.calibration import make_calibration_dir

pytestmark = pytest.mark.slow  # real networks quantised: not in `make test-fast`

VARIANT = "efficientnet-lite0"


@pytest.fixture(scope="module")
def calibration_dir(tmp_path_factory) -> Path:
    return make_calibration_dir(tmp_path_factory.mktemp("calibration"), count=36, seed=1)


@pytest.fixture()
def quantize_calls(monkeypatch):
    """Counts real quantisations (the function is still the real one)."""
    calls: list[int] = []
    real = quantized_module.quantize_model

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(quantized_module, "quantize_model", counting)
    return calls


def _int8(cache_dir: Path, calibration_dir: Path, **overrides) -> ModelSettings:
    return ModelSettings(dtype="int8", calibration_dir=str(calibration_dir), cache_dir=str(cache_dir), num_threads=1,
                    **overrides)


def test_cache_is_reused_then_rebuilt_when_corrupt_or_weights_change(tmp_path, calibration_dir, quantize_calls,
                                                                     photos):
    cache = tmp_path / "cache"
    first = load_model(_int8(cache, calibration_dir))
    info = first.quantization
    assert first.engine.dtype == "int8" and first.engine.backend == "onnxruntime"
    assert info.cache_hit is False and info.source == "calibrated" and info.calibration_count == 36
    assert len(quantize_calls) == 1
    entry = Path(info.cache_file)
    assert entry.parent == cache and entry.exists() and entry.with_suffix(".json").exists()

    second = load_model(_int8(cache, calibration_dir))
    assert second.quantization.cache_hit is True and len(quantize_calls) == 1
    assert second.quantization.calibration_sha256 == info.calibration_sha256
    batch = np.zeros((2, 3, 224, 224), dtype=np.uint8)
    np.testing.assert_array_equal(first.engine.run(batch)[1], second.engine.run(batch)[1])

    # A flipped byte in the model: the SHA-256 in the metadata no longer matches.
    data = bytearray(entry.read_bytes())
    data[len(data) // 2] ^= 0xFF
    entry.write_bytes(bytes(data))
    third = load_model(_int8(cache, calibration_dir))
    assert third.quantization.cache_hit is False and len(quantize_calls) == 2
    assert hashlib.sha256(entry.read_bytes()).hexdigest() != hashlib.sha256(bytes(data)).hexdigest()

    # Garbage metadata beside a whole model: rebuilt too, never trusted.
    entry.with_suffix(".json").write_text("{not json")
    assert load_model(_int8(cache, calibration_dir)).quantization.cache_hit is False
    assert len(quantize_calls) == 3
    assert load_model(_int8(cache, calibration_dir)).quantization.cache_hit is True

    # Other weights (same variant, a changed tensor): another key, so a new quantisation.
    net = EfficientNet.from_pretrained(VARIANT, default_weights_path(VARIANT))
    state = net.state_dict()
    state["_fc.bias"] = state["_fc.bias"] + 0.01
    weights = tmp_path / "tuned.pth"
    import torch

    torch.save(state, weights)
    other = load_model(_int8(cache, calibration_dir, weights=str(weights)))
    assert other.quantization.cache_hit is False and len(quantize_calls) == 4
    assert other.quantization.cache_file != info.cache_file


def test_unwritable_cache_still_serves(tmp_path, calibration_dir, quantize_calls):
    blocker = tmp_path / "file-not-folder"
    blocker.write_text("x")
    model = load_model(_int8(blocker / "cache", calibration_dir))
    assert model.engine.dtype == "int8"
    assert model.quantization.cache_hit is False and model.quantization.cache_file is None


def test_int8_model_file_is_served_and_checked(tmp_path, calibration_dir):
    cache = tmp_path / "cache"
    made = load_model(_int8(cache, calibration_dir))
    baked = tmp_path / "baked.int8.onnx"
    baked.write_bytes(Path(made.quantization.cache_file).read_bytes())
    served = load_model(ModelSettings(dtype="int8", int8_model=str(baked), num_threads=1))
    assert served.quantization.source == "file" and served.quantization.cache_hit is None
    assert served.quantization.calibration_count == 36

    # A float32 export (float input) is refused, with what it takes and what is needed.
    from model.export import export_onnx_bytes

    float_file = tmp_path / "float.onnx"
    float_file.write_bytes(export_onnx_bytes(EfficientNet.from_name(VARIANT), with_features=True))
    with pytest.raises(StartupError, match="takes float Nx3x224x224; this variant needs uint8 Nx3x224x224"):
        load_model(ModelSettings(dtype="int8", int8_model=str(float_file), num_threads=1))
    # Another variant's input size is refused as well.
    with pytest.raises(StartupError, match="needs uint8 Nx3x240x240"):
        load_model(ModelSettings(dtype="int8", int8_model=str(baked), model="efficientnet-lite1", num_threads=1))
    (tmp_path / "junk.onnx").write_bytes(b"junk")
    with pytest.raises(StartupError, match="not a readable ONNX model"):
        load_model(ModelSettings(dtype="int8", int8_model=str(tmp_path / "junk.onnx"), num_threads=1))


@pytest.mark.parametrize("case", ["unset", "missing", "empty", "all bad", "torch backend"])
def test_unusable_int8_configuration_is_one_clear_startup_error(tmp_path, case):
    folder = tmp_path / "photos"
    settings = {"dtype": "int8", "cache_dir": str(tmp_path / "cache"), "calibration_dir": str(folder)}
    expected = {
        "unset": "EFFNET_DTYPE=int8 needs EFFNET_CALIBRATION_DIR",
        "missing": "does not exist",
        "empty": "is empty",
        "all bad": "has 0 readable photos (33 unreadable of 33 files); at least 32 are needed",
        "torch backend": "runs with EFFNET_BACKEND=onnxruntime or openvino, not torch",
    }[case]
    if case == "unset":
        del settings["calibration_dir"]
    if case in ("empty", "all bad"):
        folder.mkdir()
    if case == "all bad":
        for i in range(33):
            (folder / f"{i:02d}.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    if case == "torch backend":
        settings["backend"] = "torch"
    with pytest.raises(StartupError) as raised:
        load_model(ModelSettings(**settings))
    message = str(raised.value)
    assert expected in message and "\n" not in message, message


def test_int8_on_a_gpu_is_refused():
    import torch

    from service.core.loading import resolve_backend

    with pytest.raises(StartupError, match="EFFNET_DTYPE=int8 runs on cpu"):
        resolve_backend("auto", torch.device("cuda"), "int8")


def test_bfloat16_on_openvino_is_refused_where_the_cpu_lacks_it(monkeypatch):
    pytest.importorskip("openvino")
    import service.core.engines.openvino_engine as ov_engine

    monkeypatch.setattr(ov_engine, "cpu_has_bf16", lambda core: False)
    with pytest.raises(StartupError, match="needs a CPU with bf16 support"):
        load_model(ModelSettings(dtype="bfloat16", backend="openvino", num_threads=1))


def test_bfloat16_on_openvino_gives_float32_top1_on_the_real_photos(photos):
    """Where the CPU has bf16 (this one: AVX-512 BF16), OpenVINO serves it and keeps every photo's top-1."""
    ov = pytest.importorskip("openvino")
    from service.core.engines.openvino_engine import cpu_has_bf16
    from service.core.imaging import Preprocessor

    if not cpu_has_bf16(ov.Core()):
        pytest.skip("this CPU has no bf16; the refusal is tested above")
    bf16 = load_model(ModelSettings(dtype="bfloat16", backend="openvino", num_threads=1))
    f32 = load_model(ModelSettings(dtype="float32", backend="onnxruntime", num_threads=1))
    assert bf16.engine.dtype == "bfloat16" and bf16.engine.backend == "openvino"
    pre = Preprocessor(f32.preprocess, max_pixels=10**8)
    batch = np.stack([pre(data) for data in photos.values()])
    assert bf16.engine.run(batch)[1].argmax(1).tolist() == f32.engine.run(batch)[1].argmax(1).tolist()


def test_int8_decodes_on_every_cpu_by_default():
    """int8 inference is cheap enough that decoding is the larger share: all CPUs decode unless told."""
    from service.core.settings import ServerSettings, available_cpus

    server = ServerSettings()
    assert server.decode_threads_for([ModelSettings(dtype="int8")]) == available_cpus()
    assert ServerSettings(decode_threads=1).decode_threads_for([ModelSettings(dtype="int8")]) == 1
    assert server.decode_threads_for([ModelSettings(dtype="float32")]) == max(1, available_cpus() // 2)
    # One int8 model among float32 ones: the shared pool decodes on every CPU.
    assert server.decode_threads_for([ModelSettings(dtype="float32"), ModelSettings(dtype="int8")]) == available_cpus()


def test_cache_folder_writable_by_others_is_not_read(tmp_path, calibration_dir, quantize_calls):
    """On a shared /tmp another user could plant a model with matching metadata: such a folder is ignored."""
    cache = tmp_path / "cache"
    assert load_model(_int8(cache, calibration_dir)).quantization.cache_hit is False
    assert cache.stat().st_mode & 0o077 == 0  # created private
    cache.chmod(0o777)
    assert load_model(_int8(cache, calibration_dir)).quantization.cache_hit is False
    assert len(quantize_calls) == 2
    cache.chmod(0o700)
    assert load_model(_int8(cache, calibration_dir)).quantization.cache_hit is True
