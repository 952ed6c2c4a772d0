"""Eager PyTorch on any device and dtype, in the form that runs fastest in eager mode."""

from __future__ import annotations

import numpy as np
import torch

from model import Normalize, fold_batchnorm
from model.export import export_form


class TorchEngine:
    """PyTorch inference in the form that runs fastest in eager mode.

    Static "SAME" padding for the served input size (no per-call shape arithmetic), plain Swish,
    BatchNorm folded into the convolutions, channels-last memory format, ``inference_mode``. On CUDA:
    cuDNN autotuning, pinned host memory and non-blocking copies.

    ``run`` is called from one dedicated thread only (the batcher's); it is not re-entrant.
    """

    backend = "torch"

    def __init__(
        self, net: torch.nn.Module, device: torch.device, dtype: torch.dtype, *, image_size: int | None = None
    ) -> None:
        self._torch_device = device
        self._torch_dtype = dtype
        self._cuda = device.type == "cuda"
        if self._cuda:
            torch.backends.cudnn.benchmark = True
        self.normalize = Normalize(net.variant.preprocess).to(device)
        net = fold_batchnorm(export_form(net, image_size))
        self.net = net.to(device=device, dtype=dtype, memory_format=torch.channels_last).eval()
        self.device = str(device)
        self.dtype = str(dtype).removeprefix("torch.")

    def run(self, batch: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """uint8 NCHW batch (normalised here, on the device); a float batch is taken as already normalised."""
        with torch.inference_mode():
            x = batch if isinstance(batch, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(batch))
            if self._cuda:
                # Pinned memory lets the copy to the GPU run asynchronously.
                x = x.pin_memory().to(self._torch_device, non_blocking=True)
            if x.dtype == torch.uint8:
                x = self.normalize(x)
            x = x.to(dtype=self._torch_dtype).contiguous(memory_format=torch.channels_last)
            pooled, logits = self.net.forward_features_and_logits(x)
            return pooled.float().cpu().numpy(), logits.float().cpu().numpy()
