"""The Open Inference Protocol over gRPC (``inference.GRPCInferenceService``) plus ``grpc.health.v1``.

A ``grpc.aio`` server on the HTTP server's event loop (the server assembly, ``service.server``, starts and
stops it), driving the same models (``ModelRegistry``): the same decoding pool, batcher, queue bound,
deadlines, limits, API key and metrics as every other door.

- Deadlines: a call's gRPC deadline shortens the server's own (``EFFNET_REQUEST_TIMEOUT_S``); when it
  passes, or the client cancels, gRPC cancels the call and its images leave the queue; the core records
  which of the two it was (``RequestTimeout``, ``ClientGone``), mapped here like every other error.
- Limits: the largest message is ``EFFNET_MAX_BODY_BYTES`` (gRPC answers RESOURCE_EXHAUSTED beyond it);
  more than ``EFFNET_MAX_IMAGES_PER_REQUEST`` images is RESOURCE_EXHAUSTED too.
- API key: ``authorization: Bearer <key>`` metadata on the methods of ``KEYED_METHODS`` (ModelInfer and the
  repository methods; metadata and health stay open), checked once for all of them before the handler.
- The model repository extension (Triton's RepositoryIndex, RepositoryModelLoad, RepositoryModelUnload):
  the same registry calls and parameter checks as ``/v2/repository`` over REST. The server has one
  repository, so a request that names another (``repository_name``) is refused, as Triton refuses it.
- Errors: the service's errors map to gRPC codes (400 INVALID_ARGUMENT, 401 UNAUTHENTICATED, 403
  PERMISSION_DENIED, 404 NOT_FOUND, 413 RESOURCE_EXHAUSTED, 503 UNAVAILABLE with a ``retry-after`` trailer, 504
  DEADLINE_EXCEEDED, 500 INTERNAL).
- Metrics: ``effnet_requests_total`` and ``effnet_request_duration_seconds`` with the full method name as
  ``endpoint`` and the HTTP-equivalent status as ``code``, so one alert covers every door.
- Health: ``grpc.health.v1.Health`` answers SERVING for the service names "", "readiness" and
  ``inference.GRPCInferenceService`` while the model is ready, and for "liveness" unless the service
  failed: what Kubernetes' gRPC probes ask.
- Shutdown: requests are refused with UNAVAILABLE once the service drains (it refuses admission);
  ``stop(grace)`` lets calls in flight finish.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.core import tracing
from service.core.about import service_version
from service.core.access import AccessRecord, request_id
from service.core.auth import check_bearer
from service.core.errors import BadRequest, ClientGone, ServiceError
from service.core.lifecycle import State
from service.core.registry import ServedModels
from service.core.runtime import InferenceRequest, ServedModel
from service.core.settings import ServerSettings
from service.v2 import tensors
from service.v2.pb import grpc_predict_v2_pb2 as pb
from service.v2.pb import grpc_predict_v2_pb2_grpc as pb_grpc
from service.v2.protocol import (
    EXTENSIONS,
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
    properties,
    request_timeout_s,
)

log = logging.getLogger("service.v2.grpc")

SERVICE_NAME = "inference.GRPCInferenceService"
HEALTH_SERVICE = "grpc.health.v1.Health"
# The methods that need the API key (when one is set): declared once, checked before the handler runs.
KEYED_METHODS = frozenset({"ModelInfer", "RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload"})

STATUS_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    499: grpc.StatusCode.CANCELLED,
    500: grpc.StatusCode.INTERNAL,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}

# Which InferTensorContents field holds each datatype (FP16 has none: raw contents only).
_CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def grpc_status(exc: ServiceError) -> grpc.StatusCode:
    return STATUS_CODES.get(exc.status_code, grpc.StatusCode.INTERNAL)


def _parameters(params: Any) -> dict[str, Any]:
    """A protobuf map<string, InferParameter> (or ModelRepositoryParameter) -> plain values."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        which = value.WhichOneof("parameter_choice")
        out[key] = getattr(value, which) if which else None
    return out


def decode_inputs(request: pb.ModelInferRequest) -> list[InputTensor]:
    if len(request.inputs) > MAX_TENSORS:
        raise BadRequest(f"request has {len(request.inputs)} inputs; at most {MAX_TENSORS} are read")
    if len(request.outputs) > MAX_TENSORS:
        raise BadRequest(f"request asks for {len(request.outputs)} outputs; at most {MAX_TENSORS} are read")
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise BadRequest(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs (use it for all or none)"
        )
    inputs = []
    for i, tensor in enumerate(request.inputs):
        name, datatype, shape = tensor.name, tensor.datatype, list(tensor.shape)
        tensors.check_datatype(datatype, name)
        if raw:
            data = tensors.from_raw(raw[i], datatype, shape, name)
        else:
            field = _CONTENTS_FIELD.get(datatype)
            if field is None:
                raise BadRequest(f"input '{name}': {datatype} data must come in raw_input_contents")
            values = list(getattr(tensor.contents, field))
            if datatype == "BYTES":
                if len(values) != tensors.element_count(shape, name):
                    raise BadRequest(f"input '{name}': shape {shape} needs {tensors.element_count(shape, name)} "
                                     f"BYTES elements, contents has {len(values)}")
                data = values
            else:
                data = tensors.from_json(values, datatype, shape, name)
        inputs.append(InputTensor(name, datatype, shape, data, _parameters(tensor.parameters)))
    return inputs


def encode_response(
    model: ServedModel, request: pb.ModelInferRequest, outputs: list[OutputTensor]
) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name=model.name, model_version=MODEL_VERSION, id=request.id)
    for output in outputs:
        response.outputs.add(name=output.name, datatype=output.datatype, shape=output.shape)
        response.raw_output_contents.append(tensors.to_raw(output.data, output.datatype))
    return response


def _metadata(context: grpc.aio.ServicerContext) -> dict[str, str]:
    return {k.lower(): v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}


def _client(context: grpc.aio.ServicerContext) -> str | None:
    peer = context.peer() or ""  # "ipv4:127.0.0.1:5555", "ipv6:[::1]:5555"
    kind, _, address = peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return None
    host = address.rpartition(":")[0]
    return host.strip("[]") or None


def _record(method: str, context: grpc.aio.ServicerContext, metadata: dict[str, str]) -> AccessRecord:
    """The access record of a call: the full method name is its path and its metrics label."""
    return AccessRecord("gRPC", method, request_id(metadata.get("x-request-id")), client=_client(context),
                        endpoint=method)


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, models: ServedModels, server: ServerSettings) -> None:
        self.models = models
        self.server = server
        self.metrics = models.metrics

    # -- every call: auth, metrics, access log, error mapping -------------------------------------------
    async def _observe(
        self,
        rpc: str,
        context: grpc.aio.ServicerContext,
        handler: Callable[[AccessRecord], Awaitable[Any]],
    ) -> Any:
        method = f"/{SERVICE_NAME}/{rpc}"
        metadata = _metadata(context)
        record = _record(method, context, metadata)
        if tracing.tracer() is not None:  # nothing to build while tracing is off
            record.start_trace(method.lstrip("/"), "server",
                               {"rpc.system": "grpc", "rpc.service": SERVICE_NAME, "rpc.method": rpc},
                               carrier=metadata)
        trailers: list[tuple[str, str]] = [("x-request-id", record.request_id)]
        if record.trace is not None:
            trailers.append(("traceresponse", record.trace.traceresponse()))
        try:
            if rpc in KEYED_METHODS:
                check_bearer(self.server, metadata.get("authorization"))
            result = await handler(record)
        except ServiceError as exc:
            record.fail(exc)
            retry_after = exc.headers.get("Retry-After")
            if retry_after:
                trailers.append(("retry-after", retry_after))
            record.finish(self.metrics)
            await context.abort(grpc_status(exc), exc.message, trailing_metadata=tuple(trailers))
        except asyncio.CancelledError:
            # gRPC cancelled the call (its caller left, or its deadline passed): the core noted which on
            # the record when the call was in its hands; before that, the caller left.
            if not record.error_code:
                record.fail(ClientGone())
            record.finish(self.metrics)
            raise
        except Exception as exc:
            log.error("unhandled error in %s", method, exc_info=exc, extra={"request_id": record.request_id})
            record.error_code = "internal_error"
            record.finish(self.metrics, 500)
            await context.abort(grpc.StatusCode.INTERNAL, "internal server error", trailing_metadata=tuple(trailers))
        context.set_trailing_metadata(tuple(trailers))
        record.finish(self.metrics)
        return result

    # -- the protocol's methods -------------------------------------------------------------------------------
    async def ServerLive(self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        async def handle(record: AccessRecord) -> pb.ServerLiveResponse:
            return pb.ServerLiveResponse(live=self.models.state.live)

        return await self._observe("ServerLive", context, handle)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        async def handle(record: AccessRecord) -> pb.ServerReadyResponse:
            return pb.ServerReadyResponse(ready=self.models.state.ready)

        return await self._observe("ServerReady", context, handle)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        async def handle(record: AccessRecord) -> pb.ModelReadyResponse:
            return pb.ModelReadyResponse(ready=lookup(self.models, request.name, request.version).ready)

        return await self._observe("ModelReady", context, handle)

    async def ServerMetadata(  # noqa: N802
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        async def handle(record: AccessRecord) -> pb.ServerMetadataResponse:
            return pb.ServerMetadataResponse(name=SERVER_NAME, version=service_version(), extensions=EXTENSIONS)

        return await self._observe("ServerMetadata", context, handle)

    async def ModelMetadata(  # noqa: N802
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        async def handle(record: AccessRecord) -> pb.ModelMetadataResponse:
            model = lookup(self.models, request.name, request.version)
            meta = metadata(model)
            response = pb.ModelMetadataResponse(
                name=meta["name"], versions=meta["versions"], platform=meta["platform"]
            )
            for entry in meta["inputs"]:
                response.inputs.add(**entry)
            for entry in meta["outputs"]:
                response.outputs.add(**entry)
            response.properties.update(properties(model))
            return response

        return await self._observe("ModelMetadata", context, handle)

    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        async def handle(record: AccessRecord) -> pb.ModelInferResponse:
            model = lookup(self.models, request.model_name, request.model_version)
            requested: list[RequestedOutput] = []

            async def read() -> InferenceRequest:
                inputs = decode_inputs(request)
                outputs = [RequestedOutput(o.name, _parameters(o.parameters)) for o in request.outputs] or None
                parameters = _parameters(request.parameters)
                timeout_s = request_timeout_s(parameters, context.time_remaining())
                inference, wanted = core_request(model, inputs, outputs, timeout_s=timeout_s, parameters=parameters)
                requested.extend(wanted)
                return inference

            # No disconnect watcher: gRPC cancels this task itself when the client leaves.
            results = await model.serve(read, record=record)
            return encode_response(model, request, output_tensors(model, results, requested))

        return await self._observe("ModelInfer", context, handle)


    async def ModelStatistics(  # noqa: N802
        self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        async def handle(record: AccessRecord) -> pb.ModelStatisticsResponse:
            response = pb.ModelStatisticsResponse()
            # An empty name: every model.
            for stats in await every_statistics(self.models, request.name, request.version):
                entry = response.model_stats.add(
                    name=stats["name"], version=stats["version"], last_inference=stats["last_inference"],
                    inference_count=stats["inference_count"], execution_count=stats["execution_count"],
                )
                for key, value in stats["inference_stats"].items():
                    getattr(entry.inference_stats, key).CopyFrom(pb.StatisticDuration(**value))
                for batch in stats["batch_stats"]:
                    entry.batch_stats.add(**{k: v if k == "batch_size" else pb.StatisticDuration(**v)
                                             for k, v in batch.items()})
            return response

        return await self._observe("ModelStatistics", context, handle)

    # -- the model repository extension (Triton's): index, load (or reload), unload -------------------------
    @staticmethod
    def _check_repository(request: Any) -> None:
        """What every repository call checks first (after the API key): the repository's name."""
        if request.repository_name:
            # Not ignored: a caller that names a repository means that one, and this server has only its own
            # (EFFNET_MODEL_REPOSITORY). Triton refuses any name too.
            raise BadRequest(f"repository '{request.repository_name}': this server has one repository; "
                             "leave repository_name empty")

    async def RepositoryIndex(  # noqa: N802
        self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        async def handle(record: AccessRecord) -> pb.RepositoryIndexResponse:
            self._check_repository(request)
            response = pb.RepositoryIndexResponse()
            for entry in await ModelControl.index(self.models, request.ready):
                response.models.add(**entry)
            return response

        return await self._observe("RepositoryIndex", context, handle)

    async def _repository_call(self, action: str, request: Any, context: grpc.aio.ServicerContext,
                               answer: Any) -> Any:
        async def handle(record: AccessRecord) -> Any:
            self._check_repository(request)
            # A deadline that passes mid-load cancels this call, not the load (the registry shields it).
            await ModelControl.apply(self.models, action, request.model_name, _parameters(request.parameters))
            return answer

        return await self._observe(f"RepositoryModel{action.capitalize()}", context, handle)

    async def RepositoryModelLoad(  # noqa: N802
        self, request: pb.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        return await self._repository_call("load", request, context, pb.RepositoryModelLoadResponse())

    async def RepositoryModelUnload(  # noqa: N802
        self, request: pb.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        return await self._repository_call("unload", request, context, pb.RepositoryModelUnloadResponse())


class HealthServicer(health_pb2_grpc.HealthServicer):
    """``grpc.health.v1``: readiness for "", "readiness" and the inference service; liveness for "liveness"."""

    READINESS_NAMES = ("", "readiness", SERVICE_NAME)

    def __init__(self, models: ServedModels) -> None:
        self.models = models
        self.metrics = models.metrics

    def _status(self, name: str, state: State | None = None) -> int | None:
        state = state or self.models.state
        serving = health_pb2.HealthCheckResponse.SERVING
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        if name in self.READINESS_NAMES:
            return serving if state.ready else not_serving
        if name == "liveness":
            return serving if state.live else not_serving
        return None

    async def Check(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        record = _record(f"/{HEALTH_SERVICE}/Check", context, _metadata(context))
        status = self._status(request.service)
        if status is None:
            record.finish(self.metrics, 404)
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service '{request.service}'")
        record.finish(self.metrics)
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(  # noqa: N802
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        """The current status, then one message per change, driven by the service's lifecycle listener."""
        changes: asyncio.Queue[State] = asyncio.Queue()
        self.models.lifecycle.add_listener(changes.put_nowait)
        try:
            state = self.models.state
            last = None
            while True:
                status = self._status(request.service, state)
                if status is None:
                    status = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
                if status != last:
                    yield health_pb2.HealthCheckResponse(status=status)
                    last = status
                state = await changes.get()
        finally:
            self.models.lifecycle.remove_listener(changes.put_nowait)


def grpc_address(host: str, port: int) -> str:
    """host:port for grpc (IPv6 literals in brackets)."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def port_problem(host: str, port: int) -> str | None:
    """Why the gRPC port cannot be bound (taken, no permission, bad address), or None if it can.

    A check before start-up, for a clear one-line error; the server still reports a failure to bind.
    """
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"cannot resolve the gRPC address {host}: {exc.strerror}"
    for family, kind, proto, _, address in infos[:1]:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                return f"cannot bind the gRPC port {grpc_address(host, port)} (EFFNET_GRPC_PORT): {exc.strerror}"
    return None


class GrpcServer:
    """The gRPC front-end: ``await start()`` binds and serves, ``await stop(grace)`` finishes calls in flight."""

    def __init__(self, models: ServedModels, server: ServerSettings, address: str, *, shared: bool = False) -> None:
        """``shared``: several front-end workers of one server listen on the port (``SO_REUSEPORT``; the
        kernel spreads the connections); the server checked before starting them that no other process
        holds it. Otherwise the port is this process's alone: a second server could not bind it and
        silently share its traffic."""
        self.address = address
        max_message = server.max_body_bytes
        self.server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", max_message),
                ("grpc.max_send_message_length", -1),
                ("grpc.so_reuseport", 1 if shared else 0),
            ]
        )
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(models, server), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(HealthServicer(models), self.server)
        self.port: int | None = None

    async def start(self) -> None:
        try:
            self.port = self.server.add_insecure_port(self.address)
        except RuntimeError as exc:
            raise OSError(f"cannot bind the gRPC port {self.address}: {exc}") from None
        if not self.port:
            raise OSError(f"cannot bind the gRPC port {self.address}")
        await self.server.start()
        log.info("gRPC (Open Inference Protocol, grpc.health.v1) on %s", self.address)

    async def stop(self, grace: float) -> None:
        await self.server.stop(grace)


__all__ = ["GrpcServer", "HealthServicer", "InferenceServicer", "grpc_address", "grpc_status", "port_problem"]
