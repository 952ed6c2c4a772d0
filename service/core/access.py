"""One access record per request, filled the same way by every door (HTTP, V2 REST, gRPC, the batch command).

A front-end opens an ``AccessRecord`` when a request arrives (method, path, request id, client), the core's
request entry notes the image count, ``fail`` notes a service error (status, code, metric reason, which
image), and ``finish`` writes the request metrics and one JSON access-log line. What the line holds, which
errors are also logged as server faults, and which request ids are accepted from a client are decided
here and nowhere else.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol

from service.core.errors import ServiceError

access_log = logging.getLogger("service.access")
log = logging.getLogger("service.core.access")

# A client's own request id (X-Request-ID header, x-request-id gRPC metadata) is echoed only when it looks
# like one: bounded length, no spaces or control characters that could forge log lines or headers.
REQUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def request_id(incoming: str | None) -> str:
    """The client's request id when it is acceptable, else a new one."""
    return incoming if incoming and REQUEST_ID_PATTERN.match(incoming) else uuid.uuid4().hex


class RequestObserver(Protocol):
    def observe_request(self, path: str, status: int, duration_s: float, reject_reason: str | None) -> None: ...


@dataclass
class AccessRecord:
    """What the metrics and the access log know about one request."""

    method: str  # the HTTP method, "gRPC" or "CLI"
    path: str  # the URL path, the gRPC method's full name, or the batch command's file
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    client: str | None = None
    status: int = 200
    reject_reason: str | None = None
    error_code: str | None = None
    images: int | None = None
    image_index: int | None = None
    started: float = field(default_factory=time.perf_counter)
    finished: bool = False

    def fail(self, exc: ServiceError) -> None:
        """Note a service error as this request's outcome; a server fault is also logged as an error."""
        self.status = exc.status_code
        self.error_code = exc.code
        self.reject_reason = exc.reject_reason
        self.image_index = exc.image_index
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
        }

    def finish(self, metrics: RequestObserver | None, status: int | None = None) -> None:
        """Record the request once: metrics (when given) and the access-log line."""
        if self.finished:
            return
        self.finished = True
        if status is not None:
            self.status = status
        duration = time.perf_counter() - self.started
        if metrics is not None:
            metrics.observe_request(self.path, self.status, duration, self.reject_reason)
        access_log.info("request", extra=self.fields(duration))


__all__ = ["REQUEST_ID_PATTERN", "AccessRecord", "access_log", "request_id"]
