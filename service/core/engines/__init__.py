"""Inference engines: a batch of images in, pooled features and logits out, from one forward pass.

``torch`` (eager PyTorch; every device and dtype), ``onnxruntime`` (the model's own ONNX export; the
default on CPU) and ``openvino`` (the same export, float32 on CPU); ``null`` answers zeros without
computing (only when named: for measuring the front-ends). ``build_engine`` picks one by name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from service.core.engines.base import Engine

if TYPE_CHECKING:
    import torch

    from service.core.engines.onnx_engine import OnnxRuntimeEngine
    from service.core.engines.openvino_engine import OpenVinoEngine
    from service.core.engines.torch_engine import TorchEngine

# Each engine imports its runtime (torch, onnxruntime, openvino) when first named: the contract in
# ``base`` imports none, so a process that never runs one (a front-end worker) loads none.
def __getattr__(name: str) -> object:
    if name == "OnnxRuntimeEngine":
        from service.core.engines.onnx_engine import OnnxRuntimeEngine

        return OnnxRuntimeEngine
    if name == "OpenVinoEngine":
        from service.core.engines.openvino_engine import OpenVinoEngine

        return OpenVinoEngine
    if name == "TorchEngine":
        from service.core.engines.torch_engine import TorchEngine

        return TorchEngine
    raise AttributeError(f"module 'service.core.engines' has no attribute {name!r}")


def build_engine(
    backend: str, net: torch.nn.Module, device: torch.device, dtype: torch.dtype, *, num_threads: int,
    image_size: int, cuda_graphs: bool = True,
) -> Engine:
    """The engine ``backend`` names, around ``net`` (an ``EfficientNet`` in eval mode). ``cuda_graphs``:
    the torch engine on a GPU captures and replays CUDA graphs (see ``TorchEngine``)."""
    import torch

    from service.core.engines.onnx_engine import OnnxRuntimeEngine
    from service.core.engines.openvino_engine import OpenVinoEngine
    from service.core.engines.torch_engine import TorchEngine

    if backend == "onnxruntime":
        return OnnxRuntimeEngine(net, device, num_threads, image_size=image_size)
    if backend == "openvino":
        return OpenVinoEngine(net, device, num_threads, image_size=image_size, bfloat16=dtype == torch.bfloat16)
    if backend == "torch":
        return TorchEngine(net, device, dtype, image_size=image_size, cuda_graphs=cuda_graphs)
    if backend == "null":
        from service.core.engines.null_engine import NullEngine

        classes = int(net._fc.out_features) if net.include_top else 0
        return NullEngine(int(net.num_features), classes, str(device), image_size)
    raise ValueError(f"unknown backend {backend!r}")


__all__ = ["Engine", "OnnxRuntimeEngine", "OpenVinoEngine", "TorchEngine", "build_engine"]
