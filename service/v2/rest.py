"""The Open Inference Protocol over HTTP/REST (``/v2/...``), with Triton's binary-data extension.

A request body is JSON, or (binary-data extension) a JSON header of ``Inference-Header-Content-Length``
bytes followed by the binary contents of each input whose parameters give ``binary_data_size``, in input
order. An output comes back binary when it asks for ``binary_data: true`` or the request asks for
``binary_data_output: true``; the response is then the JSON header followed by those outputs' contents,
with ``Inference-Header-Content-Length``. In JSON, ``image`` elements are base64 text (image files are not
UTF-8 strings).

Every error is the protocol's ``{"error": "<message>"}`` (``ENVELOPE``, which the server applies under
``/v2``) with the status of the service's error (400, 401, 404, 413, 503 with Retry-After, 504, ...). The
API key is a dependency of the routes that need it. Body limit, request id, metrics and drain are the
server's, shared with the native API.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import zlib
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect

from service.asgi import ErrorEnvelope, ModelsDep, access_record, disconnect_watcher, loaded_models, require_api_key
from service.core.about import service_version
from service.core.errors import BadRequest, BodyTooLarge, ClientGone, UnsupportedMediaType
from service.core.runtime import InferenceRequest, ServedModel
from service.v2 import tensors
from service.v2.protocol import (
    EXTENSIONS,
    IMAGE_INPUT,
    MAX_TENSORS,
    MODEL_VERSION,
    SERVER_NAME,
    InputTensor,
    ModelControl,
    OutputTensor,
    RequestedOutput,
    core_request,
    every_statistics,
    lookup,
    metadata,
    output_tensors,
    request_timeout_s,
)

log = logging.getLogger("service.v2.rest")

HEADER_LENGTH = "Inference-Header-Content-Length"
PREFIX = "/v2"
# Probes: the server traces no request to these.
PROBE_PATHS = (f"{PREFIX}/health/live", f"{PREFIX}/health/ready")


def error_body(code: str, message: str, request_id: str | None, **extra: Any) -> dict[str, Any]:
    """The protocol's error body: its clients read "error" as a string."""
    return {"error": message}


# Any error under /v2 (a service error, an unknown route, 405, 415, a validation error, a fault).
ENVELOPE = ErrorEnvelope(PREFIX, error_body)


def get_model(models: ModelsDep, model_name: str, model_version: str | None = None) -> ServedModel:
    """The served model the path names (404 for any other name or version)."""
    return lookup(models, model_name, model_version)


# -- request decoding ---------------------------------------------------------------------------------------
def _decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    encoding = (encoding or "identity").strip().lower()
    if encoding == "identity":
        return body
    if encoding not in ("gzip", "deflate"):
        raise UnsupportedMediaType(f"Content-Encoding '{encoding}' is not supported (gzip, deflate or none)")
    inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise BadRequest(f"body is not valid {encoding} data: {exc}") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise BodyTooLarge(f"decompressed request body exceeds the limit of {limit} bytes")
    return out


def load_json(text: bytes) -> Any:
    """The request's JSON; ``BadRequest`` for anything else, including nesting deeper than the decoder
    goes (it stops at the interpreter's recursion limit instead of exhausting the stack). Everything that
    walks the result afterwards is iterative or bounded (``tensors.MAX_DATA_DEPTH``)."""
    try:
        return json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"request is not valid JSON: {exc}") from None
    except RecursionError:
        raise BadRequest("request JSON nests too deeply") from None


def _parameters(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest(f"{where}: 'parameters' must be an object")
    return value


def parse_infer_request(
    body: bytes, header_length: str | None
) -> tuple[dict[str, Any], list[InputTensor], list[RequestedOutput] | None]:
    """Body (+ the binary-data header) -> (request JSON, input tensors, requested outputs)."""
    if header_length is not None:
        try:
            json_size = int(header_length)
        except ValueError:
            raise BadRequest(f"{HEADER_LENGTH} must be an integer") from None
        if not 0 < json_size <= len(body):
            raise BadRequest(f"{HEADER_LENGTH} {json_size} does not fit a body of {len(body)} bytes")
        head, binary = body[:json_size], memoryview(body)[json_size:]
    else:
        head, binary = body, memoryview(b"")
    request = load_json(head)
    if not isinstance(request, dict):
        raise BadRequest("request must be a JSON object")
    if "id" in request and not isinstance(request["id"], str):
        raise BadRequest("'id' must be a string")
    raw_inputs = request.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise BadRequest("request needs 'inputs', a non-empty list")
    if len(raw_inputs) > MAX_TENSORS:
        raise BadRequest(f"request has {len(raw_inputs)} inputs; at most {MAX_TENSORS} are read")
    inputs: list[InputTensor] = []
    offset = 0
    for i, item in enumerate(raw_inputs):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise BadRequest(f"inputs[{i}] must be an object with a 'name'")
        name = item["name"]
        datatype, shape = item.get("datatype"), item.get("shape")
        if not isinstance(datatype, str) or not isinstance(shape, list):
            raise BadRequest(f"input '{name}' needs 'datatype' (a string) and 'shape' (a list)")
        parameters = _parameters(item.get("parameters"), f"input '{name}'")
        size = parameters.get("binary_data_size")
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise BadRequest(f"input '{name}': binary_data_size must be a non-negative integer")
            if offset + size > len(binary):
                raise BadRequest(f"input '{name}': binary_data_size {size} exceeds the binary data sent")
            data = tensors.from_raw(binary[offset : offset + size], datatype, shape, name)
            offset += size
        elif "data" in item:
            data = tensors.from_json(item["data"], datatype, shape, name)
            if datatype == "BYTES":
                data = _json_bytes(name, data, parameters)
        else:
            raise BadRequest(f"input '{name}' has neither 'data' nor a binary_data_size parameter")
        inputs.append(InputTensor(name, datatype, shape, data, parameters))
    if offset != len(binary):
        raise BadRequest(f"{len(binary) - offset} bytes of binary data belong to no input")
    outputs = None
    raw_outputs = request.get("outputs")
    if raw_outputs is not None:
        if isinstance(raw_outputs, list) and len(raw_outputs) > MAX_TENSORS:
            raise BadRequest(f"request asks for {len(raw_outputs)} outputs; at most {MAX_TENSORS} are read")
        if not isinstance(raw_outputs, list) or not all(
            isinstance(o, dict) and isinstance(o.get("name"), str) for o in raw_outputs
        ):
            raise BadRequest("'outputs' must be a list of objects with a 'name'")
        outputs = [RequestedOutput(o["name"], _parameters(o.get("parameters"), f"output '{o['name']}'"))
                   for o in raw_outputs]
    return request, inputs, outputs


def _json_bytes(name: str, elements: list[Any], parameters: dict[str, Any]) -> list[bytes]:
    """BYTES elements given as JSON strings: base64 for ``image`` (or with ``content_type: base64``),
    else UTF-8 text."""
    if name == IMAGE_INPUT or parameters.get("content_type") in ("base64", "b64"):
        out = []
        for i, text in enumerate(elements):
            try:
                out.append(base64.b64decode(text.split(",", 1)[1] if text.startswith("data:") else text,
                                            validate=True))
            except (binascii.Error, ValueError):
                raise BadRequest(f"input '{name}': element {i + 1} is not base64 (JSON carries images as base64; "
                                 "or send them binary with the binary-data extension)") from None
        return out
    return [text.encode("utf-8") for text in elements]


# -- response encoding --------------------------------------------------------------------------------------
def _binary_wanted(output: OutputTensor, request_parameters: dict[str, Any]) -> bool:
    own = output.requested.parameters.get("binary_data") if output.requested else None
    if own is not None:
        return bool(own)
    return bool(request_parameters.get("binary_data_output", False))


def encode_response(model: ServedModel, request_json: dict[str, Any], outputs: list[OutputTensor]) -> Response:
    request_parameters = _parameters(request_json.get("parameters"), "request")
    body: dict[str, Any] = {"model_name": model.name, "model_version": MODEL_VERSION}
    if "id" in request_json:
        body["id"] = str(request_json["id"])
    blobs: list[bytes] = []
    out_json = []
    for output in outputs:
        entry: dict[str, Any] = {"name": output.name, "datatype": output.datatype, "shape": output.shape}
        if _binary_wanted(output, request_parameters):
            raw = tensors.to_raw(output.data, output.datatype)
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = tensors.to_json(output.data, output.datatype)
        out_json.append(entry)
    body["outputs"] = out_json
    head = json.dumps(body, separators=(",", ":")).encode()
    if not blobs:
        return Response(head, media_type="application/json")
    return Response(
        b"".join([head, *blobs]),
        media_type="application/octet-stream",
        headers={HEADER_LENGTH: str(len(head))},
    )


# -- routes -------------------------------------------------------------------------------------------------
ModelOfPath = Annotated[ServedModel, Depends(get_model)]


def v2_router() -> APIRouter:
    """The protocol's routes. Inference and the repository calls need the API key (when one is set);
    health, metadata and statistics stay open."""
    # Not in /openapi.json: the protocol's contract is its own specification (open_inference_rest.yaml),
    # and the FastAPI document describes this service's native API.
    router = APIRouter(prefix=PREFIX, include_in_schema=False)
    keyed = [Depends(require_api_key)]

    @router.get("", summary="Server metadata")
    async def server_metadata() -> dict[str, Any]:
        return {"name": SERVER_NAME, "version": service_version(), "extensions": list(EXTENSIONS)}

    @router.get("/health/live", summary="Server live (200; 503 only after a fatal failure)")
    async def live(request: Request) -> Any:
        models = loaded_models(request)
        is_live = models is None or models.state.live
        return JSONResponse({"live": is_live}, 200 if is_live else 503)

    @router.get("/health/ready", summary="Server ready (200 once warmed up; 503 while loading or draining)")
    async def ready(request: Request) -> Any:
        models = loaded_models(request)
        is_ready = models is not None and models.state.ready
        return JSONResponse({"ready": is_ready}, 200 if is_ready else 503)

    async def model_metadata(model: ModelOfPath) -> Any:
        return metadata(model)

    async def model_ready(model: ModelOfPath) -> Any:
        return JSONResponse({"name": model.name, "ready": model.ready}, 200 if model.ready else 503)

    async def model_infer(request: Request, model: ModelOfPath) -> Any:
        parsed: dict[str, Any] = {}
        limit = model.server.max_body_bytes

        async def read() -> InferenceRequest:
            try:
                raw = await request.body()
            except ClientDisconnect:
                raise ClientGone() from None
            body = _decompress(raw, request.headers.get("content-encoding"), limit)
            request_json, inputs, outputs = parse_infer_request(body, request.headers.get(HEADER_LENGTH))
            parameters = _parameters(request_json.get("parameters"), "request")
            timeout_s = request_timeout_s(parameters)
            inference, requested = core_request(model, inputs, outputs, timeout_s=timeout_s, parameters=parameters)
            parsed.update(json=request_json, requested=requested)
            return inference

        results = await model.serve(read, cancel_when=disconnect_watcher(request), record=access_record(request))
        return encode_response(model, parsed["json"], output_tensors(model, results, parsed["requested"]))

    async def model_statistics(models: ModelsDep, model_name: str | None = None,
                               model_version: str | None = None) -> Any:
        """The statistics extension: every model's (``/v2/models/stats``) or one model's."""
        return {"model_stats": await every_statistics(models, model_name, model_version)}

    # -- the model repository extension (Triton's): index, load (or reload), unload ------------------------
    async def _control_body(request: Request) -> dict[str, Any]:
        raw = await request.body()
        if not raw.strip():
            return {}
        body = load_json(raw)
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        return body

    async def repository_index(request: Request, models: ModelsDep) -> Any:
        body = await _control_body(request)
        return await ModelControl.index(models, body.get("ready"))

    def repository_call(action: str) -> Callable[..., Awaitable[Any]]:
        async def call(request: Request, models: ModelsDep, model_name: str) -> Any:
            body = await _control_body(request)
            await ModelControl.apply(models, action, model_name, _parameters(body.get("parameters"), "request"))
            return Response(status_code=200)

        return call

    router.add_api_route("/repository/index", repository_index, methods=["POST"], summary="Repository index",
                         dependencies=keyed)
    for action in ModelControl.ACTIONS:
        router.add_api_route(f"/repository/models/{{model_name}}/{action}", repository_call(action),
                             methods=["POST"], summary=f"{action.capitalize()} a model", dependencies=keyed)

    # Before /models/{model_name}, which "stats" would otherwise match as a model's name.
    router.add_api_route("/models/stats", model_statistics, methods=["GET"], summary="Statistics of every model")
    for suffix in ("", "/versions/{model_version}"):
        path = "/models/{model_name}" + suffix
        router.add_api_route(path + "/stats", model_statistics, methods=["GET"], summary="Model statistics")
        router.add_api_route(path, model_metadata, methods=["GET"], summary="Model metadata")
        router.add_api_route(path + "/ready", model_ready, methods=["GET"], summary="Model ready")
        router.add_api_route(path + "/infer", model_infer, methods=["POST"], summary="Inference",
                             dependencies=keyed)
    return router
