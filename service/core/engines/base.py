"""What every inference engine offers the batcher: one uint8 batch in, pooled features and logits out."""

from __future__ import annotations

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
        [N, num_classes]), float32. The engine normalises with the variant's mean/std itself.

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
