"""The inference endpoints: /predict (top-k classes) and /features (pooled embeddings).

A handler only reads the upload, hands the images to the core and formats the answer; decoding,
batching and inference happen in ``service.core``.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request

from service.asgi import access_record, disconnect_watcher, require_api_key
from service.core.outputs import check_top_k, embedding, top_classes
from service.core.runtime import InferenceRequest, Outputs, ServedModel
from service.http.deps import ModelDep
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


async def run_inference(request: Request, model: ServedModel) -> tuple[list[str | None], list[Outputs]]:
    """The upload through the core's request entry; (file names, per-image outputs) in order."""
    names: list[str | None] = []

    async def read() -> InferenceRequest:
        blobs = await read_images(request, model)
        names.extend(name for name, _ in blobs)
        return InferenceRequest(images=blobs)

    outputs = await model.serve(read, cancel_when=disconnect_watcher(request), record=access_record(request))
    return names, outputs


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
        model: ModelDep,
        top_k: Annotated[int, Query(ge=1, description="Classes to return per image (at most the model's).")] = 5,
        logits: Annotated[bool, Query(description="Also return all raw logits.")] = False,
    ) -> Any:
        check_top_k(model.model, top_k)
        names, outputs = await run_inference(request, model)
        labels = model.model.labels
        results = []
        for name, (_, raw) in zip(names, outputs, strict=True):
            scores = [ClassScore(index=c.index, label=c.label, score=c.score) for c in top_classes(raw, labels, top_k)]
            if logits:
                results.append(PredictResult(filename=name, top_k=scores, logits=raw.tolist()))
            else:
                results.append(PredictResult(filename=name, top_k=scores))
        return PredictResponse(model=model.name, results=results)

    @router.post(
        "/features",
        response_model=FeaturesResponse,
        responses=ERROR_RESPONSES,
        openapi_extra={"requestBody": IMAGE_REQUEST_BODY},
        summary="Embed one or more images (pooled features before the classifier)",
    )
    async def features(
        request: Request,
        model: ModelDep,
        normalize: Annotated[bool, Query(description="L2-normalise each embedding.")] = False,
    ) -> Any:
        names, outputs = await run_inference(request, model)
        results = [
            FeaturesResult(filename=name, embedding=embedding(pooled, normalize=normalize).tolist())
            for name, (pooled, _) in zip(names, outputs, strict=True)
        ]
        return FeaturesResponse(model=model.name, dim=model.model.num_features, results=results)

    return router
