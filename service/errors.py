"""The service's declared errors and the handlers that turn every failure into one JSON shape.

Every error response is ``{"error": {"code": str, "message": str, "request_id": str | null}}`` (422s add
``details``). Stack traces go to the log, never to the client.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("service.errors")


class ServiceError(Exception):
    """An error with its HTTP status, a stable machine-readable code and a message for the client."""

    status_code = 500
    code = "internal_error"
    # Value of effnet_rejected_total{reason}; None for errors that are not rejections.
    reject_reason: str | None = None
    retry_after: int | None = None

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = dict(headers or {})
        if self.retry_after is not None:
            self.headers.setdefault("Retry-After", str(self.retry_after))


class InvalidImage(ServiceError):
    """Content that is empty, not a supported image format, or cannot be decoded."""

    status_code = 400
    code = "invalid_image"
    reject_reason = "invalid_image"


class BadRequest(ServiceError):
    status_code = 400
    code = "bad_request"
    reject_reason = "bad_request"


class Unauthorized(ServiceError):
    status_code = 401
    code = "unauthorized"
    reject_reason = "unauthorized"

    def __init__(self, message: str = "missing or invalid API key") -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class BodyTooLarge(ServiceError):
    status_code = 413
    code = "body_too_large"
    reject_reason = "body_too_large"


class ImageTooLarge(ServiceError):
    status_code = 413
    code = "image_too_large"
    reject_reason = "image_too_large"


class TooManyImages(ServiceError):
    status_code = 413
    code = "too_many_images"
    reject_reason = "too_many_images"


class UnsupportedMediaType(ServiceError):
    status_code = 415
    code = "unsupported_media_type"
    reject_reason = "unsupported_media_type"


class QueueFull(ServiceError):
    status_code = 503
    code = "overloaded"
    reject_reason = "queue_full"
    retry_after = 1


class NotReady(ServiceError):
    status_code = 503
    code = "not_ready"
    reject_reason = "not_ready"
    retry_after = 5


class ShuttingDown(ServiceError):
    status_code = 503
    code = "shutting_down"
    reject_reason = "shutting_down"
    retry_after = 1


class ServiceUnavailable(ServiceError):
    status_code = 503
    code = "unavailable"


class RequestTimeout(ServiceError):
    status_code = 504
    code = "timeout"
    reject_reason = "timeout"


class InferenceFailed(ServiceError):
    status_code = 500
    code = "inference_failed"


class StartupError(RuntimeError):
    """A start that cannot succeed: unknown model, bad weights, missing device, bad labels file."""


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "body_too_large",
    415: "unsupported_media_type",
    422: "invalid_parameters",
    429: "too_many_requests",
    500: "internal_error",
    503: "unavailable",
}


def request_id_of(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


def error_body(code: str, message: str, request_id: str | None, **extra: Any) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "request_id": request_id, **extra}}


def error_response(
    request: Request,
    status: int,
    code: str,
    message: str,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    # Remember the reason for the metrics middleware (it only sees the status code otherwise).
    request.state.error_code = code
    return JSONResponse(error_body(code, message, request_id_of(request), **extra), status, headers=headers)


async def _service_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    if exc.reject_reason is not None:
        request.state.reject_reason = exc.reject_reason
    if exc.status_code >= 500 and not isinstance(
        exc, (QueueFull, NotReady, ShuttingDown, ServiceUnavailable)
    ):
        log.error("%s: %s", exc.code, exc.message, extra={"request_id": request_id_of(request)})
    return error_response(request, exc.status_code, exc.code, exc.message, exc.headers)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    return error_response(request, exc.status_code, code, message, dict(exc.headers or {}))


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return str(value)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    details = [
        {
            "loc": _jsonable(list(e.get("loc", ()))),
            "msg": str(e.get("msg", "")),
            "type": str(e.get("type", "")),
        }
        for e in exc.errors()
    ]
    request.state.reject_reason = "invalid_parameters"
    message = (
        "; ".join(f"{'.'.join(str(p) for p in d['loc'])}: {d['msg']}" for d in details) or "invalid request"
    )
    return error_response(request, 422, "invalid_parameters", message, details=details)


async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error", exc_info=exc, extra={"request_id": request_id_of(request)})
    return error_response(request, 500, "internal_error", "internal server error")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unhandled)
