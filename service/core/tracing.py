"""OpenTelemetry tracing of requests, configured by the standard ``OTEL_*`` environment variables.

Off unless ``OTEL_TRACES_EXPORTER`` (other than ``none``) or an OTLP endpoint
(``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) is set, and never with
``OTEL_SDK_DISABLED=true``. While off, nothing here imports the SDK (it need not be installed: it is the
optional extra ``tracing``), every hook is a ``None`` check, and no request pays for more.

While on, the SDK does what its variables say: ``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES`` (the
resource; ``service.name`` defaults to ``effnet-serve``), ``OTEL_TRACES_SAMPLER[_ARG]`` (default
``parentbased_always_on``: a caller's sampled-out ``traceparent`` is respected), ``OTEL_EXPORTER_OTLP_*``
(endpoint, headers, timeout; ``OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL`` ``http/protobuf`` (default) or
``grpc``) and ``OTEL_BSP_*``. Spans are exported by the SDK's batch processor in a thread of its own, with
a bounded queue: an exporter that is down or slow drops spans, it never holds up a request.

What is traced (see docs/architecture.md): one span per request (the access record owns it: HTTP, V2
REST, gRPC, the batch command), a child span per image for decode + preprocess and one for the queue
wait, and one span per batch, the root of its own trace, *linked* to the span of every request it served
(a batch serves many traces, so no single one is its parent). A batch is sampled when any request it
serves is.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from service.core.errors import StartupError

if TYPE_CHECKING:  # the API is only imported once tracing is on
    from opentelemetry.trace import Span, SpanContext, Tracer

log = logging.getLogger("service.core.tracing")

DEFAULT_SERVICE_NAME = "effnet-serve"
INSTRUMENTATION = "effnet-serve"
# The W3C Trace Context headers (HTTP) and metadata keys (gRPC) a caller's trace arrives in.
TRACE_HEADERS = ("traceparent", "tracestate")

_lock = threading.Lock()
_tracer: Tracer | None = None
_provider: Any = None  # the SDK TracerProvider this module made (None: off, or one handed to install())
_configured = False


def wanted(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the environment asks for tracing (an exporter or an OTLP endpoint, and the SDK not disabled)."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = [e.strip().lower() for e in env.get("OTEL_TRACES_EXPORTER", "").split(",") if e.strip()]
    if exporters:
        return exporters != ["none"]
    return bool(env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def setup(environ: Mapping[str, str] | None = None) -> Tracer | None:
    """Configure tracing once per process from the environment; the tracer, or None when tracing is off.

    ``StartupError`` (one sentence) when the environment asks for tracing that cannot be given: the SDK
    is not installed, or an exporter or protocol is unknown.
    """
    global _configured, _provider, _tracer
    with _lock:
        if _configured:
            return _tracer
        env = os.environ if environ is None else environ
        if not wanted(env):
            _configured = True
            return None
        provider = _make_provider(env)
        _provider = provider
        _tracer = provider.get_tracer(INSTRUMENTATION)
        _configured = True
        log.info("tracing on: %s", ", ".join(sorted(_exporter_names(env))))
        return _tracer


def install(provider: Any) -> Tracer:
    """Trace with ``provider`` (an SDK ``TracerProvider`` a test or an embedding application built)."""
    global _configured, _provider, _tracer
    with _lock:
        _provider = None  # not ours to shut down
        _tracer = provider.get_tracer(INSTRUMENTATION)
        _configured = True
        return _tracer


def reset() -> None:
    """Forget the configuration (tests); the next ``setup()`` reads the environment again."""
    global _configured, _provider, _tracer
    with _lock:
        _configured, _provider, _tracer = False, None, None


def tracer() -> Tracer | None:
    """The tracer, or None while tracing is off: the one check every hook makes."""
    return _tracer


def _bounded(action: Any, what: str, timeout_s: float) -> None:
    """Run ``action()`` in a daemon thread for at most ``timeout_s``: the SDK's force_flush exports
    everything queued, retrying an exporter that is down, and ignores its own timeout."""
    done = threading.Event()

    def run() -> None:
        try:
            action()
        except Exception as exc:  # an exporter's failure is never the service's
            log.warning("%s failed: %s", what, exc)
        finally:
            done.set()

    threading.Thread(target=run, name="effnet-trace-flush", daemon=True).start()
    if not done.wait(timeout_s):
        log.warning("%s took over %.1f s (exporter down or slow?): unexported spans are dropped", what, timeout_s)


def flush(timeout_s: float = 5.0) -> None:
    """Export what is queued, waiting at most ``timeout_s`` (the server calls it at the end of its drain)."""
    provider = _provider
    if provider is not None:
        _bounded(lambda: provider.force_flush(int(timeout_s * 1000)), "exporting the last spans", timeout_s)


def shutdown(timeout_s: float = 5.0) -> None:
    """Flush and stop the exporter, waiting at most ``timeout_s`` (the end of a batch command)."""
    global _provider, _tracer
    with _lock:
        provider, _provider, _tracer = _provider, None, None
    if provider is not None:
        _bounded(provider.shutdown, "exporting the last spans", timeout_s)


# -- the SDK, only imported when tracing is on -----------------------------------------------------------------


def _exporter_names(env: Mapping[str, str]) -> list[str]:
    names = [e.strip().lower() for e in env.get("OTEL_TRACES_EXPORTER", "").split(",") if e.strip()]
    return [n for n in names if n != "none"] or ["otlp"]


def _make_provider(env: Mapping[str, str]) -> Any:
    try:
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import _get_from_env_or_default
    except ImportError:
        raise StartupError(
            "tracing is asked for (OTEL_TRACES_EXPORTER / OTEL_EXPORTER_OTLP_ENDPOINT) but the OpenTelemetry "
            "SDK is not installed: pip install 'effnet-serve[tracing]'"
        ) from None
    from service.core.about import service_version

    resource = Resource.create({"service.version": service_version()})
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    try:
        sampler = _get_from_env_or_default()  # OTEL_TRACES_SAMPLER[_ARG], as the SDK reads them
    except Exception as exc:
        raise StartupError(f"OTEL_TRACES_SAMPLER: {exc}") from None
    # shutdown_on_exit=False: the SDK's exit hook would wait for an exporter that is down; shutdown() here
    # bounds that wait.
    provider = TracerProvider(resource=resource, sampler=_LinkedSampler(sampler), shutdown_on_exit=False)
    for name in _exporter_names(env):
        provider.add_span_processor(BatchSpanProcessor(_exporter(name, env)))
    return provider


def _exporter(name: str, env: Mapping[str, str]) -> Any:
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if name != "otlp":
        raise StartupError(f"OTEL_TRACES_EXPORTER: unknown exporter '{name}' (otlp, console or none)")
    protocol = (env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or "http/protobuf").strip().lower()
    try:
        if protocol == "http/protobuf":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        elif protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        else:
            raise StartupError(
                f"OTEL_EXPORTER_OTLP_PROTOCOL: '{protocol}' is not supported (http/protobuf or grpc)"
            )
    except ImportError:
        raise StartupError(
            f"the OTLP exporter for {protocol} is not installed: pip install 'effnet-serve[tracing]'"
        ) from None
    return OTLPSpanExporter()  # endpoint, headers, timeout, compression: from OTEL_EXPORTER_OTLP_*


class _LinkedSampler:
    """The configured sampler, except that a span linked to a sampled span is sampled too: a batch span
    (a root, linked to the requests it served) is kept exactly when one of its requests is."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def should_sample(self, parent_context: Any, trace_id: int, name: str, kind: Any = None,
                      attributes: Any = None, links: Sequence[Any] | None = None, trace_state: Any = None) -> Any:
        from opentelemetry.sdk.trace.sampling import Decision, SamplingResult

        if links and any(link.context.trace_flags.sampled for link in links):
            return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes)
        return self.inner.should_sample(parent_context, trace_id, name, kind, attributes, links, trace_state)

    def get_description(self) -> str:
        return f"Linked{{{self.inner.get_description()}}}"


# -- what the request path uses ----------------------------------------------------------------------------------


def extract(carrier: Mapping[str, str] | None) -> Any:
    """The caller's context from W3C ``traceparent`` / ``tracestate`` (lower-case keys), or None."""
    if not carrier or "traceparent" not in carrier:
        return None
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator().extract(carrier)


class RequestTrace:
    """The span of one request and what the core's stages hang under it (decode, queue) or link to it
    (its batch). Made by ``start_request``; only exists while tracing is on."""

    __slots__ = ("tracer", "span", "context", "span_context")

    def __init__(self, tracer: Tracer, span: Span) -> None:
        from opentelemetry.trace import set_span_in_context

        self.tracer = tracer
        self.span = span
        self.context = set_span_in_context(span)
        self.span_context: SpanContext = span.get_span_context()

    @property
    def sampled(self) -> bool:
        return bool(self.span_context.trace_flags.sampled)

    @property
    def trace_id(self) -> str:
        return format(self.span_context.trace_id, "032x")

    def traceresponse(self) -> str:
        """The W3C ``traceresponse`` value: this request's trace id and span id, and whether it is sampled."""
        sc = self.span_context
        return f"00-{sc.trace_id:032x}-{sc.span_id:016x}-{int(sc.trace_flags):02x}"

    def child(self, name: str, attributes: Mapping[str, Any] | None = None) -> Span:
        """A span under the request's span (ended by the caller), started now."""
        return self.tracer.start_span(name, context=self.context, attributes=attributes)


def start_request(name: str, kind: str, attributes: Mapping[str, Any], carrier: Mapping[str, str] | None = None,
                  parent: RequestTrace | Any | None = None, start_time_ns: int | None = None) -> RequestTrace | None:
    """The span of one request (None while tracing is off). ``carrier``: the caller's W3C headers or gRPC
    metadata, so the request joins the caller's trace (and its sampling decision); ``parent``: a span of
    this process instead (the batch command's run). ``kind``: "server" or "internal"."""
    tracer = _tracer
    if tracer is None:
        return None
    from opentelemetry.trace import SpanKind, set_span_in_context

    if parent is not None:
        context = parent.context if isinstance(parent, RequestTrace) else set_span_in_context(parent)
    else:
        context = extract(carrier)
    span = tracer.start_span(
        name,
        context=context,
        kind=SpanKind.SERVER if kind == "server" else SpanKind.INTERNAL,
        attributes=dict(attributes),
        start_time=start_time_ns,
    )
    return RequestTrace(tracer, span)


def trace_context(trace: RequestTrace | None) -> list[Any] | None:
    """A request's span context as plain data (trace id, span id, flags), to carry it to another process
    of the server (the engine process); None while tracing is off or for no request."""
    if trace is None:
        return None
    sc = trace.span_context
    return [format(sc.trace_id, "032x"), format(sc.span_id, "016x"), int(sc.trace_flags)]


def remote_trace(context: Any) -> RequestTrace | None:
    """A request traced in another process of the server (``trace_context``), as this process's handle on
    it: its stages here (the queue wait) become children of the request's span, and the batch span links
    to it. None while tracing is off here, or when the request carried no context."""
    tracer = _tracer
    if tracer is None or not context:
        return None
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

    trace_id, span_id, flags = context
    span = NonRecordingSpan(SpanContext(int(trace_id, 16), int(span_id, 16), is_remote=True,
                                        trace_flags=TraceFlags(int(flags))))
    return RequestTrace(tracer, span)


def start_span(name: str, attributes: Mapping[str, Any] | None = None) -> Span | None:
    """A root span of this process (the batch command's whole run), or None while tracing is off."""
    tracer = _tracer
    if tracer is None:
        return None
    return tracer.start_span(name, attributes=attributes)


def start_client(name: str, parent: Span | None, attributes: Mapping[str, Any]) -> tuple[Span, dict[str, str]] | None:
    """A client span under ``parent`` and the W3C headers that carry it to the server (the batch command's
    --server mode: the server's spans join the run's trace); None while tracing is off."""
    tracer = _tracer
    if tracer is None or parent is None:
        return None
    from opentelemetry.trace import SpanKind, set_span_in_context
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    span = tracer.start_span(name, context=set_span_in_context(parent), kind=SpanKind.CLIENT,
                             attributes=dict(attributes))
    headers: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(headers, context=set_span_in_context(span))
    return span, headers


def end_with_error(span: Span, code: str, message: str, *, fault: bool) -> None:
    """Note an error on ``span``: ``error.type`` is the service's error code; a server fault also sets the
    span's status to ERROR (a client's mistake does not, as the HTTP conventions say for server spans)."""
    from opentelemetry.trace import Status, StatusCode

    span.set_attribute("error.type", code)
    span.add_event("error", {"effnet.error_code": code, "message": message})
    if fault:
        span.set_status(Status(StatusCode.ERROR, code))


class QueueWait:
    """The queue-wait span of one request's images: from queueing until its last image is taken into a
    batch (or the request leaves the queue)."""

    __slots__ = ("span", "pending")

    def __init__(self, trace: RequestTrace, images: int) -> None:
        self.span: Span | None = trace.child("queue", {"effnet.images": images})
        self.pending = images

    def taken(self) -> None:
        self.pending -= 1
        if self.pending <= 0:
            self.end()

    def end(self) -> None:
        span, self.span = self.span, None
        if span is not None:
            span.end()


class BatchSpans:
    """Makes the span of each batch: batch size, bucket, engine, device, dtype, inference slot; linked to
    the span of every (sampled) request it serves."""

    def __init__(self, attributes: Mapping[str, Any], bucket: Any = None) -> None:
        self.attributes = dict(attributes)
        self.bucket = bucket  # the engine's padded batch size for n images, when it pads

    def start(self, traces: Iterable[RequestTrace | None], size: int, slot: int) -> Span | None:
        tracer = _tracer
        if tracer is None:
            return None
        from opentelemetry.trace import Link

        seen: set[int] = set()
        links = []
        for trace in traces:
            if trace is None or not trace.sampled or id(trace) in seen:
                continue
            seen.add(id(trace))
            links.append(Link(trace.span_context))
        if not links:
            return None
        attributes = {**self.attributes, "effnet.batch.size": size, "effnet.batch.slot": slot,
                      "effnet.batch.requests": len(links)}
        if self.bucket is not None:
            try:
                bucket = self.bucket(size)
            except Exception:  # a hook that cannot say must not fail the batch
                bucket = None
            if bucket is not None:
                attributes["effnet.batch.bucket"] = int(bucket)
        return tracer.start_span("batch", links=links, attributes=attributes)

    @staticmethod
    def end(span: Span, ok: bool, error: BaseException | None = None) -> None:
        if not ok:
            end_with_error(span, "inference_failed", str(error) if error else "batch failed", fault=True)
        span.end()


__all__ = [
    "BatchSpans",
    "QueueWait",
    "RequestTrace",
    "TRACE_HEADERS",
    "end_with_error",
    "extract",
    "flush",
    "install",
    "remote_trace",
    "reset",
    "setup",
    "shutdown",
    "start_client",
    "start_request",
    "start_span",
    "trace_context",
    "tracer",
    "wanted",
]
