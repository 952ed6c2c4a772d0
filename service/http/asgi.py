"""ASGI details shared by the routes on the HTTP server (``/predict``, ``/features`` and V2 REST)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.types import Receive, Scope

from service.core.access import AccessRecord


async def wait_for_disconnect(receive: Receive) -> None:
    """Return when the client has hung up (the core then withdraws its images from the queue)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


def disconnect_watcher(request: Request):  # noqa: ANN201 - a coroutine function for InferenceService.serve
    """``cancel_when`` for ``InferenceService.serve``: the request's disconnect."""
    return lambda: wait_for_disconnect(request.receive)


def header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            try:
                return value.decode("latin-1")
            except Exception:  # pragma: no cover
                return None
    return None


def access_record(request: Request) -> AccessRecord:
    """The request's access record, opened by ``RequestContextMiddleware`` (a stand-alone one for a route
    called without it, as some unit tests do)."""
    record = getattr(request.state, "access", None)
    if record is None:
        record = AccessRecord(request.method, request.url.path)
        request.state.access = record
    return record
