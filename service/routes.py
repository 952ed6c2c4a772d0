"""HTTP endpoints: inference (/predict, /features) and operations (/healthz, /readyz, /info, /metrics).

Both inference endpoints take either ``multipart/form-data`` with one or more parts named ``file`` or a
raw body with an ``image/*`` (or ``application/octet-stream``) content type. The request body is parsed
here rather than by FastAPI parameters because the two encodings share one endpoint; its OpenAPI
description is written out in ``IMAGE_REQUEST_BODY``.
"""

import asyncio
import functools
import hmac
import importlib.metadata
import platform
import time
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect
from starlette.types import Receive

from service.batching import ClientGone
from service.engine import variant_config_dict
from service.errors import (
    BadRequest,
    NotReady,
    ServiceError,
    ServiceUnavailable,
    ShuttingDown,
    TooManyImages,
    Unauthorized,
    UnsupportedMediaType,
    error_response,
)
from service.imaging import describe
from service.runtime import InferenceService
from service.schemas import (
    ClassScore,
    ErrorResponse,
    FeaturesResponse,
    FeaturesResult,
    HealthResponse,
    InfoResponse,
    PredictResponse,
    PredictResult,
    ReadyResponse,
)
from service.settings import Settings

# Raw-body content types accepted besides multipart. Other image/* types (svg+xml, heic, ...) are 415.
RAW_IMAGE_TYPES = (
    "image/jpeg",
    "image/jpg",
    "image/pjpeg",
    "image/png",
    "image/webp",
    "image/gif",
    "image/bmp",
    "image/x-ms-bmp",
    "image/x-bmp",
    "image/tiff",
    "application/octet-stream",
)
_BINARY = {"type": "string", "format": "binary"}
IMAGE_REQUEST_BODY: dict[str, Any] = {
    "required": True,
    "description": (
        "Either multipart/form-data with one or more parts named `file`, or the raw bytes of one image. "
        "Accepted formats: JPEG, PNG, WebP, GIF (first frame), BMP, TIFF."
    ),
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {"file": {"type": "array", "items": _BINARY, "minItems": 1}},
                "required": ["file"],
            }
        },
        **{media: {"schema": _BINARY} for media in RAW_IMAGE_TYPES if media != "image/jpg"},
    },
}

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in {
        400: "Empty, undecodable or unsupported image, or malformed body.",
        401: "Missing or wrong API key (only when EFFNET_API_KEY is set).",
        413: "Body, image or number of images too large.",
        415: "Unsupported content type.",
        422: "Invalid query parameters.",
        500: "Inference failed for the batch holding this request.",
        503: "Overloaded, not ready or shutting down; see Retry-After.",
        504: "Not answered within EFFNET_REQUEST_TIMEOUT_S.",
    }.items()
}

_bearer = HTTPBearer(auto_error=False, description="Required only when EFFNET_API_KEY is set.")


def get_service(request: Request) -> InferenceService:
    service = getattr(request.app.state, "service", None)
    if service is None:
        raise NotReady("model is not loaded yet")
    return service


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def require_api_key(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    key = request.app.state.settings.api_key
    if key is None:
        return
    supplied = credentials.credentials if credentials is not None else ""
    if not hmac.compare_digest(supplied.encode("utf-8"), key.get_secret_value().encode("utf-8")):
        raise Unauthorized()


# -- reading the images ------------------------------------------------------------------------------------
async def read_images(request: Request, settings: Settings) -> list[tuple[str | None, bytes]]:
    """The uploaded images as (filename, bytes). A client that hangs up mid-upload raises ``ClientGone``
    (answered 499 ``client_gone``, like one that leaves while queued), not a 500 or a 400."""
    content_type = request.headers.get("content-type", "")
    media = content_type.split(";", 1)[0].strip().lower()
    # A request larger than the whole queue could never be admitted: that is a 413, not a 503.
    cap = min(settings.max_images_per_request, settings.max_queue)
    if media == "multipart/form-data":
        parser = MultiPartParser(
            request.headers, request.stream(), max_files=cap, max_fields=16, max_part_size=64 * 1024
        )
        try:
            form = await parser.parse()
        except ServiceError:
            raise
        except ClientDisconnect:
            raise ClientGone() from None
        except MultiPartException as exc:
            if exc.message.startswith("Too many files"):
                raise TooManyImages(f"too many images in one request; the limit is {cap}") from None
            raise BadRequest(f"invalid multipart body: {exc.message}") from None
        except Exception as exc:  # python-multipart errors on malformed bodies
            raise BadRequest(f"invalid multipart body ({type(exc).__name__})") from None
        try:
            parts = form.getlist("file")
            if not parts:
                raise BadRequest("multipart body has no part named 'file'")
            blobs: list[tuple[str | None, bytes]] = []
            for part in parts:
                if not isinstance(part, UploadFile):
                    raise BadRequest("part 'file' must be a file upload (with a filename)")
                name = (part.filename or None) and part.filename[:255]
                blobs.append((name, await part.read()))
            return blobs
        finally:
            await form.close()
    if media.startswith("image/") or media == "application/octet-stream":
        if media not in RAW_IMAGE_TYPES:
            raise UnsupportedMediaType(
                f"unsupported image type {media}; accepted: JPEG, PNG, WebP, GIF, BMP, TIFF"
            )
        try:
            return [(None, await request.body())]
        except ClientDisconnect:
            raise ClientGone() from None
    raise UnsupportedMediaType(
        f"unsupported content type {media or '(none)'}: send multipart/form-data with 'file' parts "
        "or a raw image body with an image/* content type"
    )


async def _wait_for_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def run_inference(request: Request, service: InferenceService) -> tuple[list[str | None], list[tuple]]:
    settings = service.settings
    with service.admit():
        blobs = await read_images(request, settings)
        request.state.images = len(blobs)
        deadline = time.monotonic() + settings.request_timeout_s
        watcher = asyncio.ensure_future(_wait_for_disconnect(request.receive))
        try:
            outputs = await service.infer(blobs, deadline=deadline, cancel_when=watcher)
        finally:
            watcher.cancel()
    return [name for name, _ in blobs], outputs


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - np.max(logits)
    exp = np.exp(shifted)
    return exp / exp.sum()


def _client_gone(request: Request) -> JSONResponse:
    request.state.reject_reason = "client_gone"
    return error_response(request, 499, "client_gone", "client disconnected")


# -- routers -----------------------------------------------------------------------------------------------
def inference_router(num_classes: int, *, require_auth: bool = False) -> APIRouter:
    """/predict and /features. With ``require_auth`` they need the API key, and the OpenAPI document
    declares the bearer scheme; without it they declare no security, as they need none."""
    router = APIRouter(tags=["inference"], dependencies=[Depends(require_api_key)] if require_auth else [])

    @router.post(
        "/predict",
        response_model=PredictResponse,
        response_model_exclude_unset=True,
        responses=ERROR_RESPONSES,
        openapi_extra={"requestBody": IMAGE_REQUEST_BODY},
        summary="Classify one or more images",
    )
    async def predict(
        request: Request,
        service: Annotated[InferenceService, Depends(get_service)],
        top_k: Annotated[int, Query(ge=1, le=num_classes, description="Classes to return per image.")] = 5,
        logits: Annotated[bool, Query(description="Also return all raw logits.")] = False,
    ) -> Any:
        try:
            names, outputs = await run_inference(request, service)
        except ClientGone:
            return _client_gone(request)
        labels = service.model.labels
        results = []
        for name, (_, raw) in zip(names, outputs, strict=True):
            probs = _softmax(raw)
            top = np.argsort(-probs, kind="stable")[:top_k]
            scores = [ClassScore(index=int(i), label=labels[i], score=float(probs[i])) for i in top]
            if logits:
                results.append(PredictResult(filename=name, top_k=scores, logits=raw.tolist()))
            else:
                results.append(PredictResult(filename=name, top_k=scores))
        return PredictResponse(model=service.model.variant.name, results=results)

    @router.post(
        "/features",
        response_model=FeaturesResponse,
        responses=ERROR_RESPONSES,
        openapi_extra={"requestBody": IMAGE_REQUEST_BODY},
        summary="Embed one or more images (pooled features before the classifier)",
    )
    async def features(
        request: Request,
        service: Annotated[InferenceService, Depends(get_service)],
        normalize: Annotated[bool, Query(description="L2-normalise each embedding.")] = False,
    ) -> Any:
        try:
            names, outputs = await run_inference(request, service)
        except ClientGone:
            return _client_gone(request)
        results = []
        for name, (pooled, _) in zip(names, outputs, strict=True):
            vector = pooled.astype(np.float64)
            if normalize:
                vector = vector / max(float(np.linalg.norm(vector)), 1e-12)
            results.append(FeaturesResult(filename=name, embedding=vector.tolist()))
        return FeaturesResponse(
            model=service.model.variant.name, dim=service.model.num_features, results=results
        )

    return router


@functools.cache
def _versions() -> dict[str, str]:
    # Read once: importlib.metadata parses each package's METADATA file, ~1 ms a package.
    versions = {"python": platform.python_version()}
    for dist in ("effnet-serve", "torch", "numpy", "pillow", "fastapi", "uvicorn", "onnxruntime"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


operations_router = APIRouter(tags=["operations"])


@operations_router.get(
    "/healthz",
    response_model=HealthResponse,
    responses={503: {"model": ErrorResponse, "description": "The service failed after start-up."}},
    summary="Liveness: the process answers (503 only after a fatal failure)",
)
async def healthz(request: Request) -> HealthResponse:
    service: InferenceService | None = getattr(request.app.state, "service", None)
    if service is not None and service.state == "failed":
        raise ServiceUnavailable("service failed after start-up; see the server log")
    return HealthResponse(status="ok")


@operations_router.get(
    "/readyz",
    response_model=ReadyResponse,
    responses={503: {"model": ErrorResponse, "description": "Loading, warming up or draining."}},
    summary="Readiness: 200 once warmed up, 503 while loading or draining",
)
async def readyz(request: Request) -> Any:
    service: InferenceService | None = getattr(request.app.state, "service", None)
    if service is None:
        raise NotReady("model is loading")
    if service.ready:
        return ReadyResponse(status="ready")
    if service.state in ("draining", "stopped"):
        raise ShuttingDown("server is shutting down")
    raise NotReady(f"model is not ready ({service.state})")


@operations_router.get(
    "/info", response_model=InfoResponse, summary="Model, preprocessing and serving configuration"
)
async def info(
    service: Annotated[InferenceService, Depends(get_service)],
    settings: Annotated[Settings, Depends(get_settings)],
) -> InfoResponse:
    model = service.model
    engine = model.engine
    return InfoResponse(
        model=model.variant.name,
        state=service.state,
        num_classes=model.num_classes,
        num_features=model.num_features,
        parameters=model.num_parameters,
        config=variant_config_dict(model.variant),
        preprocessing=describe(model.preprocess),  # type: ignore[arg-type]
        device=engine.device,
        dtype=engine.dtype,
        backend=engine.backend,
        weights_source=model.weights_source,
        weights_file=model.weights_file,
        weights_sha256=model.weights_sha256,
        batching={
            "max_batch_size": settings.max_batch_size,
            "max_batch_delay_ms": settings.max_batch_delay_ms,
            "max_queue": settings.max_queue,
            "request_timeout_s": settings.request_timeout_s,
        },  # type: ignore[arg-type]
        limits={
            "max_body_bytes": settings.max_body_bytes,
            "max_image_pixels": settings.max_image_pixels,
            "max_images_per_request": settings.max_images_per_request,
        },  # type: ignore[arg-type]
        threads={"torch": settings.effective_num_threads, "decode": settings.effective_decode_threads},
        auth_required=settings.api_key is not None,
        versions=_versions(),
    )


@operations_router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {
            "content": {"text/plain": {"schema": {"type": "string"}}},
            "description": "Prometheus text exposition format.",
        }
    },
    summary="Prometheus metrics",
)
async def metrics(request: Request) -> Response:
    registry = request.app.state.metrics
    return Response(registry.render(), media_type=registry.content_type)
