"""OpenVINO on the model's own ONNX export, float32 on CPU (the optional ``openvino`` extra)."""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np
import torch

from model.export import FEATURE_MAP, export_onnx_bytes, without_feature_map_output
from service.core.engines.base import Engine, FloatInputGraph, as_engine_batch
from service.core.errors import StartupError


def cpu_has_bf16(core) -> bool:
    """Whether OpenVINO reports native bf16 on this CPU (AVX-512 BF16 or AMX); else it would emulate it."""
    return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")


class SlotRequests:
    """One OpenVINO infer request per inference slot over a compiled model with outputs ``features`` and
    ``logits`` (and ``feature_map``, if it has it). An infer request is not thread-safe, and batches in
    different slots may run at once."""

    def __init__(self, compiled) -> None:
        self._compiled = compiled
        self._requests: dict[int, object] = {0: compiled.create_infer_request()}
        names = {name for output in compiled.outputs for name in output.get_names()}
        self._outputs = [compiled.output(name) for name in ("features", "logits", FEATURE_MAP) if name in names]

    def infer(self, x: np.ndarray, slot: int, feature_map: bool = False) -> tuple[np.ndarray, ...]:
        request = self._requests.get(slot)
        if request is None:  # each slot is used by one thread at a time, so no two threads race here
            request = self._requests[slot] = self._compiled.create_infer_request()
        result = request.infer({0: x})  # type: ignore[attr-defined]
        wanted = self._outputs if feature_map else self._outputs[:2]
        return tuple(np.array(result[output]) for output in wanted)


class MapTwin:
    """OpenVINO computes every output of a compiled model, and an output on the head's feature map cost its
    passes 1.5-2% here even when nobody read it (docs/benchmarks.md). So the passes that ask for no map run a
    model without that output, and the model with it is compiled when the first batch asks for a map: its
    memory and compile time (about a second for Lite0 on 2 cores) are paid only by a server asked for maps.
    ``infer(x, slot, feature_map)``, thread-safe."""

    def __init__(self, onnx_with_map: bytes, compile_model: Callable[[bytes], SlotRequests]) -> None:
        self._with_map_model = onnx_with_map
        self._compile = compile_model
        self._plain = compile_model(without_feature_map_output(onnx_with_map))
        self._with_map: SlotRequests | None = None
        self._lock = threading.Lock()

    def infer(self, x: np.ndarray, slot: int, feature_map: bool = False) -> tuple[np.ndarray, ...]:
        if not feature_map:
            return self._plain.infer(x, slot)
        requests = self._with_map
        if requests is None:
            with self._lock:
                if self._with_map is None:
                    self._with_map = self._compile(self._with_map_model)
                requests = self._with_map
        return requests.infer(x, slot, True)


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
        def compiled(graph: bytes) -> SlotRequests:
            return SlotRequests(core.compile_model(core.read_model(graph), "CPU", config))

        self._requests = MapTwin(onnx_bytes, compiled)
        # Float tensors (already normalised): the same export without its normalisation, compiled when
        # the first one comes.
        self._float = FloatInputGraph(onnx_bytes, lambda graph: MapTwin(graph, compiled).infer)
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
