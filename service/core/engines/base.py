"""What every inference engine offers the batcher: one batch in, pooled features and logits out."""

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

    def run(self, batch: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """float32 NCHW batch -> (pooled features [N, num_features], logits [N, num_classes]), float32."""
        ...
