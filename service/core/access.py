"""One access record per request, filled the same way by every door (HTTP, V2 REST, gRPC, the batch command).

A front-end opens an ``AccessRecord`` when a request arrives (method, path, request id, client), the core's
request entry notes the image count, ``fail`` notes a service error (status, code, metric reason, which
image), and ``finish`` writes the request metrics and one JSON access-log line. What the line holds, which
errors are also logged as server faults, and which request ids are accepted from a client are decided
here and nowhere else. What depends on the transport comes from the front-end that opened the record:
``endpoint`` (the metrics label: the route or method it served), the span's name, kind and attributes,
and the attribute its status goes in. The record never looks at a path or a protocol's name.

The record also owns the request's trace span (service/core/tracing.py) while tracing is on: the
front-end hands ``start_trace`` the caller's W3C headers (or gRPC metadata), ``fail`` notes the error on
the span, ``finish`` ends it, and the access-log line and the latency histogram's exemplar carry its
trace id.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from service.core import tracing
from service.core.errors import ServiceError

access_log = logging.getLogger("service.access")
log = logging.getLogger("service.core.access")

# The front-end worker this process is (EFFNET_WORKERS > 1: 0 .. N-1), named in every access-log line; None
# in a server of one process.
worker: int | None = None


def set_worker(number: int | None) -> None:
    global worker
    worker = number


# A client's own request id (X-Request-ID header, x-request-id gRPC metadata) is echoed only when it looks
# like one: bounded length, no spaces or control characters that could forge log lines or headers.
REQUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def request_id(incoming: str | None) -> str:
    """The client's request id when it is acceptable, else a new one."""
    return incoming if incoming and REQUEST_ID_PATTERN.match(incoming) else uuid.uuid4().hex


class RequestObserver(Protocol):
    def observe_request(self, endpoint: str, status: int, duration_s: float, reject_reason: str | None,
                        trace_id: str | None = None) -> None: ...


# The metrics label of a request no route of its front-end served (an unknown path): bounded, whatever
# paths clients send.
UNMATCHED = "other"


@dataclass
class AccessRecord:
    """What the metrics and the access log know about one request."""

    method: str  # as the access log shows it: the HTTP method, or the front-end's name
    path: str  # the URL path, the gRPC method's full name, or the batch command's file
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    client: str | None = None
    endpoint: str = UNMATCHED  # the metrics label, set by the front-end (its route's template, its method)
    status_attribute: str = "effnet.status_code"  # the span attribute the status goes in (front-end's choice)
    status: int = 200
    reject_reason: str | None = None
    error_code: str | None = None
    images: int | None = None
    image_index: int | None = None
    started: float = field(default_factory=time.perf_counter)
    finished: bool = False
    trace: tracing.RequestTrace | None = None  # the request's span, while tracing is on
    error_message: str | None = field(default=None, repr=False)
    server_fault: bool = False

    def start_trace(self, name: str, kind: str, attributes: Mapping[str, Any], *,
                    carrier: Mapping[str, str] | None = None, parent: Any = None) -> None:
        """Open the request's span (nothing while tracing is off): ``name``, ``kind`` ("server",
        "internal") and the transport's ``attributes`` come from the front-end; joined to the caller's
        trace from ``carrier`` (W3C ``traceparent``/``tracestate``, lower-case keys), or under ``parent``
        (a span of this process: the batch command's run)."""
        if tracing.tracer() is None:
            return
        every: dict[str, Any] = {"effnet.request_id": self.request_id, **attributes}
        if self.client:
            every["client.address"] = self.client
        wall_started = time.time_ns() - int((time.perf_counter() - self.started) * 1e9)
        self.trace = tracing.start_request(name, kind, every, carrier, parent, start_time_ns=wall_started)

    def rename(self, name: str, **attributes: Any) -> None:
        """Name the span once the front-end knows what it served (an HTTP route is known after routing)."""
        if self.trace is not None:
            self.trace.span.update_name(name)
            for key, value in attributes.items():
                self.trace.span.set_attribute(key, value)

    @property
    def trace_id(self) -> str | None:
        """The request's trace id (32 hex digits) while tracing is on."""
        return self.trace.trace_id if self.trace is not None else None

    def annotate(self, **attributes: Any) -> None:
        """Set attributes on the request's span (``effnet_model="..."`` -> ``effnet.model``); nothing when
        tracing is off."""
        if self.trace is not None:
            for key, value in attributes.items():
                if value is not None:
                    self.trace.span.set_attribute(key.replace("_", ".", 1), value)

    def fail(self, exc: ServiceError) -> None:
        """Note a service error as this request's outcome; a server fault is also logged as an error."""
        self.status = exc.status_code
        self.error_code = exc.code
        self.reject_reason = exc.reject_reason
        self.image_index = exc.image_index
        self.error_message = exc.message
        self.server_fault = exc.server_fault
        if exc.server_fault:
            log.error("%s: %s", exc.code, exc.message, extra={"request_id": self.request_id})

    def fields(self, duration_s: float) -> dict[str, Any]:
        """The access-log line's fields (None values are left out of the JSON line)."""
        return {
            "request_id": self.request_id,
            "method": self.method,
            "path": self.path,
            "status": self.status,
            "duration_s": round(duration_s, 6),
            "client": self.client,
            "reject_reason": self.reject_reason,
            "error_code": self.error_code,
            "images": self.images,
            "image_index": self.image_index,
            "trace_id": self.trace_id,
            "worker": worker,
        }

    def finish(self, metrics: RequestObserver | None, status: int | None = None) -> None:
        """Record the request once: metrics (when given) and the access-log line."""
        if self.finished:
            return
        self.finished = True
        if status is not None:
            self.status = status
        duration = time.perf_counter() - self.started
        trace = self.trace
        if metrics is not None:
            sampled = trace.trace_id if trace is not None and trace.sampled else None
            metrics.observe_request(self.endpoint, self.status, duration, self.reject_reason, sampled)
        access_log.info("request", extra=self.fields(duration))
        if trace is not None:
            self._end_span(trace)

    def _end_span(self, trace: tracing.RequestTrace) -> None:
        span = trace.span
        span.set_attribute(self.status_attribute, self.status)
        if self.images is not None:
            span.set_attribute("effnet.images", self.images)
        if self.status >= 400 or self.error_code:
            code = self.error_code or f"http_{self.status}"
            if self.image_index is not None:
                span.set_attribute("effnet.image_index", self.image_index)
            tracing.end_with_error(span, code, self.error_message or code,
                                   fault=self.server_fault or self.status >= 500)
        span.end()


__all__ = ["REQUEST_ID_PATTERN", "UNMATCHED", "AccessRecord", "access_log", "request_id"]
