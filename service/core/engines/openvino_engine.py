"""OpenVINO on the model's own ONNX export, float32 on CPU (the optional ``openvino`` extra)."""

from __future__ import annotations

import numpy as np
import torch

from model.export import FEATURE_MAP, export_onnx_bytes
from service.core.engines.base import Engine, FloatInputGraph, as_engine_batch
from service.core.errors import StartupError


def cpu_has_bf16(core) -> bool:
    """Whether OpenVINO reports native bf16 on this CPU (AVX-512 BF16 or AMX); else it would emulate it."""
    return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")


class SlotRequests:
    """One OpenVINO infer request per inference slot over a compiled model with outputs ``features``,
    ``logits`` and ``feature_map``. An infer request is not thread-safe, and batches in different slots may
    run at once. OpenVINO computes every output of a compiled model; the feature map is copied out of the
    request's own tensor only for a batch that asks for it."""

    def __init__(self, compiled) -> None:
        self._compiled = compiled
        self._requests: dict[int, object] = {0: compiled.create_infer_request()}
        self._outputs = [compiled.output("features"), compiled.output("logits"), compiled.output(FEATURE_MAP)]

    def infer(self, x: np.ndarray, slot: int, feature_map: bool = False) -> tuple[np.ndarray, ...]:
        request = self._requests.get(slot)
        if request is None:  # each slot is used by one thread at a time, so no two threads race here
            request = self._requests[slot] = self._compiled.create_infer_request()
        result = request.infer({0: x})  # type: ignore[attr-defined]
        wanted = self._outputs if feature_map else self._outputs[:2]
        return tuple(np.array(result[output]) for output in wanted)


class OpenVinoEngine(Engine):
    """OpenVINO on the same in-memory ONNX export, CPU only, forced to f32 precision.

    On CPUs with bf16 support OpenVINO would otherwise pick bf16 by itself, which is not the same model:
    ``INFERENCE_PRECISION_HINT=f32`` keeps it float32 (checked against PyTorch at start-up).
    ``bfloat16=True`` (EFFNET_DTYPE=bfloat16) asks for bf16 on purpose, and is refused on a CPU without it.
    """

    backend = "openvino"

    def __init__(self, net: torch.nn.Module, device: torch.device, num_threads: int,
                 *, image_size: int | None = None, bfloat16: bool = False) -> None:
        import openvino as ov

        if device.type != "cpu":
            raise StartupError("EFFNET_BACKEND=openvino runs on cpu only; use torch on a GPU")
        core = ov.Core()
        if bfloat16 and not cpu_has_bf16(core):
            raise StartupError(
                "EFFNET_DTYPE=bfloat16 with EFFNET_BACKEND=openvino needs a CPU with bf16 support "
                "(AVX-512 BF16 or AMX), which this one lacks; use float32 or int8"
            )
        onnx_bytes = export_onnx_bytes(net.eval(), image_size=image_size, with_features=True, uint8_input=True,
                                       with_feature_map=True)
        config = {
            "INFERENCE_NUM_THREADS": num_threads,
            "INFERENCE_PRECISION_HINT": "bf16" if bfloat16 else "f32",
            "PERFORMANCE_HINT": "LATENCY",
        }
        self._requests = SlotRequests(core.compile_model(core.read_model(onnx_bytes), "CPU", config))
        # Float tensors (already normalised): the same export without its normalisation, compiled when
        # the first one comes.
        self._float = FloatInputGraph(onnx_bytes, lambda graph: SlotRequests(
            core.compile_model(core.read_model(graph), "CPU", config)).infer)
        self.device = str(device)
        self.dtype = "bfloat16" if bfloat16 else "float32"
        self.image_size = int(image_size or net.image_size or net.variant.resolution)

    def run(self, batch: np.ndarray | torch.Tensor, slot: int = 0, *,
            feature_map: bool = False) -> tuple[np.ndarray, ...]:
        """uint8 pixels (normalised in the graph), or a float32 normalised tensor (the float twin)."""
        x = as_engine_batch(batch)
        if x.dtype != np.uint8:
            return self._float(x, slot, feature_map)
        return self._requests.infer(x, slot, feature_map)
