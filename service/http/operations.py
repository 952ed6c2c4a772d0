"""Operations endpoints: liveness, readiness, model information and Prometheus metrics."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from service.asgi import ModelsDep, loaded_models
from service.core.about import library_versions
from service.core.errors import NotReady, ServiceUnavailable
from service.core.imaging import describe, describe_formats
from service.core.models import variant_config_dict
from service.core.runtime import ServedModel
from service.http.schemas import ErrorResponse, HealthResponse, InfoResponse, ModelSummary, ReadyResponse

router = APIRouter(tags=["operations"])

# Probes and scrapes: the server traces no request to these (a span every few seconds says nothing).
PROBE_PATHS = ("/healthz", "/readyz", "/metrics")


@router.get(
    "/healthz",
    response_model=HealthResponse,
    responses={503: {"model": ErrorResponse, "description": "The service failed after start-up."}},
    summary="Liveness: the process answers (503 only after a fatal failure)",
)
async def healthz(request: Request) -> HealthResponse:
    models = loaded_models(request)
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
    models = loaded_models(request)
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
    served = models.get(name, or_first=True)
    model = served.model
    engine = model.engine
    settings = served.settings  # the model's own (batching may differ per model)
    server = served.server
    return InfoResponse(
        model=served.name,
        variant=model.variant.name,
        state=served.state.value,
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
            "request_timeout_s": server.request_timeout_s,
        },  # type: ignore[arg-type]
        limits={
            "max_body_bytes": server.max_body_bytes,
            "max_image_pixels": server.max_image_pixels,
            "max_images_per_request": server.max_images_per_request,
        },  # type: ignore[arg-type]
        threads={"torch": settings.effective_num_threads, "decode": models.decode_threads},
        auth_required=server.api_key is not None,
        versions=library_versions(),
        precision=engine.dtype,
        quantization=model.quantization.as_dict() if model.quantization else None,  # type: ignore[arg-type]
        weights_bytes=weights_bytes(served),
        models=[_summary(models.models[name], name == models.default_name) for name in models.names],
    )


_BYTES_PER_PARAMETER = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1}


def weights_bytes(served: ServedModel) -> int:
    return served.model.num_parameters * _BYTES_PER_PARAMETER.get(str(served.model.engine.dtype), 4)


def _summary(served: ServedModel, default: bool) -> ModelSummary:
    model, engine = served.model, served.model.engine
    return ModelSummary(
        name=served.name, variant=model.variant.name, state=served.state.value, default=default,
        num_classes=model.num_classes, parameters=model.num_parameters, weights_bytes=weights_bytes(served),
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
    body, content_type = await request.app.state.metrics.render_for(request.headers.get("accept"))
    return Response(body, media_type=content_type)
