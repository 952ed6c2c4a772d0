"""What every inference engine offers the batcher: one uint8 batch in, pooled features and logits out."""

from __future__ import annotations

import threading
from typing import Protocol, runtime_checkable

import numpy as np
import torch


@runtime_checkable
class Engine(Protocol):
    """What the batcher needs from an inference backend."""

    backend: str
    device: str
    dtype: str

    def run(self, batch: np.ndarray | torch.Tensor, slot: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """uint8 NCHW batch (resized, cropped, 0..255) -> (pooled features [N, num_features], logits
        [N, num_classes]), float32. The engine normalises with the variant's mean/std itself. A float32
        batch is an already normalised tensor (a client's own preprocessing) and enters the network after
        that normalisation, as sent.

        ``slot``: the inference slot (0 .. max_concurrent_batches - 1) the batch runs in. The batcher never
        runs two batches in one slot at once, so per-slot state (an OpenVINO infer request, pinned buffers
        and a CUDA stream) needs no lock; batches in different slots may run concurrently."""
        ...


def as_uint8_batch(batch: np.ndarray | torch.Tensor) -> np.ndarray:
    """A contiguous uint8 NCHW numpy batch; ``TypeError`` for any other dtype (never a silent cast of
    already-normalised floats to uint8)."""
    x = batch.numpy() if isinstance(batch, torch.Tensor) else np.asarray(batch)
    if x.dtype != np.uint8 or x.ndim != 4:
        raise TypeError(f"expected a uint8 NCHW batch, got {x.dtype} with shape {x.shape}")
    return np.ascontiguousarray(x)


def as_engine_batch(batch: np.ndarray | torch.Tensor) -> np.ndarray:
    """A contiguous NCHW numpy batch: uint8 pixels, or a float32 normalised tensor; ``TypeError`` for any
    other dtype (never a silent cast)."""
    x = batch.numpy() if isinstance(batch, torch.Tensor) else np.asarray(batch)
    if x.dtype not in (np.uint8, np.float32) or x.ndim != 4:
        raise TypeError(f"expected a uint8 or float32 NCHW batch, got {x.dtype} with shape {x.shape}")
    return np.ascontiguousarray(x)


class FloatTwin:
    """The float32-input twin of a uint8-input ONNX engine, built on first use (``build(onnx_float)``)
    from the same export (``model.export.float_input_graph``): the memory and start-up time of a second
    compiled model are paid only by a server that is sent float tensors. Thread-safe."""

    def __init__(self, uint8_model: bytes, build) -> None:
        self._uint8_model = uint8_model
        self._build = build
        self._runner = None
        self._lock = threading.Lock()

    def __call__(self, x: np.ndarray, slot: int) -> tuple[np.ndarray, np.ndarray]:
        runner = self._runner
        if runner is None:
            with self._lock:
                if self._runner is None:
                    from model.export import float_input_graph

                    self._runner = self._build(float_input_graph(self._uint8_model))
                runner = self._runner
        return runner(x, slot)
