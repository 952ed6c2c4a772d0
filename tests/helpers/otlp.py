"""A real OTLP/HTTP trace receiver on loopback: what a collector's ``otlphttp`` receiver does with
``POST /v1/traces`` (protobuf, gzip or not), decoded with the ``opentelemetry-proto`` messages.

    with OtlpReceiver() as receiver:            # listening; receiver.endpoint -> OTEL_EXPORTER_OTLP_ENDPOINT
        ...
        spans = receiver.wait_for(lambda spans: len(spans) >= 3)

``delay_s``: answer every export that late (a slow collector). ``decode=False``: only count the spans
(``spans_received``), as cheaply as a receiver can (benchmarks). No pytest here: benchmarks import it too.
"""

from __future__ import annotations

import gzip
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)


@dataclass
class Event:
    """One event of a received span (a request's stage with the default EFFNET_TRACE_DETAIL, an error)."""

    name: str
    time_ns: int
    attributes: dict[str, Any]


@dataclass
class Span:
    """One received span, with ids as hex strings and attributes as plain values."""

    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: int
    attributes: dict[str, Any]
    links: list[tuple[str, str]]  # (trace id, span id)
    status_code: int  # 0 unset, 1 ok, 2 error
    events: list[Event]
    resource: dict[str, Any] = field(default_factory=dict)
    start_ns: int = 0
    end_ns: int = 0


def _value(any_value: Any) -> Any:
    which = any_value.WhichOneof("value")
    return getattr(any_value, which) if which else None


def _attributes(key_values: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in key_values}


class OtlpReceiver:
    def __init__(self, *, delay_s: float = 0.0, decode: bool = True) -> None:
        self.delay_s = delay_s
        self.decode = decode
        self.spans: list[Span] = []
        self.spans_received = 0
        self.exports = 0
        self._changed = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path != "/v1/traces":
                    self.send_error(404)
                    return
                if receiver.delay_s:
                    time.sleep(receiver.delay_s)
                receiver._receive(ExportTraceServiceRequest.FromString(body))
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="otlp-receiver", daemon=True)

    def _receive(self, request: ExportTraceServiceRequest) -> None:
        if not self.decode:
            count = sum(len(scope.spans) for rs in request.resource_spans for scope in rs.scope_spans)
            with self._changed:
                self.spans_received += count
                self.exports += 1
            return
        received = []
        for resource_spans in request.resource_spans:
            resource = _attributes(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                for s in scope_spans.spans:
                    received.append(Span(
                        name=s.name,
                        trace_id=s.trace_id.hex(),
                        span_id=s.span_id.hex(),
                        parent_span_id=s.parent_span_id.hex(),
                        kind=s.kind,
                        attributes=_attributes(s.attributes),
                        links=[(link.trace_id.hex(), link.span_id.hex()) for link in s.links],
                        status_code=s.status.code,
                        events=[Event(e.name, e.time_unix_nano, _attributes(e.attributes)) for e in s.events],
                        resource=resource,
                        start_ns=s.start_time_unix_nano,
                        end_ns=s.end_time_unix_nano,
                    ))
        with self._changed:
            self.spans.extend(received)
            self.spans_received += len(received)
            self.exports += 1
            self._changed.notify_all()

    def clear(self) -> None:
        """Forget the spans received so far."""
        with self._changed:
            self.spans.clear()

    def start(self) -> OtlpReceiver:
        self._thread.start()
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait_for(self, done: Callable[[list[Span]], bool], timeout: float = 15.0) -> list[Span]:
        """The spans received so far, once ``done(spans)`` holds (TimeoutError with what came otherwise)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not done(list(self.spans)):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"spans received: {[(s.name, s.trace_id) for s in self.spans]}")
                self._changed.wait(remaining)
            return list(self.spans)

    def in_trace(self, trace_id: str) -> list[Span]:
        with self._changed:
            return [s for s in self.spans if s.trace_id == trace_id]


__all__ = ["Event", "OtlpReceiver", "Span"]
