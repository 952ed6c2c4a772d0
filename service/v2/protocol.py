"""The Open Inference Protocol over a served model, independent of REST or gRPC: metadata, statistics, and
one inference request in (already decoded from its transport) and its output tensors out. Functions of a
``ServedModel`` (the core's), not a model type of their own.

Each served model is a protocol model of the same name (one model: the variant's, e.g.
``efficientnet-lite0``), version ``1``. It takes exactly one of two inputs:

- ``image``: BYTES, shape ``[N]`` (``[N, 1]`` too): each element one encoded image file. These go through
  the service's decoding pool, exactly like an upload to ``/predict``.
- ``input``: UINT8 or FP32, shape ``[N, 3, S, S]``: images already preprocessed (UINT8: resized and
  cropped 0..255 pixels, which the engine normalises with the variant's mean/std; FP32: a tensor already
  normalised, e.g. by the client's own float resize, run through the network as sent; any finite
  values). No decoding; same queue, batcher and deadline.

Outputs: ``logits`` and ``probabilities`` (FP32 ``[N, num_classes]``) and ``features`` (FP32
``[N, num_features]``, the pooled embedding); all three when the request names none. An output asked for
with the parameter ``classification: k`` (Triton's classification extension; ``class_count`` in
tritonclient) comes back as BYTES ``[N, k]`` of ``"score:index:label"``, best first. ``cam`` (FP32
``[N, h, w]``, only when named, only for a model with a classifier) is each image's class activation map
on the feature grid (``service.core.cam``): of its top-1 class, or of the class the request parameter
``cam_class`` names (an index or a label).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.core.cam import CamWish, parse_classes
from service.core.errors import BadRequest, InvalidParameter, ModelNotFound
from service.core.outputs import check_top_k, require_classifier, softmax
from service.core.registry import ServedModels
from service.core.runtime import InferenceRequest, Outputs, ServedModel

MODEL_VERSION = "1"
SERVER_NAME = "effnet-serve"
# Triton's names for the extensions this server speaks, as its clients expect them in server metadata.
EXTENSIONS = ("binary_tensor_data", "classification", "statistics", "model_repository",
              "model_repository(unload_dependents)")
IMAGE_INPUT = "image"
TENSOR_INPUT = "input"
OUTPUTS = ("logits", "probabilities", "features")
CAM_OUTPUT = "cam"
CAM_CLASS = "cam_class"  # the request parameter naming the class the cam output explains
# Inputs or outputs read from one request: the model has one input and three outputs, so more is a mistake
# (refused before any is decoded).
MAX_TENSORS = 16


class ModelControl:
    """The model repository extension (index, load, unload) as both transports run it: each parses its
    request, then calls ``index`` or ``apply`` here."""

    ACTIONS = ("load", "unload")

    @staticmethod
    async def index(models: ServedModels, ready: Any) -> list[dict[str, str]]:
        """The repository index; ``ready`` (the request's flag, a boolean, default false): ready models only."""
        if ready is not None and not isinstance(ready, bool):
            raise BadRequest("'ready' must be true or false")
        return [entry for entry in await models.index() if not ready or entry["state"] == "READY"]

    @staticmethod
    async def apply(models: ServedModels, action: str, name: str, parameters: dict[str, Any]) -> None:
        """Load (or reload) or unload ``name``, after checking the call's parameters."""
        ModelControl.check_parameters(action, parameters)
        if action == "load":
            await models.load(name)
        else:
            await models.unload(name)

    @staticmethod
    def check_parameters(action: str, parameters: dict[str, Any]) -> None:
        """Load takes no parameters (each model's ``model.toml`` in the repository says how to load it:
        Triton's ``config`` and ``file:`` overrides are refused, not ignored); unload takes
        ``unload_dependents`` (no model here has dependents, so either value means the same)."""
        for key, value in parameters.items():
            if action == "unload" and key == "unload_dependents":
                if not isinstance(value, bool):
                    raise BadRequest("parameter 'unload_dependents' must be true or false")
                continue
            if action == "load" and (key == "config" or key.startswith("file:")):
                raise BadRequest(f"parameter '{key}' is not supported: a model is loaded from its model.toml "
                                 "in the repository; change that file and load the model again")
            raise BadRequest(f"unknown parameter '{key}' for {action}")


@dataclass
class InputTensor:
    name: str
    datatype: str
    shape: list[int]
    # numpy array for numeric datatypes; list of bytes (or JSON strings) for BYTES
    data: np.ndarray | list[Any]
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class RequestedOutput:
    name: str
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def classification(self) -> int:
        value = self.parameters.get("classification", 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise BadRequest(f"output '{self.name}': 'classification' must be a non-negative integer")
        return value


@dataclass
class OutputTensor:
    name: str
    datatype: str
    shape: list[int]
    data: np.ndarray | list[bytes]
    requested: RequestedOutput | None = None


def request_timeout_s(parameters: dict[str, Any], remaining_s: float | None = None) -> float | None:
    """The request's own deadline in seconds: its ``timeout`` parameter (microseconds, as Triton's clients
    send it) and the transport's deadline (``remaining_s``, e.g. a gRPC deadline), whichever is shorter;
    None when it has neither (the server's own deadline applies)."""
    value = parameters.get("timeout")
    timeouts = [] if remaining_s is None else [max(0.0, remaining_s)]
    if value is not None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise BadRequest("parameter 'timeout' must be a positive number of microseconds")
        timeouts.append(value / 1e6)
    return min(timeouts, default=None)


def lookup(models: ServedModels, name: str, version: str | None = None) -> ServedModel:
    """The served model called ``name`` (``ModelNotFound``, 404, for any other name or version: the
    protocol always names its model, so an empty name is not the default model)."""
    if not name:
        raise ModelNotFound(f"no model named; this server serves: {', '.join(models.names) or 'none'}")
    model = models.get(name)
    if version not in (None, "", MODEL_VERSION):
        raise ModelNotFound(f"unknown version '{version}' of model '{name}'; it has version {MODEL_VERSION}")
    return model


def input_size(model: ServedModel) -> int:
    return model.preprocessor.input_size


def output_names(model: ServedModel) -> tuple[str, ...]:
    """The outputs answered when a request names none: a checkpoint without a classifier has features only.
    ``cam`` is answered only when named."""
    return OUTPUTS if model.model.has_classifier else ("features",)


def _shape(model: ServedModel, name: str) -> list[int]:
    if name == CAM_OUTPUT:
        return [-1, *model.model.feature_grid]
    return [-1, model.model.num_features if name == "features" else model.model.num_classes]


def metadata(model: ServedModel) -> dict[str, Any]:
    s = input_size(model)
    return {
        "name": model.name,
        "versions": [MODEL_VERSION],
        "platform": f"effnet-serve_{model.model.engine.backend}",
        "inputs": [
            {"name": IMAGE_INPUT, "datatype": "BYTES", "shape": [-1]},
            {"name": TENSOR_INPUT, "datatype": "FP32", "shape": [-1, 3, s, s]},
        ],
        "outputs": [
            {"name": name, "datatype": "FP32", "shape": _shape(model, name)}
            for name in (*output_names(model), *((CAM_OUTPUT,) if model.model.has_classifier else ()))
        ],
    }


def properties(model: ServedModel) -> dict[str, str]:
    """Facts a client may want beyond the tensors (gRPC ``properties``)."""
    return {
        "input_dtypes": "image: BYTES; input: FP32 or UINT8",
        "num_classes": str(model.model.num_classes),
        "num_features": str(model.model.num_features),
    }


async def statistics(model: ServedModel) -> dict[str, Any]:
    """The statistics extension's entry for a model (Triton's JSON shape; the gRPC message has the same
    fields): counts, and durations as {count, ns}."""
    snap = await model.statistics_snapshot()

    def duration(d: Any) -> dict[str, int]:
        return {"count": d.count, "ns": d.ns}

    return {
        "name": model.name,
        "version": MODEL_VERSION,
        "last_inference": snap.last_inference_ms,
        "inference_count": snap.inference_count,
        "execution_count": snap.execution_count,
        "inference_stats": {
            "success": duration(snap.success),
            "fail": duration(snap.fail),
            "queue": duration(snap.queue),
            "compute_input": duration(snap.compute_input),
            "compute_infer": duration(snap.compute_infer),
            "compute_output": duration(snap.compute_output),
            "cache_hit": {"count": 0, "ns": 0},
            "cache_miss": {"count": 0, "ns": 0},
        },
        "batch_stats": [
            {
                "batch_size": b.batch_size,
                "compute_input": duration(b.compute_input),
                "compute_infer": duration(b.compute_infer),
                "compute_output": duration(b.compute_output),
            }
            for b in snap.batches
        ],
    }


async def every_statistics(models: ServedModels, name: str | None = None,
                           version: str | None = None) -> list[dict[str, Any]]:
    """The statistics of the model called ``name``, or of every served model (no name)."""
    chosen = [lookup(models, name, version)] if name else [models.get(n) for n in models.names]
    return [await statistics(model) for model in chosen]


# -- inference -------------------------------------------------------------------------------------------------
def check_outputs(model: ServedModel, outputs: Sequence[RequestedOutput] | None) -> list[RequestedOutput]:
    if not outputs:
        return [RequestedOutput(name) for name in output_names(model)]
    if any(o.name in ("logits", "probabilities", CAM_OUTPUT) for o in outputs):
        require_classifier(model.model)
    seen: set[str] = set()
    for output in outputs:
        if output.name not in (*OUTPUTS, CAM_OUTPUT):
            raise BadRequest(f"unknown output '{output.name}'; the model has {', '.join((*OUTPUTS, CAM_OUTPUT))}")
        if output.name == CAM_OUTPUT and output.classification:
            raise BadRequest(f"output '{CAM_OUTPUT}' is a map; it takes no 'classification'")
        if output.name in seen:
            raise BadRequest(f"output '{output.name}' requested twice")
        seen.add(output.name)
        k = output.classification
        if not k:
            continue
        if output.name == "features":
            if k > model.model.num_features:
                raise BadRequest(f"output 'features': classification {k} exceeds its {model.model.num_features} "
                                 "values")
        else:
            try:
                check_top_k(model.model, k, parameter=f"output '{output.name}' classification")
            except InvalidParameter as exc:  # the protocol answers every invalid request 400
                raise BadRequest(exc.message) from None
    return list(outputs)


def core_request(
    model: ServedModel,
    inputs: Sequence[InputTensor],
    outputs: Sequence[RequestedOutput] | None,
    *,
    timeout_s: float | None = None,
    parameters: dict[str, Any] | None = None,
) -> tuple[InferenceRequest, list[RequestedOutput]]:
    """The core's request for these tensors (encoded images or pixels), and the outputs to answer.
    ``parameters``: the request's (``cam_class`` for the ``cam`` output)."""
    requested = check_outputs(model, outputs)
    cam = _cam_wish(model, requested, parameters or {})
    names = [t.name for t in inputs]
    size = input_size(model)
    if len(inputs) != 1 or names[0] not in (IMAGE_INPUT, TENSOR_INPUT):
        unknown = [n for n in names if n not in (IMAGE_INPUT, TENSOR_INPUT)]
        detail = f"unknown input '{unknown[0]}'; " if unknown else ""
        raise BadRequest(
            f"{detail}the model takes exactly one input: '{IMAGE_INPUT}' (BYTES, encoded images) or "
            f"'{TENSOR_INPUT}' (FP32 or UINT8 [N, 3, {size}, {size}]); got {names or 'none'}"
        )
    tensor = inputs[0]
    if tensor.name == IMAGE_INPUT:
        return InferenceRequest(images=_image_blobs(tensor), timeout_s=timeout_s, cam=cam), requested
    return InferenceRequest(pixels=_pixel_batch(tensor, size), timeout_s=timeout_s, cam=cam), requested


def _cam_wish(model: ServedModel, requested: Sequence[RequestedOutput], parameters: dict[str, Any]) -> CamWish | None:
    """What the ``cam`` output explains: the class ``cam_class`` names (index or label), else the top-1."""
    named = parameters.get(CAM_CLASS)
    if not any(o.name == CAM_OUTPUT for o in requested):
        if named is not None:
            raise BadRequest(f"parameter '{CAM_CLASS}' names the class of the '{CAM_OUTPUT}' output, which the "
                             "request does not ask for")
        return None
    if named is None:
        return CamWish(top=1)
    if isinstance(named, bool) or not isinstance(named, (int, str)):
        raise BadRequest(f"parameter '{CAM_CLASS}' must be a class index or label")
    return CamWish(classes=parse_classes(model.model, [str(named)]))


def output_tensors(model: ServedModel, results: Sequence[Outputs],
                   requested: Sequence[RequestedOutput]) -> list[OutputTensor]:
    """The requested output tensors from the core's per-image (features, logits), and class activation
    maps (an ``Explained`` per image) when ``cam`` was asked for."""
    features = np.stack([r[0] for r in results]).astype(np.float32, copy=False)
    logits = np.stack([r[1] for r in results]).astype(np.float32, copy=False)
    values = {"logits": logits, "features": features}
    if any(o.name == CAM_OUTPUT for o in requested):
        values[CAM_OUTPUT] = np.stack([r.maps[0] for r in results]).astype(np.float32, copy=False)
    if any(o.name == "probabilities" for o in requested):
        values["probabilities"] = softmax(logits).astype(np.float32)
    labels = model.model.labels
    return [_output(o, values[o.name], labels) for o in requested]


def _image_blobs(tensor: InputTensor) -> list[tuple[str | None, bytes]]:
    if tensor.datatype != "BYTES":
        raise BadRequest(f"input '{IMAGE_INPUT}' must be BYTES (encoded image files), not {tensor.datatype}")
    shape = tensor.shape
    if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)) or shape[0] < 1:
        raise BadRequest(f"input '{IMAGE_INPUT}' must have shape [N] or [N, 1] with N >= 1, not {shape}")
    blobs: list[tuple[str | None, bytes]] = []
    for e in tensor.data:
        if not isinstance(e, bytes):  # pragma: no cover - the transports decode to bytes
            raise BadRequest(f"input '{IMAGE_INPUT}': elements must be bytes")
        blobs.append((None, e))
    return blobs


def _pixel_batch(tensor: InputTensor, s: int) -> np.ndarray:
    if tensor.datatype not in ("FP32", "UINT8"):
        raise BadRequest(f"input '{TENSOR_INPUT}' must be FP32 or UINT8, not {tensor.datatype}")
    shape = tensor.shape
    if len(shape) != 4 or shape[1:] != [3, s, s] or shape[0] < 1:
        raise BadRequest(f"input '{TENSOR_INPUT}' must have shape [N, 3, {s}, {s}] with N >= 1, not {shape}")
    assert isinstance(tensor.data, np.ndarray)
    return tensor.data


def _output(requested: RequestedOutput, values: np.ndarray, labels: Sequence[str]) -> OutputTensor:
    k = requested.classification
    if not k:
        return OutputTensor(requested.name, "FP32", list(values.shape), values, requested)
    names = labels if requested.name != "features" else None
    rows: list[bytes] = []
    for row in values:
        best = np.argsort(-row, kind="stable")[:k]
        for index in best:
            # Triton's format: the value as C's "%f", the class index, the label when there is one.
            text = f"{float(row[index]):f}:{int(index)}" + (f":{names[index]}" if names else "")
            rows.append(text.encode("utf-8"))
    return OutputTensor(requested.name, "BYTES", [len(values), k], rows, requested)
