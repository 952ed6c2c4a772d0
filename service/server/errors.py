"""The server's error handlers: every failure of every HTTP route becomes an error body in the shape of
the door that owns the path (``service.asgi.ErrorEnvelope``: the native API's, or V2's under ``/v2``).

A ``ServiceError`` raised anywhere below (a handler, a dependency such as the API key check, the core)
is rendered here and noted in the request's access record; so are Starlette's HTTP errors (404, 405),
request validation errors (422, with ``details``) and anything unforeseen (500, logged with its stack
trace, never sent).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.asgi import access_record, envelope_for
from service.core.errors import InvalidParameter, ServiceError

log = logging.getLogger("service.server.errors")

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
    envelope = envelope_for(request.app.state.envelopes, request.url.path)
    return JSONResponse(envelope.render(code, message, request_id_of(request), **extra), status, headers=headers)


async def _service_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    access_record(request).fail(exc)
    extra: dict[str, Any] = {}
    if exc.image_index is not None:
        # An error about one image of the request says which, for programs, beside the message for people.
        extra = {"image_index": exc.image_index, "reason": exc.detail}
    elif isinstance(exc, InvalidParameter):
        # The same details a parameter FastAPI's own validation refused would carry.
        extra = {"details": [{"loc": ["query", exc.parameter], "msg": exc.message, "type": "value_error"}]}
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
