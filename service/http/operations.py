"""Operations endpoints: liveness, readiness, model information and Prometheus metrics."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from service.core.about import library_versions
from service.core.errors import NotReady, ServiceUnavailable
from service.core.imaging import describe, describe_formats
from service.core.loading import variant_config_dict
from service.core.registry import ModelRegistry
from service.core.runtime import InferenceService
from service.http.deps import ModelsDep
from service.http.schemas import ErrorResponse, HealthResponse, InfoResponse, ModelSummary, ReadyResponse

router = APIRouter(tags=["operations"])


@router.get(
    "/healthz",
    response_model=HealthResponse,
    responses={503: {"model": ErrorResponse, "description": "The service failed after start-up."}},
    summary="Liveness: the process answers (503 only after a fatal failure)",
)
async def healthz(request: Request) -> HealthResponse:
    models: ModelRegistry | None = getattr(request.app.state, "models", None)
    if models is not None and not models.state.live:
        raise ServiceUnavailable("service failed after start-up; see the server log")
    return HealthResponse(status="ok")


@router.get(
    "/readyz",
    response_model=ReadyResponse,
    responses={503: {"model": ErrorResponse, "description": "Loading, warming up or draining."}},
    summary="Readiness: 200 once warmed up, 503 while loading or draining",
)
async def readyz(request: Request) -> Any:
    models: ModelRegistry | None = getattr(request.app.state, "models", None)
    if models is None:
        raise NotReady("model is loading")
    if not models.state.ready:
        raise models.state.not_ready_error()
    return ReadyResponse(status="ready")


@router.get(
    "/info",
    response_model=InfoResponse,
    responses={404: {"model": ErrorResponse, "description": "Unknown model (?model=)."}},
    summary="Served models; the configuration of one",
)
async def info(
    models: ModelsDep,
    name: Annotated[str | None, Query(
        alias="model", max_length=64,
        description="The model to describe (default: the default model; with several and no default, the "
                    "first by name). Every served model is listed in `models` either way.",
    )] = None,
) -> InfoResponse:
    # Unlike /predict, /info never needs a model named: it is how a client learns the names.
    service = models.get(name) if name or models.default_name else models.services[models.names[0]]
    model = service.model
    engine = model.engine
    settings = service.settings  # the model's own (batching may differ per model)
    return InfoResponse(
        model=service.name,
        variant=model.variant.name,
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
        weights_bytes=weights_bytes(service),
        models=[_summary(models.services[name], name == models.default_name) for name in models.names],
    )


_BYTES_PER_PARAMETER = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1}


def weights_bytes(service: InferenceService) -> int:
    return service.model.num_parameters * _BYTES_PER_PARAMETER.get(str(service.model.engine.dtype), 4)


def _summary(service: InferenceService, default: bool) -> ModelSummary:
    model, engine = service.model, service.model.engine
    return ModelSummary(
        name=service.name, variant=model.variant.name, state=service.state.value, default=default,
        num_classes=model.num_classes, parameters=model.num_parameters, weights_bytes=weights_bytes(service),
        device=str(engine.device), dtype=str(engine.dtype), backend=engine.backend, weights_file=model.weights_file,
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
