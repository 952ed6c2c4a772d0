"""What every inference engine offers the service: one uint8 batch in, pooled features and logits out.

The whole contract lives here, in one base class with defaults, so the core never has to probe an engine
for optional methods: ``run`` (each engine's own), ``input_buffers`` (default: none, the batcher stacks
into fresh arrays), ``warm_up_thread`` (default: nothing) and ``warm_up`` (default: a few passes at batch
1 and the largest batch). ``warm_up_on_threads`` is how the service (and the GPU check) drives the two
warm-up steps. The batch-size buckets and the number of warm-up rounds are defined here, once.
"""

from __future__ import annotations

import sys
import threading
from abc import ABC, abstractmethod
from concurrent.futures import Executor
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # the contract itself needs no torch (a front-end worker imports it without)
    import torch

# Passes per batch size before serving: the first pays for allocation and kernel selection, the next ones
# let caches and allocators settle.
WARMUP_ROUNDS = 3


def batch_buckets(max_batch_size: int) -> list[int]:
    """1, 2, 4, ... below ``max_batch_size``, then ``max_batch_size`` itself: the batch sizes a GPU engine
    runs (a batch is padded up to its bucket) and the batch-size histogram's buckets."""
    buckets, size = [], 1
    while size < max_batch_size:
        buckets.append(size)
        size *= 2
    return [*buckets, max_batch_size]


def bucket_for(n: int, buckets: list[int]) -> int | None:
    """The smallest bucket holding ``n`` images (None when none does)."""
    for bucket in buckets:
        if bucket >= n:
            return bucket
    return None


class Engine(ABC):
    """An inference backend as the service drives it.

    Life of an engine in the service: built at start-up (and probed once with a batch of 1 from the
    loading thread); ``input_buffers(slots, max_batch_size)`` once; then, when warm-up is on,
    ``warm_up_thread`` once on every inference thread (one thread at a time) and ``warm_up`` once; then
    ``run`` from the inference threads, at most one batch per slot at a time.
    """

    backend: str  # "torch", "onnxruntime", "openvino", ...
    device: str  # "cpu", "cuda:0", ...
    dtype: str  # "float32", "bfloat16", "int8", ...
    image_size: int  # the served input resolution S (batches are N x 3 x S x S)

    @abstractmethod
    def run(self, batch: np.ndarray | torch.Tensor, slot: int = 0, *,
            feature_map: bool = False) -> tuple[np.ndarray, ...]:
        """uint8 NCHW batch (resized, cropped, 0..255) -> (pooled features [N, num_features], logits
        [N, num_classes]), float32. The engine normalises with the variant's mean/std itself. A float32
        batch is an already normalised tensor (a client's own preprocessing) and enters the network after
        that normalisation, as sent.

        ``feature_map``: also return, third, the head's activated feature map that the features pool
        ([N, num_features, h, w], float32 on the host), from the same pass: what class activation maps
        are made of (``service.core.cam``). Only a batch asked for it fetches it (onnxruntime and OpenVINO
        are asked for that output only then; torch copies it off the device only then).

        ``slot``: the inference slot (0 .. max_concurrent_batches - 1) the batch runs in. The batcher never
        runs two batches in one slot at once, so per-slot state (an OpenVINO infer request, pinned buffers
        and a CUDA stream) needs no lock; batches in different slots may run concurrently."""

    def padded_batch_size(self, n: int) -> int | None:
        """The batch size ``n`` images actually run at when the engine pads batches to buckets (CUDA
        graphs), for the batch's trace span; None when it runs them as they are (the default)."""
        return None

    def input_buffers(self, slots: int, max_batch_size: int) -> list[np.ndarray] | None:
        """One uint8 ``(max_batch_size, 3, S, S)`` array per slot for the batcher to stack batches into
        (pinned host memory on a GPU), or None: the batcher stacks into fresh arrays. Called once, before
        warm-up and serving; an engine that keeps per-slot state sets it up here."""
        return None

    def warm_up_thread(self, max_batch_size: int) -> None:
        """Run on every inference thread before it serves, one thread at a time: for what a backend keeps
        per thread (cuDNN's choice of kernels for each batch size, on a GPU). Nothing by default."""
        return None

    def warm_up(self, max_batch_size: int) -> None:
        """Once before serving, on an inference thread, after ``warm_up_thread``: the first passes at a
        batch size pay for allocation and kernel selection; do that before the first user does. By
        default ``WARMUP_ROUNDS`` passes at batch 1 and at ``max_batch_size``."""
        for batch_size in sorted({1, max_batch_size}):
            batch = self.zeros(batch_size)
            for _ in range(WARMUP_ROUNDS):
                self.run(batch)

    def zeros(self, batch_size: int) -> np.ndarray:
        """A black uint8 batch of the engine's input size (for warm-up)."""
        size = self.image_size
        return np.zeros((batch_size, 3, size, size), dtype=np.uint8)


def warm_up_on_threads(engine: Engine, executor: Executor, threads: int, max_batch_size: int,
                       *, timeout: float = 600.0) -> None:
    """The service's warm-up: ``engine.warm_up_thread`` on each of the ``threads`` threads of
    ``executor`` (which must have exactly that many), one after the other, then ``engine.warm_up`` on
    one of them. Blocks until done; an engine's exception is raised here.

    Every task waits at a barrier until all ``threads`` tasks have started, so each holds a thread of its
    own (a thread pool gives no other way to reach each of its threads); a lock then runs them one at a
    time, so no thread's kernel search is timed while another's runs.
    """
    barrier = threading.Barrier(threads)
    one_at_a_time = threading.Lock()

    def per_thread() -> None:
        barrier.wait(timeout)
        with one_at_a_time:
            engine.warm_up_thread(max_batch_size)

    futures = [executor.submit(per_thread) for _ in range(threads)]
    for future in futures:
        future.result()
    executor.submit(engine.warm_up, max_batch_size).result()


def as_engine_batch(batch: np.ndarray | torch.Tensor) -> np.ndarray:
    """A contiguous NCHW numpy batch: uint8 pixels, or a float32 normalised tensor; ``TypeError`` for any
    other dtype (never a silent cast)."""
    torch = sys.modules.get("torch")  # a tensor can only come from a process that imported torch
    x = batch.numpy() if torch is not None and isinstance(batch, torch.Tensor) else np.asarray(batch)
    if x.dtype not in (np.uint8, np.float32) or x.ndim != 4:
        raise TypeError(f"expected a uint8 or float32 NCHW batch, got {x.dtype} with shape {x.shape}")
    return np.ascontiguousarray(x)


class FloatInputGraph:
    """The float32-input twin of a uint8-input ONNX engine, built on first use (``build(onnx_float)``)
    from the same export (``model.export.float_input_graph``): the memory and start-up time of a second
    compiled model are paid only by a server that is sent float tensors. Thread-safe."""

    def __init__(self, uint8_model: bytes, build) -> None:
        self._uint8_model = uint8_model
        self._build = build
        self._runner = None
        self._lock = threading.Lock()

    def __call__(self, x: np.ndarray, slot: int, feature_map: bool = False) -> tuple[np.ndarray, ...]:
        runner = self._runner
        if runner is None:
            with self._lock:
                if self._runner is None:
                    from model.export import float_input_graph

                    self._runner = self._build(float_input_graph(self._uint8_model))
                runner = self._runner
        return runner(x, slot, feature_map)
