"""The inference endpoints: /predict (top-k classes) and /features (pooled embeddings).

A handler only reads the upload, hands the images to the core and formats the answer; decoding,
batching and inference happen in ``service.core``.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.exceptions import RequestValidationError

from service.core.outputs import embedding, require_classifier, top_classes
from service.core.runtime import InferenceRequest, InferenceService, Outputs
from service.http.asgi import access_record, disconnect_watcher
from service.http.deps import ServiceDep, require_api_key
from service.http.schemas import (
    ClassScore,
    ErrorResponse,
    FeaturesResponse,
    FeaturesResult,
    PredictResponse,
    PredictResult,
)
from service.http.uploads import IMAGE_REQUEST_BODY, read_images

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in {
        400: "Empty, undecodable or unsupported image, or malformed body.",
        401: "Missing or wrong API key (only when EFFNET_API_KEY is set).",
        413: "Body, image or number of images too large.",
        404: "Unknown model (?model=), or several models served and none named.",
        415: "Unsupported content type.",
        422: "Invalid query parameters.",
        500: "Inference failed for the batch holding this request.",
        503: "Overloaded, not ready or shutting down; see Retry-After.",
        504: "Not answered within EFFNET_REQUEST_TIMEOUT_S.",
    }.items()
}


async def run_inference(request: Request, service: InferenceService) -> tuple[list[str | None], list[Outputs]]:
    """The upload through the core's request entry; (file names, per-image outputs) in order."""
    names: list[str | None] = []

    async def read() -> InferenceRequest:
        blobs = await read_images(request, service)
        names.extend(name for name, _ in blobs)
        return InferenceRequest(images=blobs)

    outputs = await service.serve(read, cancel_when=disconnect_watcher(request), record=access_record(request))
    return names, outputs


def _check_top_k(k: int, num_classes: int) -> None:
    # The bound depends on the served model, so it is checked here rather than declared on the Query;
    # the answer is the same 422 a declared bound would give.
    if k > num_classes:
        raise RequestValidationError([{
            "type": "less_than_equal", "loc": ("query", "top_k"),
            "msg": f"Input should be less than or equal to {num_classes}", "input": k,
        }])


def inference_router(*, require_auth: bool = False) -> APIRouter:
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
        service: ServiceDep,
        top_k: Annotated[int, Query(ge=1, description="Classes to return per image (at most the model's).")] = 5,
        logits: Annotated[bool, Query(description="Also return all raw logits.")] = False,
    ) -> Any:
        require_classifier(service.model)
        _check_top_k(top_k, service.model.num_classes)
        names, outputs = await run_inference(request, service)
        labels = service.model.labels
        results = []
        for name, (_, raw) in zip(names, outputs, strict=True):
            scores = [ClassScore(index=c.index, label=c.label, score=c.score) for c in top_classes(raw, labels, top_k)]
            if logits:
                results.append(PredictResult(filename=name, top_k=scores, logits=raw.tolist()))
            else:
                results.append(PredictResult(filename=name, top_k=scores))
        return PredictResponse(model=service.name, results=results)

    @router.post(
        "/features",
        response_model=FeaturesResponse,
        responses=ERROR_RESPONSES,
        openapi_extra={"requestBody": IMAGE_REQUEST_BODY},
        summary="Embed one or more images (pooled features before the classifier)",
    )
    async def features(
        request: Request,
        service: ServiceDep,
        normalize: Annotated[bool, Query(description="L2-normalise each embedding.")] = False,
    ) -> Any:
        names, outputs = await run_inference(request, service)
        results = [
            FeaturesResult(filename=name, embedding=embedding(pooled, normalize=normalize).tolist())
            for name, (pooled, _) in zip(names, outputs, strict=True)
        ]
        return FeaturesResponse(
            model=service.name, dim=service.model.num_features, results=results
        )

    return router
