"""Operations endpoints: liveness, readiness, model information and Prometheus metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from service.core.about import library_versions
from service.core.errors import NotReady, ServiceUnavailable
from service.core.imaging import describe, describe_formats
from service.core.loading import variant_config_dict
from service.core.runtime import InferenceService
from service.http.deps import ServiceDep, SettingsDep
from service.http.schemas import ErrorResponse, HealthResponse, InfoResponse, ReadyResponse

router = APIRouter(tags=["operations"])


@router.get(
    "/healthz",
    response_model=HealthResponse,
    responses={503: {"model": ErrorResponse, "description": "The service failed after start-up."}},
    summary="Liveness: the process answers (503 only after a fatal failure)",
)
async def healthz(request: Request) -> HealthResponse:
    service: InferenceService | None = getattr(request.app.state, "service", None)
    if service is not None and not service.state.live:
        raise ServiceUnavailable("service failed after start-up; see the server log")
    return HealthResponse(status="ok")


@router.get(
    "/readyz",
    response_model=ReadyResponse,
    responses={503: {"model": ErrorResponse, "description": "Loading, warming up or draining."}},
    summary="Readiness: 200 once warmed up, 503 while loading or draining",
)
async def readyz(request: Request) -> Any:
    service: InferenceService | None = getattr(request.app.state, "service", None)
    if service is None:
        raise NotReady("model is loading")
    if not service.state.ready:
        raise service.state.not_ready_error()
    return ReadyResponse(status="ready")


@router.get(
    "/info", response_model=InfoResponse, summary="Model, preprocessing and serving configuration"
)
async def info(service: ServiceDep, settings: SettingsDep) -> InfoResponse:
    model = service.model
    engine = model.engine
    return InfoResponse(
        model=model.variant.name,
        state=service.state.value,
        num_classes=model.num_classes,
        num_features=model.num_features,
        parameters=model.num_parameters,
        config=variant_config_dict(model.variant),
        preprocessing=describe(model.preprocess),  # type: ignore[arg-type]
        image_formats=describe_formats(),  # type: ignore[arg-type]
        device=engine.device,
        dtype=engine.dtype,
        backend=engine.backend,
        weights_source=model.weights_source,
        weights_file=model.weights_file,
        weights_sha256=model.weights_sha256,
        weights_format=model.source_format,
        labels_source=model.labels_source,
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
        versions=library_versions(),
        precision=engine.dtype,
        quantization=model.quantization.as_dict() if model.quantization else None,  # type: ignore[arg-type]
    )


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {
            "content": {"text/plain": {"schema": {"type": "string"}}},
            "description": "Prometheus text exposition format; OpenMetrics (with the request latency's trace "
            "exemplars) when the Accept header asks for application/openmetrics-text.",
        }
    },
    summary="Prometheus metrics",
)
async def metrics(request: Request) -> Response:
    body, content_type = request.app.state.metrics.exposition(request.headers.get("accept"))
    return Response(body, media_type=content_type)
