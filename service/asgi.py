"""What both HTTP doors (the native API in ``service.http`` and V2 REST in ``service.v2``) need from
Starlette and FastAPI, below both so neither imports the other:

- the request's access record (opened by the server's middleware) and the disconnect watch;
- the dependencies every route shares: the served models (``ServedModels``: this process's registry, or
  a worker's mirror of the engine process's), the server's settings, and the API key check, declared
  once per router rather than called inside handlers;
- ``ErrorEnvelope``: how a door shapes its error bodies. Each door gives its own (``service.http``:
  ``{"error": {"code", "message", ...}}``; V2: ``{"error": "<message>"}``); the server's error handlers
  and middleware pick the one of the door that owns the path (``app.state.envelopes``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.types import Receive, Scope

from service.core.access import AccessRecord
from service.core.auth import check_api_key
from service.core.errors import NotReady
from service.core.registry import ServedModels
from service.core.settings import ServerSettings


async def wait_for_disconnect(receive: Receive) -> None:
    """Return when the client has hung up (the core then withdraws its images from the queue)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


def disconnect_watcher(request: Request):  # noqa: ANN201 - a coroutine function for ServedModel.serve
    """``cancel_when`` for ``ServedModel.serve``: the request's disconnect."""
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
    """The request's access record, opened by the server's ``RequestContextMiddleware`` (a stand-alone
    one for a route called without it)."""
    record = getattr(request.state, "access", None)
    if record is None:
        record = AccessRecord(request.method, request.url.path)
        request.state.access = record
    return record


# -- the dependencies every route shares ------------------------------------------------------------------------
def loaded_models(request: Request) -> ServedModels | None:
    """The served models, or None while the server is still loading them (the probes answer then)."""
    return getattr(request.app.state, "models", None)


def get_models(request: Request) -> ServedModels:
    """The served models (503 ``not_ready`` before the server has loaded them)."""
    models = loaded_models(request)
    if models is None:
        raise NotReady("model is not loaded yet")
    return models


def get_server_settings(request: Request) -> ServerSettings:
    return request.app.state.server


_bearer = HTTPBearer(auto_error=False, description="Required only when EFFNET_API_KEY is set.")


def require_api_key(
    settings: Annotated[ServerSettings, Depends(get_server_settings)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """The API key (``Authorization: Bearer``), when one is set: a router's dependency, so a door declares
    it once for the routes that need it."""
    check_api_key(settings, credentials.credentials if credentials is not None else None)


ModelsDep = Annotated[ServedModels, Depends(get_models)]
ServerSettingsDep = Annotated[ServerSettings, Depends(get_server_settings)]


# -- error bodies ---------------------------------------------------------------------------------------------
ErrorRender = Callable[..., dict[str, Any]]
"""``render(code, message, request_id, **extra) -> body``: a door's error body for one error."""


@dataclass(frozen=True)
class ErrorEnvelope:
    """A door's error body for the paths under ``prefix`` ("": every path no other door claims)."""

    prefix: str
    render: ErrorRender

    def owns(self, path: str) -> bool:
        return not self.prefix or path == self.prefix or path.startswith(self.prefix + "/")


def envelope_for(envelopes: Sequence[ErrorEnvelope], path: str) -> ErrorEnvelope:
    """The envelope of the door that owns ``path``: the longest prefix that matches."""
    owners = [e for e in envelopes if e.owns(path)]
    return max(owners, key=lambda e: len(e.prefix))


__all__ = [
    "ErrorEnvelope",
    "ModelsDep",
    "ServerSettingsDep",
    "access_record",
    "disconnect_watcher",
    "envelope_for",
    "get_models",
    "header",
    "loaded_models",
    "require_api_key",
    "wait_for_disconnect",
]
