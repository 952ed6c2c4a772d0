"""What happens to a span once it has ended: a bounded queue, a thread that exports it in batches, and
the OTLP protobuf encoding of a batch. Only imported while tracing is on (service/core/tracing.py).

Why not the SDK's ``BatchSpanProcessor`` as it is: with every request sampled, its thread encoded each
batch with the SDK's OTLP encoder (a protobuf message object built per span, attribute and value, and a
JSON dump of the resource per span to group by it), 60-100 us a span, 512 spans at a time, keeping the
GIL for up to the interpreter's 5 ms switch interval at each turn while the event loop and the decode
threads waited for it (issue 32). Here:

- ``SpanQueue`` (the span processor): ``on_end`` appends to a bounded deque and returns; when the queue is
  full the span is dropped and counted (``on_drop``: tracing's ``queue_full``), as are the spans of an export
  that failed (``export_failed``); nothing a request does ever waits for the exporter. Its thread exports
  when ``max_batch`` spans are waiting or every ``delay_s``, as the ``OTEL_BSP_*`` variables say.
- ``encode_spans``: the same ``ExportTraceServiceRequest`` bytes the SDK's encoder makes (a test parses
  both and compares), written directly: a fraction of the CPU. ``OtlpHttpExporter`` sends them with the
  SDK's own HTTP client (endpoint, headers, TLS, compression, retries as ``OTEL_EXPORTER_OTLP_*`` say),
  encoding a batch in slices of ``SLICE`` spans with a short pause between them, so a thread waiting for
  the GIL gets it within a slice instead of the interpreter's 5 ms switch interval.
"""

from __future__ import annotations

import collections
import logging
import os
import struct
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

log = logging.getLogger("service.core.tracing")


THREAD_NAME = "effnet-tracing"  # the export thread, as top -H and /proc/<pid>/task/<tid>/comm show it


def _name_thread(name: str) -> None:
    """Name the calling thread for the OS (Linux; 15 bytes at most), so its CPU can be told apart."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(15, ctypes.c_char_p(name.encode()[:15]))  # PR_SET_NAME
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass


class SpanQueue(SpanProcessor):
    """A batch span processor: a bounded queue and one export thread; full means dropped (and counted),
    never waited for."""

    def __init__(self, exporter: SpanExporter, *, max_queue: int = 2048, max_batch: int = 512,
                 delay_s: float = 5.0, on_drop: Callable[[str, int], None] | None = None) -> None:
        """``on_drop(reason, spans)``: told of every drop (tracing.count_dropped)."""
        self.exporter = exporter
        self.on_drop = on_drop or (lambda reason, spans: None)
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.delay_s = delay_s
        self._queue: collections.deque[ReadableSpan] = collections.deque()
        self._wake = threading.Event()
        self._export_lock = threading.Lock()  # the thread and a flush never export at once
        self._stopping = False
        self._start_thread()
        # A process forked from this one (an embedding application's) starts empty with a thread of its own,
        # as the SDK's processor does.
        reference = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: (queue := reference()) is not None and queue._after_fork())

    def _start_thread(self) -> None:
        self._thread = threading.Thread(target=self._work, name=THREAD_NAME, daemon=True)
        self._thread.start()

    def _after_fork(self) -> None:
        self._queue.clear()
        self._wake = threading.Event()
        self._export_lock = threading.Lock()
        if not self._stopping:
            self._start_thread()

    # -- the request path: as little as can be ----------------------------------------------------------------
    def on_end(self, span: ReadableSpan) -> None:
        if not span.context.trace_flags.sampled:
            return
        if self._stopping:  # after shutdown (the end of a batch command): nothing exports any more
            return
        queue = self._queue
        if len(queue) >= self.max_queue:
            self.on_drop("queue_full", 1)
            return
        queue.append(span)
        if len(queue) >= self.max_batch and not self._wake.is_set():
            self._wake.set()

    # -- the export thread --------------------------------------------------------------------------------------
    def _work(self) -> None:
        _name_thread(THREAD_NAME)
        while not self._stopping:
            self._wake.wait(self.delay_s)
            self._wake.clear()
            self._export_queued(None)

    def _export_queued(self, deadline: float | None) -> bool:
        """Export what is queued, a batch at a time (until ``deadline``, a ``time.monotonic()`` value);
        whether the queue was emptied."""
        with self._export_lock:
            queue = self._queue
            while queue:
                if deadline is not None and time.monotonic() >= deadline:
                    return False
                batch = [queue.popleft() for _ in range(min(self.max_batch, len(queue)))]
                try:
                    ok = self.exporter.export(batch) is SpanExportResult.SUCCESS
                except Exception as exc:  # an exporter's failure is never the service's
                    log.warning("exporting %d spans failed: %s", len(batch), exc)
                    ok = False
                if not ok:
                    self.on_drop("export_failed", len(batch))
            return True

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._export_queued(time.monotonic() + timeout_millis / 1000)

    def shutdown(self) -> None:
        """Export what is queued, then stop (the caller bounds how long: tracing.shutdown)."""
        self._export_queued(None)
        self._stopping = True
        self._wake.set()
        self._thread.join(1.0)
        self.exporter.shutdown()


# -- OTLP protobuf, written directly ------------------------------------------------------------------------------
# Field numbers and wire types of opentelemetry/proto/{collector/trace,trace,common,resource}/v1; a test
# parses what this writes with the generated messages and compares it with the SDK's own encoding.

_SMALL = [bytes((i,)) for i in range(128)]
_FIXED64 = struct.Struct("<Q").pack
_FIXED32 = struct.Struct("<I").pack
_DOUBLE = struct.Struct("<d").pack
_MASK64 = (1 << 64) - 1
_HAS_IS_REMOTE = 0x100  # SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK
_IS_REMOTE = 0x200  # SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK


def _varint(n: int) -> bytes:
    if n < 0x80:
        return _SMALL[n]
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field: its tag, its length, its bytes."""
    n = len(payload)
    return tag + (_SMALL[n] if n < 0x80 else _varint(n)) + payload


def _any_value(value: Any) -> bytes:
    """An ``AnyValue``'s bytes (bool before int: a bool is an int)."""
    if isinstance(value, str):
        return _field(b"\x0a", value.encode())
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, int):
        return b"\x18" + _varint(value & _MASK64)
    if isinstance(value, float):
        return b"\x21" + _DOUBLE(value)
    if isinstance(value, bytes):
        return _field(b"\x3a", value)
    if value is None:
        return b""
    if isinstance(value, Sequence):
        return _field(b"\x2a", b"".join(_field(b"\x0a", _any_value(v)) for v in value))
    if isinstance(value, Mapping):
        return _field(b"\x32", b"".join(_field(b"\x0a", _key_value(str(k), v)) for k, v in value.items()))
    raise TypeError(f"attribute value of type {type(value).__name__}")


def _key_value(key: str, value: Any) -> bytes:
    return (_field(b"\x0a", key.encode()) if key else b"") + _field(b"\x12", _any_value(value))


# Encoded attributes by (tag, key, type, value): most values repeat from span to span (model, engine, route,
# method, status); the cache is emptied when it grows past its bound (request ids never repeat).
_kv_cache: dict[tuple[bytes, str, type, Any], bytes] = {}
_KV_CACHE_MAX = 4096
_CACHED_TYPES = frozenset((str, int, bool, float))


def _attributes(tag: bytes, attributes: Mapping[str, Any] | None) -> bytes:
    if not attributes:
        return b""
    cache = _kv_cache
    parts = []
    for k, v in attributes.items():
        cls = v.__class__
        if cls not in _CACHED_TYPES:
            parts.append(_field(tag, _key_value(k, v)))
            continue
        key = (tag, k, cls, v)
        encoded = cache.get(key)
        if encoded is None:
            if len(cache) >= _KV_CACHE_MAX:
                cache.clear()
            encoded = cache[key] = _field(tag, _key_value(k, v))
        parts.append(encoded)
    return b"".join(parts)


def _flags(context: Any) -> bytes:
    flags = _HAS_IS_REMOTE | (_IS_REMOTE if context is not None and context.is_remote else 0)
    return _FIXED32(flags)


def encode_span(span: ReadableSpan) -> bytes:
    """One ``Span`` message."""
    context = span.context
    parts = [b"\x0a\x10" + context.trace_id.to_bytes(16, "big"), b"\x12\x08" + context.span_id.to_bytes(8, "big")]
    trace_state = context.trace_state
    if trace_state:
        parts.append(_field(b"\x1a", ",".join(f"{k}={v}" for k, v in trace_state.items()).encode()))
    parent = span.parent
    if parent is not None:
        parts.append(b"\x22\x08" + parent.span_id.to_bytes(8, "big"))
    if span.name:
        parts.append(_field(b"\x2a", span.name.encode()))
    parts.append(b"\x30" + _SMALL[span.kind.value + 1])
    parts.append(b"\x39" + _FIXED64(span.start_time or 0))
    parts.append(b"\x41" + _FIXED64(span.end_time or 0))
    parts.append(_attributes(b"\x4a", span.attributes))
    if span.dropped_attributes:
        parts.append(b"\x50" + _varint(span.dropped_attributes))
    for event in span.events:
        body = b"\x09" + _FIXED64(event.timestamp)
        if event.name:
            body += _field(b"\x12", event.name.encode())
        body += _attributes(b"\x1a", event.attributes)
        if event.dropped_attributes:
            body += b"\x20" + _varint(event.dropped_attributes)
        parts.append(_field(b"\x5a", body))
    if span.dropped_events:
        parts.append(b"\x60" + _varint(span.dropped_events))
    for link in span.links:
        linked = link.context
        body = (b"\x0a\x10" + linked.trace_id.to_bytes(16, "big") + b"\x12\x08" + linked.span_id.to_bytes(8, "big")
                + _attributes(b"\x22", link.attributes))
        if link.dropped_attributes:
            body += b"\x28" + _varint(link.dropped_attributes)
        parts.append(_field(b"\x6a", body + b"\x35" + _flags(linked)))
    if span.dropped_links:
        parts.append(b"\x70" + _varint(span.dropped_links))
    status = span.status
    body = b""
    if status.description:
        body += _field(b"\x12", status.description.encode())
    if status.status_code.value:
        body += b"\x18" + _SMALL[status.status_code.value]
    parts.append(_field(b"\x7a", body))
    parts.append(b"\x85\x01" + _flags(parent))
    return b"".join(parts)


class _Cache:
    """The encoded resource and instrumentation scope (the same few objects for every span of a process),
    by identity: ``Resource.__hash__`` dumps its attributes as JSON."""

    def __init__(self) -> None:
        self.entries: dict[int, tuple[object, bytes]] = {}

    def get(self, thing: Any, encode: Any) -> bytes:
        entry = self.entries.get(id(thing))
        if entry is None or entry[0] is not thing:
            if len(self.entries) > 64:
                self.entries.clear()
            entry = self.entries[id(thing)] = (thing, encode(thing))
        return entry[1]


def _resource(resource: Any) -> bytes:
    return _attributes(b"\x0a", resource.attributes) if resource is not None else b""


def _scope(scope: Any) -> bytes:
    if scope is None:
        return b""
    body = _field(b"\x0a", scope.name.encode()) if scope.name else b""
    if scope.version:
        body += _field(b"\x12", scope.version.encode())
    return body + _attributes(b"\x1a", scope.attributes)


_resources = _Cache()
_scopes = _Cache()

SLICE = 64  # spans encoded between two pauses
PAUSE_S = 0.0005  # long enough for a thread waiting for the GIL to be woken and take it


def encode_spans(spans: Sequence[ReadableSpan], *, pause_s: float = 0.0) -> bytes:
    """An ``ExportTraceServiceRequest``'s bytes, spans grouped by resource and instrumentation scope as
    the SDK groups them. ``pause_s``: sleep that long after every ``SLICE`` spans (the export thread)."""
    groups: dict[tuple[int, int], tuple[Any, Any, list[bytes]]] = {}
    for i, span in enumerate(spans):
        if pause_s and i and i % SLICE == 0:
            time.sleep(pause_s)
        resource, scope = span.resource, span.instrumentation_scope
        key = (id(resource), id(scope))
        group = groups.get(key)
        if group is None:
            group = groups[key] = (resource, scope, [])
        group[2].append(_field(b"\x12", encode_span(span)))
    by_resource: dict[int, tuple[Any, list[bytes]]] = {}
    for resource, scope, encoded in groups.values():
        scope_spans = _field(b"\x0a", _scopes.get(scope, _scope)) + b"".join(encoded)
        if scope is not None and scope.schema_url:
            scope_spans += _field(b"\x1a", scope.schema_url.encode())
        by_resource.setdefault(id(resource), (resource, []))[1].append(_field(b"\x12", scope_spans))
    out = []
    for resource, scope_spans in by_resource.values():
        body = _field(b"\x0a", _resources.get(resource, _resource)) + b"".join(scope_spans)
        if resource is not None and resource.schema_url:
            body += _field(b"\x1a", resource.schema_url.encode())
        out.append(_field(b"\x0a", body))
    return b"".join(out)


def otlp_http_exporter() -> SpanExporter:
    """The SDK's OTLP/HTTP span exporter (configured by ``OTEL_EXPORTER_OTLP_*``), sending what
    ``encode_spans`` writes."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    class OtlpHttpExporter(OTLPSpanExporter):
        def __init__(self) -> None:
            super().__init__()
            # The SDK's HTTP client (1.4x): sends bytes with the exporter's retries. An SDK of another shape
            # (pyproject allows >= 1.30) exports with its own encoding.
            client = getattr(self, "_client", None)
            self._send = client.export if client is not None else None
            self._closed = False

        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            if self._send is None or self._closed:
                return super().export(spans)
            try:
                data = encode_spans(spans, pause_s=PAUSE_S)
            except Exception as exc:  # a value this encoder does not know: the SDK's encoder
                log.debug("encoding spans: %s; using the SDK's encoder", exc)
                return super().export(spans)
            return SpanExportResult.SUCCESS if self._send(data).success else SpanExportResult.FAILURE

        def shutdown(self) -> None:
            self._closed = True
            super().shutdown()

    return OtlpHttpExporter()


__all__ = ["SpanQueue", "encode_span", "encode_spans", "otlp_http_exporter"]
