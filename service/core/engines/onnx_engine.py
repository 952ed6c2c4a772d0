"""onnxruntime on the model's own ONNX export: the default engine on CPU."""

from __future__ import annotations

import numpy as np
import torch

from model.export import FEATURE_MAP, export_onnx_bytes
from service.core.engines.base import Engine, FloatInputGraph, as_engine_batch
from service.core.errors import StartupError


class OnnxRuntimeEngine(Engine):
    """onnxruntime on the model's own ONNX export (uint8 input normalised in the graph, static padding,
    features and logits as outputs).

    The export is made in memory at start-up (a read-only root file system is fine) and checked against
    PyTorch before it serves. One intra-op pool of ``num_threads``; no inter-op parallelism, since the
    graph is a chain.
    """

    backend = "onnxruntime"

    def __init__(self, net: torch.nn.Module, device: torch.device, num_threads: int,
                 *, image_size: int | None = None, spinning: bool = False) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.intra_op_num_threads = num_threads
        options.inter_op_num_threads = 1
        # Off by default: spinning threads burn CPU between operators and batches, which under a
        # container CPU limit is quota taken from decoding (and throttling). It buys batch-1 latency in
        # isolation; benchmarks/bench_engines.py measures both.
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        if device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise StartupError("EFFNET_BACKEND=onnxruntime on cuda needs onnxruntime-gpu (CUDAExecutionProvider)")
            providers: list = [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        onnx_bytes = export_onnx_bytes(net.eval(), image_size=image_size, with_features=True, uint8_input=True,
                                       with_feature_map=True, check=True)
        self.session = ort.InferenceSession(onnx_bytes, options, providers=providers)
        # Float tensors (already normalised) run in a second session of the same export without its
        # normalisation, made when the first one comes.
        self._float = FloatInputGraph(onnx_bytes, lambda graph: self._runner(
            ort.InferenceSession(graph, options, providers=providers)))
        self.device = str(device)
        self.dtype = "float32"
        self.image_size = int(image_size or net.image_size or net.variant.resolution)

    @staticmethod
    def _runner(session):
        return session_runner(session)

    def run(self, batch: np.ndarray | torch.Tensor, slot: int = 0, *,
            feature_map: bool = False) -> tuple[np.ndarray, ...]:
        """uint8 pixels (normalised in the graph), or a float32 normalised tensor (the float twin)."""
        # One session serves every slot: InferenceSession.run may be called from several threads at once.
        x = as_engine_batch(batch)
        if x.dtype != np.uint8:
            return self._float(x, slot, feature_map)
        return tuple(self.session.run(WITH_MAP if feature_map else PLAIN, {"input": x}))


# The outputs asked of a session: the feature map only for a batch that wants class activation maps. The
# graph computes it in every pass (the features pool it); asked for, onnxruntime hands it over as well.
PLAIN = ["features", "logits"]
WITH_MAP = ["features", "logits", FEATURE_MAP]


def session_runner(session):
    """``(x, slot, feature_map) -> outputs`` over an onnxruntime session with those outputs."""
    def run(x: np.ndarray, slot: int, feature_map: bool = False) -> tuple[np.ndarray, ...]:
        return tuple(session.run(WITH_MAP if feature_map else PLAIN, {"input": x}))

    return run
