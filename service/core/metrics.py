"""Prometheus metrics of one app instance, in a registry of its own (so tests can build several apps).

Naming follows Prometheus conventions: base units (seconds), ``_total`` counters, histograms for
latencies and batch sizes, a gauge for the queue depth and an ``_info`` gauge for the model. No request
ids or other unbounded values appear in labels. With tracing on, the request latency histogram carries
the trace id of sampled requests as an exemplar, which only the OpenMetrics exposition shows (``/metrics``
answers it when the scraper's Accept header asks for ``application/openmetrics-text``).
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily
from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST as OPENMETRICS_CONTENT_TYPE
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.registry import Collector

from service.core import tracing
from service.core.batching import BatchObserver
from service.core.engines.base import batch_buckets

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
REJECT_REASONS = (
    "queue_full",
    "timeout",
    "not_ready",
    "shutting_down",
    "body_too_large",
    "image_too_large",
    "too_many_images",
    "unsupported_media_type",
    "invalid_image",
    "invalid_parameters",
    "bad_request",
    "unauthorized",
    "client_gone",
    "model_not_found",
    "engine_unavailable",
)


def batch_size_buckets(max_batch_size: int) -> tuple[float, ...]:
    """The engines' batch-size buckets (1, 2, 4, ... max_batch_size), so each power of two is visible."""
    return tuple(float(size) for size in batch_buckets(max_batch_size))


class Metrics:
    """All metrics of the service; ``for_model(name)`` is a model's batcher observer."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, max_batch_size: int, *, process_metrics: bool = True) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        if process_metrics:
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
        r = self.registry
        self.requests = Counter(
            "effnet_requests",
            "HTTP requests answered, by endpoint and status code.",
            ["endpoint", "code"],
            registry=r,
        )
        self.request_duration = Histogram(
            "effnet_request_duration_seconds",
            "Time from request arrival to the end of the response.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "effnet_queue_wait_seconds",
            "Time an image waited in the batch queue before its batch ran.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_duration = Histogram(
            "effnet_inference_duration_seconds",
            "Duration of one batched forward pass.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "effnet_batch_size",
            "Images per forward pass (one observation per batch).",
            ["model"],
            buckets=batch_size_buckets(max_batch_size),
            registry=r,
        )
        self.queue_depth = Gauge(
            "effnet_queue_depth",
            "Images admitted (decoding or queued) and not yet in a running batch.",
            ["model"],
            registry=r,
        )
        self.images = Counter(
            "effnet_images",
            "Images run through the model successfully.",
            ["model"],
            registry=r,
        )
        self.rejected = Counter(
            "effnet_rejected",
            "Requests refused or failed before an answer, by reason.",
            ["reason"],
            registry=r,
        )
        self.batch_failures = Counter(
            "effnet_batch_failures",
            "Forward passes that raised (their requests got 500).",
            ["model"],
            registry=r,
        )
        self.model_info = Gauge(
            "effnet_model_info",
            "A served model: always 1, the facts are in the labels (one series per loaded model).",
            ["model", "device", "dtype", "backend"],
            registry=r,
        )
        self.ready = Gauge("effnet_ready", "1 when the service is ready to serve (every model it should serve "
                           "is loaded and warm), else 0.", registry=r)
        self.batches_in_flight = Gauge(
            "effnet_batches_in_flight",
            "Batches running at this moment (stacking, copying or computing), at most "
            "EFFNET_MAX_CONCURRENT_BATCHES.",
            ["model"],
            registry=r,
        )
        r.register(TraceSpansDropped())
        for reason in REJECT_REASONS:
            self.rejected.labels(reason)
        self._info_labels: dict[str, tuple[str, str, str, str]] = {}

    # -- per model -----------------------------------------------------------------------------------------
    def for_model(self, name: str) -> ModelMetrics:
        """The batcher's observer for the model served as ``name``: its series carry ``model="name"``."""
        return ModelMetrics(self, name)

    def set_model(self, name: str, device: str, dtype: str, backend: str) -> None:
        """``effnet_model_info`` for a model now served as ``name`` (replacing what it said before)."""
        self.remove_model(name)
        self._info_labels[name] = (name, device, dtype, backend)
        self.model_info.labels(*self._info_labels[name]).set(1)

    def remove_model(self, name: str) -> None:
        """The model ``name`` is no longer served: its info series goes, its gauges read 0 (its counters and
        histograms stay, so rates over the unload stay right)."""
        labels = self._info_labels.pop(name, None)
        if labels is not None:
            self.model_info.remove(*labels)
        self.queue_depth.labels(name).set(0)
        self.batches_in_flight.labels(name).set(0)

    def observe_request(self, endpoint: str, status: int, duration_s: float, reject_reason: str | None,
                        trace_id: str | None = None) -> None:
        """One answered request. ``endpoint``: its label, chosen by the front-end that served it (the
        route's template, the gRPC method; bounded, never a raw path); ``trace_id``: a sampled request's
        trace, kept as the latency bucket's exemplar."""
        self.requests.labels(endpoint, str(status)).inc()
        exemplar = {"trace_id": trace_id} if trace_id else None
        self.request_duration.labels(endpoint).observe(duration_s, exemplar)
        if reject_reason:
            self.rejected.labels(reject_reason if reject_reason in REJECT_REASONS else "bad_request").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def render_for(self, accept: str | None) -> tuple[bytes, str]:
        """``exposition``, as every process's metrics answer it (a front-end worker's ask the engine)."""
        return self.exposition(accept)

    def exposition(self, accept: str | None) -> tuple[bytes, str]:
        """The metrics and their content type for a scraper's Accept header: OpenMetrics (with exemplars)
        when it asks for ``application/openmetrics-text``, else the Prometheus text format."""
        if accept and "application/openmetrics-text" in accept:
            return generate_openmetrics(self.registry), OPENMETRICS_CONTENT_TYPE
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class TraceSpansDropped(Collector):
    """``effnet_trace_spans_dropped_total``: the trace exporter's drops, read from the tracing module (this
    process's, and the front-end workers' as they report them to the engine process)."""

    def collect(self):  # noqa: ANN201 - prometheus-client's signature
        family = CounterMetricFamily(
            "effnet_trace_spans_dropped",
            "Trace spans not exported, by reason: queue_full (the exporter could not keep up; requests never "
            "wait for it), export_failed (the collector refused them or could not be reached).",
            labels=["reason"],
        )
        for reason, spans in tracing.spans_dropped().items():
            family.add_metric([reason], spans)
        yield family


class ModelMetrics(BatchObserver):
    """One model's share of the metrics: the batcher's observer, writing the series labelled with its name."""

    def __init__(self, metrics: Metrics, name: str) -> None:
        self.name = name
        self._queue_depth = metrics.queue_depth.labels(name)
        self._queue_wait = metrics.queue_wait.labels(name)
        self._batch_size = metrics.batch_size.labels(name)
        self._in_flight = metrics.batches_in_flight.labels(name)
        self._inference = metrics.inference_duration.labels(name)
        self._images = metrics.images.labels(name)
        self._failures = metrics.batch_failures.labels(name)

    def queue_depth_changed(self, images: int) -> None:
        self._queue_depth.set(images)

    def batch_started(self, size: int, queue_waits_s: Sequence[float]) -> None:
        self._batch_size.observe(size)
        for wait in queue_waits_s:
            self._queue_wait.observe(max(0.0, wait))

    def batches_in_flight_changed(self, batches: int) -> None:
        self._in_flight.set(batches)

    def batch_finished(self, size: int, duration_s: float, ok: bool) -> None:
        self._inference.observe(duration_s)
        if ok:
            self._images.inc(size)
        else:
            self._failures.inc()


__all__ = ["Metrics", "ModelMetrics", "REJECT_REASONS", "TraceSpansDropped", "batch_size_buckets"]
