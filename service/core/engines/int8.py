"""An int8 (QDQ) ONNX model on CPU, with onnxruntime or OpenVINO: the engine behind ``EFFNET_DTYPE=int8``.

The model is a static quantisation of the uint8-input export (``model.quantize``), so the batch is the
same uint8 NCHW batch the float engines take. Where the model comes from (the cache, a calibration run at
start-up, or ``EFFNET_INT8_MODEL``) is ``service.core.quantized``'s business.
"""

from __future__ import annotations

import numpy as np
import torch

from model.export import ExportError, add_feature_map_output
from service.core.engines.base import Engine, FloatInputGraph, as_engine_batch
from service.core.engines.onnx_engine import session_runner
from service.core.engines.openvino_engine import MapTwin, SlotRequests
from service.core.errors import StartupError


def check_int8_io(model: bytes, image_size: int) -> None:
    """``StartupError`` unless ``model`` takes uint8 (N, 3, S, S) and outputs ``features`` and ``logits``
    (and ``feature_map``, else the engine adds it).

    Checked from the graph's declared inputs and outputs, before a session is built; the probe run at
    start-up then checks the output shapes against the variant.
    """
    import onnx

    try:
        graph = onnx.load_from_string(model).graph
    except Exception as exc:  # DecodeError and friends: not an ONNX model at all
        raise StartupError(f"the int8 model is not a readable ONNX model ({type(exc).__name__})") from None
    if len(graph.input) != 1:
        raise StartupError(f"the int8 model has {len(graph.input)} inputs; expected one uint8 image batch")
    tensor = graph.input[0].type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
    if tensor.elem_type != onnx.TensorProto.UINT8 or len(dims) != 4 or dims[1:] != [3, image_size, image_size]:
        kind = onnx.TensorProto.DataType.Name(tensor.elem_type).lower()
        shape = "x".join("N" if d is None else str(d) for d in dims)
        raise StartupError(
            f"the int8 model takes {kind} {shape}; this variant needs uint8 Nx3x{image_size}x{image_size} "
            "(quantise it with python -m model.quantize for the same variant)"
        )
    outputs = [o.name for o in graph.output]
    if outputs not in (["features", "logits"], ["features", "logits", "feature_map"]):
        raise StartupError(f"the int8 model outputs {outputs}; expected ['features', 'logits'] (and "
                           "optionally 'feature_map')")


class Int8Engine(Engine):
    """A QDQ int8 model on CPU: onnxruntime (its int8 kernels use VNNI where the CPU has it) or OpenVINO."""

    dtype = "int8"

    def __init__(self, model: bytes, backend: str, num_threads: int, *, image_size: int) -> None:
        check_int8_io(model, image_size)
        try:
            # The map class activation maps are made of: the dequantised int8 activation the features pool
            # (added here, so a model quantised before maps existed, or baked elsewhere, gives them too).
            model = add_feature_map_output(model)
        except ExportError as exc:
            raise StartupError(f"the int8 model: {exc}") from None
        self.backend = backend
        self.device = "cpu"
        self.image_size = image_size
        if backend == "onnxruntime":
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            options.intra_op_num_threads = num_threads
            options.inter_op_num_threads = 1
            options.log_severity_level = 3
            # As the float engine: no spinning threads taking quota from decoding.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            self._session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
            self._run = session_runner(self._session)  # thread-safe: one session for all slots
            self._float = FloatInputGraph(model, lambda graph: session_runner(
                ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])))
        elif backend == "openvino":
            import openvino as ov

            core = ov.Core()
            # The operators left in float stay float32 (not bf16, which OpenVINO would pick here).
            config = {"INFERENCE_NUM_THREADS": num_threads, "INFERENCE_PRECISION_HINT": "f32",
                      "PERFORMANCE_HINT": "LATENCY"}

            def compiled(graph: bytes) -> SlotRequests:
                return SlotRequests(core.compile_model(core.read_model(graph), "CPU", config))

            # Passes without a map run the model without the feature_map output (see MapTwin).
            self._requests = MapTwin(model, compiled)
            self._run = self._requests.infer
            self._float = FloatInputGraph(model, lambda graph: MapTwin(graph, compiled).infer)
        else:
            raise StartupError(f"EFFNET_DTYPE=int8 runs with onnxruntime or openvino, not {backend}")

    def run(self, batch: np.ndarray | torch.Tensor, slot: int = 0, *,
            feature_map: bool = False) -> tuple[np.ndarray, ...]:
        """uint8 pixels, or a float32 normalised tensor (entering at the model's first quantisation, the
        same int8 network on the tensor sent)."""
        x = as_engine_batch(batch)
        return self._run(x, slot, feature_map) if x.dtype == np.uint8 else self._float(x, slot, feature_map)
