"""Inference engines: a batch of images in, pooled features and logits out, from one forward pass.

``torch`` (eager PyTorch; every device and dtype), ``onnxruntime`` (the model's own ONNX export; the
default on CPU) and ``openvino`` (the same export, float32 on CPU). ``build_engine`` picks one by name.
"""

from __future__ import annotations

import torch

from service.core.engines.base import Engine
from service.core.engines.onnx_engine import OnnxRuntimeEngine
from service.core.engines.openvino_engine import OpenVinoEngine
from service.core.engines.torch_engine import TorchEngine


def build_engine(
    backend: str, net: torch.nn.Module, device: torch.device, dtype: torch.dtype, *, num_threads: int,
    image_size: int, cuda_graphs: bool = True,
) -> Engine:
    """The engine ``backend`` names, around ``net`` (an ``EfficientNet`` in eval mode). ``cuda_graphs``:
    the torch engine on a GPU captures and replays CUDA graphs (see ``TorchEngine``)."""
    if backend == "onnxruntime":
        return OnnxRuntimeEngine(net, device, num_threads, image_size=image_size)
    if backend == "openvino":
        return OpenVinoEngine(net, device, num_threads, image_size=image_size, bfloat16=dtype == torch.bfloat16)
    if backend == "torch":
        return TorchEngine(net, device, dtype, image_size=image_size, cuda_graphs=cuda_graphs)
    raise ValueError(f"unknown backend {backend!r}")


__all__ = ["Engine", "OnnxRuntimeEngine", "OpenVinoEngine", "TorchEngine", "build_engine"]
