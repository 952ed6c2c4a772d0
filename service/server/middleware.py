"""Pure ASGI middleware (no BaseHTTPMiddleware: it would buffer bodies and hide client disconnects).

- ``RequestContextMiddleware`` (outermost): takes or makes the ``X-Request-ID``, echoes it, records the
  request metrics and writes one JSON access-log line per request. With tracing on, the request's span
  joins the caller's W3C trace (``traceparent``/``tracestate``) and the response names it
  (``traceresponse``). An exception that escaped everything
  else becomes a JSON 500 without a stack trace. Once the service is shutting down (lame duck, draining),
  every response carries ``Connection: close``: the client or load balancer opens its next connection
  elsewhere instead of reusing one to a replica that is about to go.
- ``BodyLimitMiddleware``: refuses a body over the limit with 413, from ``Content-Length`` before reading
  anything, and by counting bytes as they arrive otherwise (chunked uploads), so no oversized body is
  ever buffered whole. An error answered before the body was read waits until the (bounded) rest of the
  body has arrived, so the client reliably gets the answer instead of a connection reset.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.asgi import envelope_for
from service.asgi import header as _header
from service.core import tracing
from service.core.access import UNMATCHED, AccessRecord, request_id
from service.core.errors import BodyTooLarge
from service.core.metrics import Metrics
from service.server.routes import endpoint_label

log = logging.getLogger("service.server.middleware")


def _leaving(scope: Scope) -> bool:
    """The service is shutting down (lame duck or later): connections should not be kept alive."""
    app = scope.get("app")
    models = getattr(getattr(app, "state", None), "models", None)
    return models is not None and models.state.shutting_down


async def send_json_error(
    scope: Scope,
    send: Send,
    status: int,
    code: str,
    message: str,
    request_id: str | None,
    headers: dict[str, str] | None = None,
) -> None:
    """An error answered by the middleware itself, in the envelope of the door that owns the path."""
    envelope = envelope_for(scope["app"].state.envelopes, scope.get("path", ""))
    content = envelope.render(code, message, request_id)
    body = json.dumps(content, separators=(",", ":")).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    for key, value in (headers or {}).items():
        raw_headers.append((key.lower().encode("latin-1"), value.encode("latin-1")))
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


class RequestContextMiddleware:
    """``untraced``: paths whose requests get no span (probes and scrapes: a span every few seconds per
    replica says nothing about requests)."""

    def __init__(self, app: ASGIApp, untraced: frozenset[str] = frozenset()) -> None:
        self.app = app
        self.untraced = untraced

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        method, path = scope.get("method", ""), scope.get("path", "")
        # The request as it arrived, for its metrics label (routing rewrites the scope's path info).
        arrived = {"type": "http", "method": method, "path": path, "root_path": scope.get("root_path", "")}
        record = AccessRecord(
            method,
            path,
            request_id(_header(scope, b"x-request-id")),
            client=client[0] if client else None,
            status_attribute="http.response.status_code",
        )
        if tracing.tracer() is not None and path not in self.untraced:
            record.start_trace(method, "server", {"http.request.method": method, "url.path": path},
                               carrier={k: v for k in tracing.TRACE_HEADERS if (v := _header(scope, k.encode()))})
        rid = record.request_id
        state: dict[str, Any] = scope.setdefault("state", {})
        state["request_id"] = rid
        state["access"] = record
        status = 0
        response_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status = message["status"]
                response_started = True
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", rid.encode()))
                if record.trace is not None:
                    headers.append((b"traceresponse", record.trace.traceresponse().encode()))
                if _leaving(scope) and not any(k.lower() == b"connection" for k, _ in headers):
                    headers.append((b"connection", b"close"))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            # Starlette's ServerErrorMiddleware already answered (and re-raised); answer only if not.
            log.error("unhandled error", exc_info=exc, extra={"request_id": rid})
            if not response_started:
                status = 500
                record.error_code = "internal_error"
                try:
                    await send_json_error(scope, send, 500, "internal_error", "internal server error", rid,
                                          {"x-request-id": rid})
                except Exception:  # pragma: no cover - client gone
                    pass
            status = status or 500
        finally:
            record.endpoint = endpoint_label(scope, arrived)
            if record.endpoint != UNMATCHED:
                record.rename(f"{method} {record.endpoint}", **{"http.route": record.endpoint})
            # No response at all: the client left before one could be sent (nginx's 499). The metrics are
            # the app's, made by its lifespan with the models.
            metrics: Metrics | None = getattr(scope["app"].state, "metrics", None)
            record.finish(metrics, status or 499)


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_body_bytes
        declared = _header(scope, b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                size = -1
            if size > limit:
                state = scope.setdefault("state", {})
                error = BodyTooLarge(f"request body of {size} bytes exceeds the limit of {limit}")
                if isinstance(record := state.get("access"), AccessRecord):
                    record.fail(error)
                await send_json_error(scope, send, 413, error.code, error.message, state.get("request_id"),
                                      {"connection": "close"})
                return
        received = 0
        body_done = False

        def count(message: Message) -> None:
            nonlocal received, body_done
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if not message.get("more_body", False):
                    body_done = True
            else:  # http.disconnect
                body_done = True

        async def counting_receive() -> Message:
            message = await receive()
            count(message)
            if received > limit:
                raise BodyTooLarge(
                    f"request body exceeds the limit of {limit} bytes", headers={"Connection": "close"}
                )
            return message

        async def send_after_body(message: Message) -> None:
            # An answer given before the body was read (401, 415, 503, ...): read the rest of the body
            # first (it is bounded by the limit), or closing the socket on unread data would reset the
            # connection and the client could lose the answer.
            if message["type"] == "http.response.start" and not body_done:
                while not body_done and received <= limit:
                    count(await receive())
                if not body_done:
                    headers = [h for h in message.get("headers", []) if h[0].lower() != b"connection"]
                    message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        await self.app(scope, counting_receive, send_after_body)
