"""OpenTelemetry tracing of requests, configured by the standard ``OTEL_*`` environment variables.

Off unless ``OTEL_TRACES_EXPORTER`` (other than ``none``) or an OTLP endpoint
(``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) is set, and never with
``OTEL_SDK_DISABLED=true``. While off, nothing here imports the SDK (it need not be installed: it is the
optional extra ``tracing``), every hook is a ``None`` check, and no request pays for more.

While on, the SDK does what its variables say: ``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES`` (the
resource; ``service.name`` defaults to ``effnet-serve``), ``OTEL_TRACES_SAMPLER[_ARG]`` (default
``parentbased_always_on``: a caller's sampled-out ``traceparent`` is respected), ``OTEL_EXPORTER_OTLP_*``
(endpoint, headers, timeout; ``OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL`` ``http/protobuf`` (default) or
``grpc``) and ``OTEL_BSP_*`` (queue size, batch size, export interval). Spans are exported in a thread of
their own from a bounded queue (service/core/trace_export.py): an exporter that is down or slow drops
spans, counted by reason (``spans_dropped``: effnet_trace_spans_dropped_total), and never holds up a
request.

What is traced (see docs/architecture.md): one span per request (the access record owns it: HTTP, V2
REST, gRPC, the batch command), and one span per batch, the root of its own trace, *linked* to the span
of every request it served (a batch serves many traces, so no single one is its parent). A batch is
sampled when any request it serves is. The request's stages, the decode + preprocess of each image and
the queue wait, are timed *events* on the request's span (``EFFNET_TRACE_DETAIL=events``, the default:
a span costs several times an event to make and to export) or child spans of it (``spans``). With
several processes (``EFFNET_WORKERS`` > 1) the request's span is the front-end worker's; its queue wait
is timed in the engine process and sent back with the answer, to become an event of that span (or, with
``spans``, a span the engine process exports), and the batch span is the engine process's.
"""

from __future__ import annotations

import logging
import os
import threading
import time
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

# EFFNET_TRACE_DETAIL: a request's stages (decode, queue) as timed events of its span, or as child spans.
DETAILS = ("events", "spans")
# Why spans are dropped (the ``reason`` label of effnet_trace_spans_dropped_total).
DROP_REASONS = ("queue_full", "export_failed")
# The batch span processor's defaults where no OTEL_BSP_* variable says otherwise (the SDK's own).
BSP_DEFAULTS = {"OTEL_BSP_MAX_QUEUE_SIZE": 2048, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": 512,
                "OTEL_BSP_SCHEDULE_DELAY": 5000}

_lock = threading.Lock()
_tracer: Tracer | None = None
_provider: Any = None  # the SDK TracerProvider this module made (None: off, or one handed to install())
_configured = False
_spans = False  # EFFNET_TRACE_DETAIL=spans
_api: Any = None  # the OpenTelemetry API names the request path uses, imported once tracing is on

_drop_lock = threading.Lock()
_dropped = dict.fromkeys(DROP_REASONS, 0)
_reported = dict.fromkeys(DROP_REASONS, 0)


def wanted(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the environment asks for tracing (an exporter or an OTLP endpoint, and the SDK not disabled)."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = [e.strip().lower() for e in env.get("OTEL_TRACES_EXPORTER", "").split(",") if e.strip()]
    if exporters:
        return exporters != ["none"]
    return bool(env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def setup(environ: Mapping[str, str] | None = None, *, detail: str = "events") -> Tracer | None:
    """Configure tracing once per process from the environment; the tracer, or None when tracing is off.
    ``detail``: ``EFFNET_TRACE_DETAIL`` (``events`` or ``spans``, see the module's description).

    ``StartupError`` (one sentence) when the environment asks for tracing that cannot be given: the SDK
    is not installed, or an exporter, protocol or ``OTEL_BSP_*`` value is not one it can use.
    """
    global _configured, _provider, _tracer, _spans
    with _lock:
        if _configured:
            return _tracer
        env = os.environ if environ is None else environ
        if not wanted(env):
            _configured = True
            return None
        provider = _make_provider(env)
        _load_api()
        _provider = provider
        _spans = _check_detail(detail)
        _tracer = provider.get_tracer(INSTRUMENTATION)
        _configured = True
        log.info("tracing on: %s; request stages as %s", ", ".join(sorted(_exporter_names(env))), detail)
        return _tracer


def install(provider: Any, *, detail: str = "events") -> Tracer:
    """Trace with ``provider`` (an SDK ``TracerProvider`` a test or an embedding application built)."""
    global _configured, _provider, _tracer, _spans
    with _lock:
        _load_api()
        _provider = None  # not ours to shut down
        _spans = _check_detail(detail)
        _tracer = provider.get_tracer(INSTRUMENTATION)
        _configured = True
        return _tracer


def reset() -> None:
    """Forget the configuration (tests); the next ``setup()`` reads the environment again."""
    global _configured, _provider, _tracer, _spans
    with _lock:
        _configured, _provider, _tracer, _spans = False, None, None, False


def _check_detail(detail: str) -> bool:
    if detail not in DETAILS:
        raise StartupError(f"EFFNET_TRACE_DETAIL: '{detail}' is not one of {', '.join(DETAILS)}")
    return detail == "spans"


class _Api:
    """The OpenTelemetry API names the request path uses: imported once, not in every call."""

    def __init__(self) -> None:
        from opentelemetry.trace import (
            Link,
            NonRecordingSpan,
            SpanContext,
            SpanKind,
            Status,
            StatusCode,
            TraceFlags,
            set_span_in_context,
        )
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.Link, self.NonRecordingSpan, self.SpanContext = Link, NonRecordingSpan, SpanContext
        self.TraceFlags, self.Status, self.StatusCode = TraceFlags, Status, StatusCode
        self.set_span_in_context = set_span_in_context
        self.propagator = TraceContextTextMapPropagator()
        self.kinds = {"server": SpanKind.SERVER, "internal": SpanKind.INTERNAL, "client": SpanKind.CLIENT}


def _load_api() -> None:
    global _api
    if _api is None:
        _api = _Api()


def count_dropped(reason: str, spans: int) -> None:
    """``spans`` dropped for ``reason`` (one of ``DROP_REASONS``): by the exporter of this process, or, in
    the engine process, reported by a front-end worker (``take_dropped``)."""
    with _drop_lock:
        _dropped[reason] += spans


def spans_dropped() -> dict[str, int]:
    """Spans dropped since this process started, by reason (what effnet_trace_spans_dropped_total shows)."""
    with _drop_lock:
        return dict(_dropped)


def count_reported(dropped: Mapping[str, int]) -> None:
    """Spans a front-end worker reports dropped (``take_dropped`` there), counted with this process's."""
    for reason, spans in dropped.items():
        if reason in DROP_REASONS and int(spans) > 0:
            count_dropped(reason, int(spans))


def take_dropped() -> dict[str, int] | None:
    """Spans dropped since the last call, by reason (None when none): what a front-end worker reports to
    the engine process, whose metrics are the whole server's."""
    with _drop_lock:
        news = {r: _dropped[r] - _reported[r] for r in DROP_REASONS if _dropped[r] > _reported[r]}
        _reported.update(_dropped)
    return news or None


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
        from opentelemetry.sdk.trace.sampling import _get_from_env_or_default

        from service.core.trace_export import SpanQueue
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
    bsp = _bsp_settings(env)
    for name in _exporter_names(env):
        provider.add_span_processor(SpanQueue(_exporter(name, env), max_queue=bsp["OTEL_BSP_MAX_QUEUE_SIZE"],
                                              max_batch=bsp["OTEL_BSP_MAX_EXPORT_BATCH_SIZE"],
                                              delay_s=bsp["OTEL_BSP_SCHEDULE_DELAY"] / 1000,
                                              on_drop=count_dropped))
    return provider


def _bsp_settings(env: Mapping[str, str]) -> dict[str, int]:
    """The batch processor's queue size, batch size and export interval (ms): ``OTEL_BSP_*`` where set,
    else ``BSP_DEFAULTS``. (``OTEL_BSP_EXPORT_TIMEOUT`` is the SDK's to ignore: an export is bounded by
    ``OTEL_EXPORTER_OTLP_TIMEOUT``.)"""
    values = {}
    for name, default in BSP_DEFAULTS.items():
        raw = env.get(name, "").strip()
        try:
            values[name] = int(raw) if raw else default
        except ValueError:
            raise StartupError(f"{name}: '{raw}' is not a whole number") from None
        if values[name] < (0 if name == "OTEL_BSP_SCHEDULE_DELAY" else 1):
            raise StartupError(f"{name}: {values[name]} is out of range")
    if values["OTEL_BSP_MAX_EXPORT_BATCH_SIZE"] > values["OTEL_BSP_MAX_QUEUE_SIZE"]:
        raise StartupError("OTEL_BSP_MAX_EXPORT_BATCH_SIZE must not exceed OTEL_BSP_MAX_QUEUE_SIZE")
    return values


def _exporter(name: str, env: Mapping[str, str]) -> Any:
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if name != "otlp":
        raise StartupError(f"OTEL_TRACES_EXPORTER: unknown exporter '{name}' (otlp, console or none)")
    protocol = (env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or "http/protobuf").strip().lower()
    # Endpoint, headers, timeout, compression: from OTEL_EXPORTER_OTLP_*, as the SDK's exporters read them.
    try:
        if protocol == "http/protobuf":
            from service.core.trace_export import otlp_http_exporter

            return otlp_http_exporter()  # the SDK's, with the spans encoded by trace_export
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            return OTLPSpanExporter()
    except ImportError:
        raise StartupError(
            f"the OTLP exporter for {protocol} is not installed: pip install 'effnet-serve[tracing]'"
        ) from None
    raise StartupError(f"OTEL_EXPORTER_OTLP_PROTOCOL: '{protocol}' is not supported (http/protobuf or grpc)")


class _LinkedSampler:
    """The configured sampler, except that a span linked to a sampled span is sampled too: a batch span
    (a root, linked to the requests it served) is kept exactly when one of its requests is."""

    def __init__(self, inner: Any) -> None:
        from opentelemetry.sdk.trace.sampling import Decision, SamplingResult

        self.inner = inner
        self._sampled = Decision.RECORD_AND_SAMPLE
        self._result = SamplingResult

    def should_sample(self, parent_context: Any, trace_id: int, name: str, kind: Any = None,
                      attributes: Any = None, links: Sequence[Any] | None = None, trace_state: Any = None) -> Any:
        if links and any(link.context.trace_flags.sampled for link in links):
            return self._result(self._sampled, attributes)
        return self.inner.should_sample(parent_context, trace_id, name, kind, attributes, links, trace_state)

    def get_description(self) -> str:
        return f"Linked{{{self.inner.get_description()}}}"


# -- what the request path uses ----------------------------------------------------------------------------------


def extract(carrier: Mapping[str, str] | None) -> Any:
    """The caller's context from W3C ``traceparent`` / ``tracestate`` (lower-case keys), or None."""
    if not carrier or "traceparent" not in carrier:
        return None
    _load_api()
    return _api.propagator.extract(carrier)


class RequestTrace:
    """The span of one request and what the core's stages hang under it (decode, queue) or link to it
    (its batch). Made by ``start_request`` (or ``remote_trace``: a request whose span is another
    process's); only exists while tracing is on."""

    __slots__ = ("tracer", "span", "_context", "span_context", "sampled", "remote", "stages", "_trace_id")

    def __init__(self, tracer: Tracer, span: Span, *, remote: bool = False) -> None:
        self.tracer = tracer
        self.span = span
        self._context: Any = None
        self.span_context: SpanContext = span.get_span_context()
        self.sampled = bool(self.span_context.trace_flags.sampled)
        self.remote = remote
        # Stages timed here for a request whose span is another process's (``remote``), to be sent back
        # with the answer: [name, start ns, end ns, attributes].
        self.stages: list[list[Any]] | None = None
        self._trace_id: str | None = None

    @property
    def context(self) -> Any:
        """The request's span as the parent context of a child span (made when first asked for)."""
        if self._context is None:
            self._context = _api.set_span_in_context(self.span)
        return self._context

    @property
    def trace_id(self) -> str:
        """32 hex digits (the access-log line and the latency exemplar both ask)."""
        if self._trace_id is None:
            self._trace_id = format(self.span_context.trace_id, "032x")
        return self._trace_id

    def traceresponse(self) -> str:
        """The W3C ``traceresponse`` value: this request's trace id and span id, and whether it is sampled."""
        sc = self.span_context
        return f"00-{sc.trace_id:032x}-{sc.span_id:016x}-{int(sc.trace_flags):02x}"

    def child(self, name: str, attributes: Mapping[str, Any] | None = None) -> Span:
        """A span under the request's span (ended by the caller), started now."""
        return self.tracer.start_span(name, context=self.context, attributes=attributes)

    def stage(self, name: str, attributes: dict[str, Any]) -> Stage:
        """One stage of the request (``decode``, ``queue``), started now and ended by the caller: a child
        span or a timed event of the request's span, as ``EFFNET_TRACE_DETAIL`` says."""
        return Stage(self, name, attributes)

    def event(self, name: str, start_ns: int, end_ns: int, attributes: dict[str, Any]) -> None:
        """A stage that ran from ``start_ns`` to ``end_ns``, as an event of the request's span at its start
        with its duration (``effnet.duration_s``); kept to be sent back when the span is another
        process's."""
        attributes["effnet.duration_s"] = (end_ns - start_ns) / 1e9
        if self.remote:
            if self.stages is None:
                self.stages = []
            self.stages.append([name, start_ns, end_ns, attributes])
        elif self.span.is_recording():  # not after the request's end (a stage that outlived a timeout)
            self.span.add_event(name, attributes, timestamp=start_ns)


class Stage:
    """One stage of a request (decode + preprocess of an image, the queue wait): a child span of the
    request's span (detail ``spans``), or an event on it at the stage's start with its duration and, for
    a stage that failed, ``error.type`` (detail ``events``). Nothing for a request not sampled."""

    __slots__ = ("trace", "name", "attributes", "span", "start_ns")

    def __init__(self, trace: RequestTrace, name: str, attributes: dict[str, Any]) -> None:
        self.trace = trace
        self.name = name
        self.attributes = attributes
        self.span: Span | None = None
        self.start_ns = 0
        if not trace.sampled:
            return
        if _spans:
            self.span = trace.child(name, attributes)
        else:
            self.start_ns = time.time_ns()

    def fail(self, code: str, message: str, *, fault: bool) -> None:
        """The stage failed with the service's error ``code``."""
        if self.span is not None:
            end_with_error(self.span, code, message, fault=fault)
        elif self.start_ns:
            self.attributes["error.type"] = code

    def end(self) -> None:
        """The stage is over (again: nothing)."""
        span, self.span = self.span, None
        if span is not None:
            span.end()
        elif self.start_ns:
            start, self.start_ns = self.start_ns, 0
            self.trace.event(self.name, start, time.time_ns(), self.attributes)


def stages_of(trace: RequestTrace | None) -> list[list[Any]] | None:
    """The stages timed in this process for a request whose span is another process's, to send back with
    its answer (``add_stages`` there); None when there are none."""
    return trace.stages if trace is not None else None


def add_stages(trace: RequestTrace | None, stages: Sequence[Sequence[Any]] | None) -> None:
    """Stages another process timed for this request (``stages_of`` there), as events of its span."""
    if trace is None or not stages or not trace.span.is_recording():
        return
    for name, start_ns, _end_ns, attributes in stages:
        trace.span.add_event(str(name), dict(attributes), timestamp=int(start_ns))


def start_request(name: str, kind: str, attributes: Mapping[str, Any], carrier: Mapping[str, str] | None = None,
                  parent: RequestTrace | Any | None = None, start_time_ns: int | None = None) -> RequestTrace | None:
    """The span of one request (None while tracing is off). ``carrier``: the caller's W3C headers or gRPC
    metadata, so the request joins the caller's trace (and its sampling decision); ``parent``: a span of
    this process instead (the batch command's run). ``kind``: "server" or "internal"."""
    tracer = _tracer
    if tracer is None:
        return None
    if parent is not None:
        context = parent.context if isinstance(parent, RequestTrace) else _api.set_span_in_context(parent)
    else:
        context = extract(carrier)
    span = tracer.start_span(
        name,
        context=context,
        kind=_api.kinds["server" if kind == "server" else "internal"],
        attributes=attributes,
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
    it: its stages here (the queue wait) are sent back to become events of the request's span (or, with
    detail ``spans``, become its children here), and the batch span links to it. None while tracing is
    off here, or when the request carried no context."""
    tracer = _tracer
    if tracer is None or not context:
        return None
    trace_id, span_id, flags = context
    span = _api.NonRecordingSpan(_api.SpanContext(int(trace_id, 16), int(span_id, 16), is_remote=True,
                                                  trace_flags=_api.TraceFlags(int(flags))))
    return RequestTrace(tracer, span, remote=True)


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
    span = tracer.start_span(name, context=_api.set_span_in_context(parent), kind=_api.kinds["client"],
                             attributes=dict(attributes))
    headers: dict[str, str] = {}
    _api.propagator.inject(headers, context=_api.set_span_in_context(span))
    return span, headers


def end_with_error(span: Span, code: str, message: str, *, fault: bool) -> None:
    """Note an error on ``span``: ``error.type`` is the service's error code; a server fault also sets the
    span's status to ERROR (a client's mistake does not, as the HTTP conventions say for server spans)."""
    span.set_attribute("error.type", code)
    span.add_event("error", {"effnet.error_code": code, "message": message})
    if fault:
        span.set_status(_api.Status(_api.StatusCode.ERROR, code))


class QueueWait:
    """The queue-wait stage of one request's images: from queueing until its last image is taken into a
    batch (or the request leaves the queue)."""

    __slots__ = ("stage", "pending")

    def __init__(self, trace: RequestTrace, images: int) -> None:
        self.stage: Stage | None = Stage(trace, "queue", {"effnet.images": images})
        self.pending = images

    def taken(self) -> None:
        self.pending -= 1
        if self.pending <= 0:
            self.end()

    def end(self) -> None:
        stage, self.stage = self.stage, None
        if stage is not None:
            stage.end()


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
        link = _api.Link
        seen: set[int] = set()
        links = []
        for trace in traces:
            if trace is None or not trace.sampled or id(trace) in seen:
                continue
            seen.add(id(trace))
            links.append(link(trace.span_context))
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
    "DETAILS",
    "DROP_REASONS",
    "QueueWait",
    "RequestTrace",
    "Stage",
    "TRACE_HEADERS",
    "add_stages",
    "count_dropped",
    "count_reported",
    "end_with_error",
    "extract",
    "flush",
    "install",
    "remote_trace",
    "reset",
    "setup",
    "shutdown",
    "spans_dropped",
    "stages_of",
    "start_client",
    "start_request",
    "start_span",
    "take_dropped",
    "trace_context",
    "tracer",
    "wanted",
]
