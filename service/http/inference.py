"""The inference endpoints: /predict (top-k classes), /features (pooled embeddings) and /explain (class
activation maps: where in the photo each class was seen).

A handler only reads the upload, hands the images to the core and formats the answer; decoding,
batching and inference happen in ``service.core``.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from pydantic import StringConstraints

from service.asgi import access_record, disconnect_watcher, require_api_key
from service.core.cam import MAX_CLASS_NAME, CamWish, overlay_png, parse_classes
from service.core.errors import BadRequest
from service.core.outputs import check_top_k, embedding, softmax, top_classes
from service.core.runtime import InferenceRequest, Outputs, ServedModel
from service.http.deps import ModelDep
from service.http.schemas import (
    ClassMap,
    ClassScore,
    CropBox,
    ErrorResponse,
    ExplainResponse,
    ExplainResult,
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


async def run_inference(request: Request, model: ServedModel, cam: CamWish | None = None,
                        one_image: str | None = None) -> tuple[list[tuple[str | None, bytes]], list[Outputs]]:
    """The upload through the core's request entry; (uploaded (file name, bytes), per-image outputs) in
    order. ``cam``: the classes to explain (``Explained`` outputs). ``one_image``: why a request of several
    images is refused (400)."""
    blobs: list[tuple[str | None, bytes]] = []

    async def read() -> InferenceRequest:
        blobs.extend(await read_images(request, model))
        if one_image and len(blobs) > 1:
            raise BadRequest(f"{one_image}; this request holds {len(blobs)}")
        return InferenceRequest(images=blobs, cam=cam)

    outputs = await model.serve(read, cancel_when=disconnect_watcher(request), record=access_record(request))
    return blobs, outputs


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
        blobs, outputs = await run_inference(request, model)
        labels = model.model.labels
        results = []
        for (name, _), (_, raw) in zip(blobs, outputs, strict=True):
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
        blobs, outputs = await run_inference(request, model)
        results = [
            FeaturesResult(filename=name, embedding=embedding(pooled, normalize=normalize).tolist())
            for (name, _), (pooled, _) in zip(blobs, outputs, strict=True)
        ]
        return FeaturesResponse(model=model.name, dim=model.model.num_features, results=results)

    @router.post(
        "/explain",
        response_model=ExplainResponse,
        responses={**ERROR_RESPONSES,
                   200: {"content": {"image/png": {}},
                         "description": "JSON, or with format=png the heat map drawn over the photo."}},
        openapi_extra={"requestBody": IMAGE_REQUEST_BODY},
        summary="Why: a class activation map per explained class, on the part of the photo the model saw",
    )
    async def explain(
        request: Request,
        model: ModelDep,
        top_k: Annotated[int, Query(ge=1, description="Classes to return per image (at most the model's).")] = 5,
        classes: Annotated[list[Annotated[str, StringConstraints(max_length=MAX_CLASS_NAME)]] | None, Query(
            alias="class", description="A class to explain, by index or label (repeatable; default: the top_k "
                                       "classes). At most 10.", max_length=64)] = None,
        format: Annotated[Literal["json", "png"], Query(  # noqa: A002 - the query parameter's name
            description="png: one image, answered as its photo with the map of the first class named (else "
                        "the top-1) drawn over it.")] = "json",
    ) -> Any:
        check_top_k(model.model, top_k)
        chosen = parse_classes(model.model, classes) if classes else ()
        png = format == "png"
        if png:
            wish = CamWish(classes=chosen[:1]) if chosen else CamWish(top=1)
        else:
            wish = CamWish(classes=chosen) if chosen else CamWish(top=top_k)
        blobs, outputs = await run_inference(
            request, model, cam=wish, one_image="format=png draws one image" if png else None)
        labels = model.model.labels
        if png:
            (_, data), explained = blobs[0], outputs[0]
            image = await asyncio.to_thread(overlay_png, data, explained.maps[0], explained.crop,
                                            max_pixels=model.server.max_image_pixels)
            return Response(image, media_type="image/png",
                            headers={"X-Class-Index": str(explained.classes[0])})
        results = []
        for (name, _), explained in zip(blobs, outputs, strict=True):
            probabilities = softmax(explained.logits)
            scores = [ClassScore(index=c.index, label=c.label, score=c.score)
                      for c in top_classes(explained.logits, labels, top_k)]
            maps = [ClassMap(index=c, label=labels[c], score=float(probabilities[c]),
                             map=grid.astype(np.float64).round(4).tolist())
                    for c, grid in zip(explained.classes, explained.maps, strict=True)]
            results.append(ExplainResult(filename=name, top_k=scores, crop=CropBox(**explained.crop.as_dict()),
                                         maps=maps))
        return ExplainResponse(model=model.name, grid=list(model.model.feature_grid), results=results)

    return router
