"""Metrics labels for the routes the HTTP server serves, taken from the routes themselves.

A request's ``endpoint`` label is the template of the route that served it (``/v2/models/{model_name}/infer``:
a model name in the path never becomes a label value), a mounted folder as ``/docs/assets/*``, and
``other`` for a path no route serves. Nothing here lists routes: a route a door adds is labelled as itself
the moment it exists.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from fastapi.routing import iter_route_contexts
from starlette.routing import BaseRoute, Match, Mount
from starlette.types import Scope

from service.core.access import UNMATCHED


def served_routes(routes: Sequence[BaseRoute]) -> Iterator[Any]:
    """Every route an app serves, those of its included routers too (FastAPI keeps them behind
    wrappers), each with ``path``, ``methods`` and ``matches``."""
    return iter_route_contexts(routes)


def route_label(route: Any) -> str:
    path = getattr(route, "path", None)
    if not isinstance(path, str):  # pragma: no cover - every Starlette route has a path
        return UNMATCHED
    original = getattr(route, "original_route", route)
    return f"{path}/*" if isinstance(original, Mount) else path


def endpoint_label(scope: Scope, arrived: Scope) -> str:
    """The label of the request in ``scope``: the API route the router chose, else the route that matches
    the path as it ``arrived`` (before routing rewrote it: a mount, a plain route, a request answered
    before routing such as a 413 on its body), else ``other``."""
    route = scope.get("route")
    if route is not None:
        return route_label(route)
    partial = None
    for candidate in served_routes(getattr(scope.get("app"), "routes", ())):
        match, _ = candidate.matches(arrived)
        if match is Match.FULL:
            return route_label(candidate)
        if match is Match.PARTIAL and partial is None:
            partial = candidate
    return route_label(partial) if partial is not None else UNMATCHED
