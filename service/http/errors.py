"""Error responses of the HTTP front-end: every failure becomes one JSON shape.

Every error response is ``{"error": {"code": str, "message": str, "request_id": str | null}}`` (422s add
``details``; an error about one image of the request adds ``image_index``, 0-based, and ``reason``, the
message without its "image N: " prefix). Stack traces go to the log, never to the client.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.core.errors import ServiceError
from service.http.asgi import access_record

log = logging.getLogger("service.http.errors")

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


def is_v2_path(path: str) -> bool:
    """Under the Open Inference Protocol's ``/v2``, whose errors are ``{"error": "<message>"}``."""
    return path == "/v2" or path.startswith("/v2/")


def error_response(
    request: Request,
    status: int,
    code: str,
    message: str,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    record = access_record(request)
    record.status, record.error_code = status, code
    if is_v2_path(request.url.path):
        # Any error under /v2 (an unknown route, 405, 415, a validation error, a fault) in the protocol's
        # shape: its clients read "error" as a string.
        return JSONResponse({"error": message}, status, headers=headers)
    return JSONResponse(error_body(code, message, request_id_of(request), **extra), status, headers=headers)


async def _service_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    access_record(request).fail(exc)
    # An error about one image of the request says which, for programs, beside the message for people.
    extra = {} if exc.image_index is None else {"image_index": exc.image_index, "reason": exc.detail}
    return error_response(request, exc.status_code, exc.code, exc.message, exc.headers, **extra)


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
    access_record(request).reject_reason = "invalid_parameters"
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
