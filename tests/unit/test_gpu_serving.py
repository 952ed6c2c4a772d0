"""GPU serving pieces: batch-size buckets, per-device defaults (dtype auto, batches in flight, decode
threads), the torch engine serving through two inference slots with per-slot buffers (on CPU here), and,
where CUDA is present (benchmarks/gpu_check.sh runs this file on the lent GPU), pinned slot buffers,
CUDA-graph replay equal to eager, and bfloat16 keeping the top-1 of CPU float32."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import torch

from model import EfficientNet, default_weights_path
from service.core.engines import TorchEngine
from service.core.engines.torch_engine import batch_buckets, bucket_for
from service.core.imaging import Preprocessor
from service.core.loading import LoadedModel
from service.core.metrics import Metrics
from service.core.runtime import InferenceService
from service.core.settings import Settings, available_cpus

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (run by benchmarks/gpu_check.sh)")


def test_buckets_are_powers_of_two_up_to_the_largest_batch():
    assert batch_buckets(1) == [1]
    assert batch_buckets(8) == [1, 2, 4, 8]
    assert batch_buckets(6) == [1, 2, 4, 6]
    assert batch_buckets(256)[-3:] == [64, 128, 256]
    buckets = batch_buckets(12)
    assert [bucket_for(n, buckets) for n in (1, 2, 3, 5, 8, 9, 12)] == [1, 2, 4, 8, 8, 12, 12]
    assert bucket_for(13, buckets) is None


def test_defaults_follow_the_device():
    """dtype auto is float32 on CPU and bfloat16 on a GPU; one batch in flight on CPU, two on a GPU;
    decode threads half the CPUs on CPU, all but one on a GPU host. Explicit values always win. The
    resolved settings carry the decided values themselves."""
    cpu = Settings(device="cpu")
    assert cpu.dtype == "auto" and cpu.effective_dtype == "float32"
    assert cpu.effective_max_concurrent_batches == 1
    assert cpu.effective_decode_threads == max(1, available_cpus() // 2)
    gpu = Settings(device="cuda")  # settings do not check for the GPU; loading does
    assert gpu.on_gpu and gpu.effective_dtype == "bfloat16"
    assert gpu.effective_max_concurrent_batches == 2
    assert gpu.effective_decode_threads == max(1, available_cpus() - 1)
    resolved = gpu.resolved()
    assert (resolved.dtype, resolved.max_concurrent_batches, resolved.decode_threads) == (
        "bfloat16", 2, max(1, available_cpus() - 1))
    explicit = Settings(device="cuda", dtype="float32", max_concurrent_batches=3, decode_threads=5)
    assert (explicit.effective_dtype, explicit.effective_max_concurrent_batches,
            explicit.effective_decode_threads) == ("float32", 3, 5)
    assert Settings(device="auto").on_gpu == CUDA
    assert Settings(device="auto").resolved().device == ("cuda" if CUDA else "cpu")
    assert Settings(device="auto").resolved(cuda_available=True).device == "cuda"
    with pytest.raises(ValueError):
        Settings(max_concurrent_batches=0)


def test_batching_defaults_follow_the_device(monkeypatch):
    """On a GPU the batching settings not given take the GPU defaults (batch 128, 2 ms, queue 1024), also
    from the environment; explicit values win, and an explicit smaller queue caps the default batch. They
    are decided when the settings are resolved at load, not while validating (which imports no torch)."""
    cpu = Settings(device="cpu").resolved()
    assert (cpu.max_batch_size, cpu.max_batch_delay_ms, cpu.max_queue) == (8, 5.0, 64)
    gpu = Settings(device="cuda").resolved()
    assert (gpu.max_batch_size, gpu.max_batch_delay_ms, gpu.max_queue) == (128, 2.0, 1024)
    assert Settings(device="cuda:0", max_batch_size=16).resolved().max_batch_size == 16
    assert Settings(device="cuda", max_batch_size=256).resolved().max_queue == 1024  # valid only on a GPU
    with pytest.raises(ValueError, match="max_queue"):
        Settings(device="cpu", max_batch_size=256).resolved()
    small = Settings(device="cuda", max_queue=32).resolved()
    assert (small.max_batch_size, small.max_queue) == (32, 32)
    monkeypatch.setenv("EFFNET_DEVICE", "cuda")
    monkeypatch.setenv("EFFNET_MAX_BATCH_DELAY_MS", "7")
    from_env = Settings().resolved()
    assert (from_env.max_batch_size, from_env.max_batch_delay_ms) == (128, 7.0)


def test_validating_settings_imports_no_torch():
    """Settings are plain data: validating them (``auto`` device included) never imports torch."""
    import subprocess
    import sys

    code = ("import sys; from service.core.settings import Settings; Settings(device='auto'); "
            "Settings(device='cuda', max_batch_size=256); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.fixture(scope="module")
def lite0() -> EfficientNet:
    return EfficientNet.from_pretrained("efficientnet-lite0", default_weights_path("efficientnet-lite0")).eval()


@pytest.fixture(scope="module")
def pixels(lite0, photos) -> np.ndarray:
    pre = Preprocessor(lite0.variant.preprocess, max_pixels=10**8)
    return np.stack([pre(data) for data in photos.values()])


def _loaded(engine, lite0) -> LoadedModel:
    from model import imagenet_classes

    return LoadedModel(engine=engine, variant=lite0.variant, labels=list(imagenet_classes()), num_features=1280,
                       num_parameters=1, weights_source="package", weights_file=None, weights_sha256=None)


def test_torch_engine_serves_through_two_slots_with_its_own_buffers(lite0, photos, pixels):
    """The service around the torch engine with two batches in flight: the batcher stacks into the
    engine's slot buffers, concurrent requests each get their own photo's answer (equal to one batch run
    directly), warm-up goes through the engine's own warm_up, and the in-flight gauge ends at 0."""
    engine = TorchEngine(lite0, torch.device("cpu"), torch.float32, image_size=224)
    _, expected = engine.run(pixels)
    settings = Settings(device="cpu", backend="torch", max_concurrent_batches=2, max_batch_size=2, max_queue=16,
                        max_batch_delay_ms=20)
    metrics = Metrics(settings.max_batch_size, process_metrics=False)
    service = InferenceService(settings, _loaded(engine, lite0), metrics)
    assert service.batcher.max_concurrent_batches == 2 and len(service.batcher._buffers) == 2
    assert all(b.dtype == np.uint8 and b.shape == (2, 3, 224, 224) for b in service.batcher._buffers)
    names = list(photos) * 3

    async def main():
        await service.start()
        while service.state.value == "warming":
            await asyncio.sleep(0.05)
        assert service.ready, service.failure
        answers = await asyncio.gather(*(service.infer([(n, photos[n])], deadline=time.monotonic() + 60)
                                         for n in names))
        await service.close()
        return answers

    answers = asyncio.run(main())
    order = list(photos)
    for name, answer in zip(names, answers, strict=True):
        np.testing.assert_allclose(answer[0][1], expected[order.index(name)], atol=1e-4, rtol=0)
    assert engine.warmup_seconds is not None
    assert service.batcher.batches_run >= 5
    assert metrics.batches_in_flight._value.get() == 0


def test_float_batches_are_taken_as_normalised(lite0, pixels):
    """A float batch skips the engine's normalisation (offline callers that normalised on the CPU)."""
    from model import Normalize

    engine = TorchEngine(lite0, torch.device("cpu"), torch.float32, image_size=224)
    floats = Normalize(lite0.variant.preprocess)(torch.from_numpy(pixels))
    np.testing.assert_allclose(engine.run(floats)[1], engine.run(pixels)[1], atol=1e-5, rtol=0)


# -- on a GPU only --------------------------------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("graphs", [True, False])
def test_cuda_slots_graphs_equal_eager_and_cpu(lite0, pixels, graphs):
    """float32 on the GPU through pinned slot buffers, with and without CUDA graphs (padding a batch of
    3 to its bucket of 4): the CPU's logits within 1e-3 of their scale, same top-1, every slot."""
    cpu = TorchEngine(lite0, torch.device("cpu"), torch.float32, image_size=224)
    _, expected = cpu.run(pixels)
    engine = TorchEngine(lite0, torch.device("cuda"), torch.float32, image_size=224, cuda_graphs=graphs)
    buffers = engine.input_buffers(2, 8)
    assert all(engine._slots[i].host_in.is_pinned() for i in range(2))
    engine.warm_up(8)
    assert engine.graphs_captured == (8 if graphs else 0)  # buckets 1, 2, 4, 8 on two slots
    for slot, buffer in enumerate(buffers):
        buffer[: len(pixels)] = pixels
        _, got = engine.run(buffer[: len(pixels)], slot)
        assert np.array_equal(got.argmax(1), expected.argmax(1))
        assert float(np.abs(got - expected).max()) <= 1e-3 * max(1.0, float(np.abs(expected).max()))
    # A batch not in the slot buffer, and one over the slot capacity, still run (eagerly).
    _, got = engine.run(pixels[:1].copy(), 0)
    np.testing.assert_allclose(got, expected[:1], atol=1e-2, rtol=0)
    _, big = engine.run(np.concatenate([pixels] * 4), 1)
    assert big.shape == (12, 1000)


@needs_cuda
def test_cuda_bfloat16_keeps_the_cpu_float32_top1(lite0, pixels):
    cpu = TorchEngine(lite0, torch.device("cpu"), torch.float32, image_size=224)
    _, expected = cpu.run(pixels)
    engine = TorchEngine(lite0, torch.device("cuda"), torch.bfloat16, image_size=224)
    engine.input_buffers(2, 4)
    engine.warm_up(4)
    _, got = engine.run(pixels, 1)
    assert np.array_equal(got.argmax(1), expected.argmax(1))
