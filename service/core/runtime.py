"""The running service: engine, batcher and decode pool, plus the lifecycle the probes report.

Every front-end (HTTP, V2 REST and gRPC, the batch command) drives this one object through one entry,
``serve``: admission, the image cap, the deadline, cancellation when the caller leaves, decoding, batching
and inference, with errors that say which image failed. Probes read ``state`` (a ``Lifecycle``) or
subscribe to its changes. It knows nothing of any transport.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum

import numpy as np

from service.core import tracing
from service.core.access import AccessRecord
from service.core.batching import DynamicBatcher
from service.core.engines.base import warm_up_on_threads
from service.core.errors import (
    BadRequest,
    InvalidImage,
    NotReady,
    QueueFull,
    RequestTimeout,
    ServiceError,
    ShuttingDown,
    TooManyImages,
)
from service.core.imaging import Preprocessor
from service.core.loading import LoadedModel
from service.core.metrics import Metrics
from service.core.settings import Settings
from service.core.statistics import ModelStatistics, ObserverGroup

log = logging.getLogger("service.core.runtime")


class Lifecycle(str, Enum):
    """The states the probes report, in order. Every front-end follows ``InferenceService.state``.

    ``warming`` (loaded, warm-up passes running; readiness 503) -> ``ready`` -> ``lame_duck`` (SIGTERM
    came: readiness 503 so load balancers take the replica out, but requests are still admitted and
    answered; responses ask clients to close their connections) -> ``draining`` (new requests refused
    with 503 ``shutting_down``, admitted ones still answered) -> ``stopped``. A warm-up that fails moves
    to ``failed``: liveness turns 503 and the server exits non-zero with ``failure``.

    For a front-end: ``ready`` is readiness (``/readyz``, V2 ready, gRPC health "serving"), ``live`` is
    liveness; work is admitted while ``admits_requests``; ``shutting_down`` is true from ``lame_duck`` on.
    """

    STARTING = "starting"
    WARMING = "warming"
    READY = "ready"
    LAME_DUCK = "lame_duck"
    DRAINING = "draining"
    STOPPED = "stopped"
    FAILED = "failed"

    @property
    def shutting_down(self) -> bool:
        """On the way out (lame duck, draining, stopped): readiness 503, connections closed after use."""
        return self in (Lifecycle.LAME_DUCK, Lifecycle.DRAINING, Lifecycle.STOPPED)

    @property
    def admits_requests(self) -> bool:
        """New inference requests are accepted (ready, or lame duck: still served while LBs catch up)."""
        return self in (Lifecycle.READY, Lifecycle.LAME_DUCK)

    @property
    def ready(self) -> bool:
        """Readiness: warmed up and not leaving. Load balancers send traffic only while this is true."""
        return self is Lifecycle.READY

    @property
    def live(self) -> bool:
        """Liveness: false only after a fatal failure (the orchestrator should restart the process)."""
        return self is not Lifecycle.FAILED

    def not_ready_error(self) -> ServiceError:
        """The 503 a readiness probe (or a request refused for the same reason) gets in this state."""
        if self.shutting_down:
            return ShuttingDown("server is shutting down; retry on another instance", headers={"Connection": "close"})
        if self is Lifecycle.FAILED:
            return NotReady("service failed after start-up; see the server log")
        return NotReady(f"model is not ready yet ({self.value})")


@dataclass
class InferenceRequest:
    """One request as every front-end hands it to ``InferenceService.serve``: encoded images (with their
    file names, if any) or already preprocessed pixels, and the caller's own deadline if it has one."""

    images: Sequence[tuple[str | None, bytes]] = ()
    pixels: np.ndarray | None = None
    timeout_s: float | None = None  # the caller's deadline (V2 ``timeout``, gRPC deadline), if shorter

    @property
    def count(self) -> int:
        return len(self.pixels) if self.pixels is not None else len(self.images)


class AdmissionBudget:
    """A bound on the images admitted at once across several models (``EFFNET_MAX_QUEUE_TOTAL``): a
    request takes its images' worth when admitted and gives it back when answered."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.admitted = 0

    @contextmanager
    def take(self, images: int) -> Iterator[None]:
        if self.limit is not None and self.admitted + images > self.limit:
            raise QueueFull(f"server queue full ({self.admitted} of {self.limit} images admitted across all "
                            "models); retry later")
        self.admitted += images
        try:
            yield
        finally:
            self.admitted -= images


Outputs = tuple[np.ndarray, ...]
"""Per image: (pooled features, logits), as the engine returns them."""


class InferenceService:
    """One served model: its engine, dynamic batcher, queue bound, statistics and lifecycle. ``name``: what
    requests call it (default: the variant's name). ``decode_pool``: decode threads shared with other
    models (default: its own). ``statistics``: carried over from the instance it replaces (a reload)."""

    def __init__(
        self,
        settings: Settings,
        model: LoadedModel,
        metrics: Metrics,
        *,
        name: str | None = None,
        decode_pool: ThreadPoolExecutor | None = None,
        statistics: ModelStatistics | None = None,
        budget: AdmissionBudget | None = None,
    ) -> None:
        self.settings = settings = settings.resolved()
        self.model = model
        self.name = name or model.variant.name
        self.budget = budget or AdmissionBudget(None)
        self.metrics = metrics
        self.preprocessor = Preprocessor(model.preprocess, max_pixels=settings.max_image_pixels)
        self._owns_decode_pool = decode_pool is None
        self._decode_pool = decode_pool or ThreadPoolExecutor(
            settings.effective_decode_threads, thread_name_prefix="effnet-decode"
        )
        # One inference thread per batch in flight; an engine that keeps per-slot buffers (pinned memory
        # and a CUDA stream per slot on a GPU) hands the batcher the buffers to stack into.
        slots = settings.effective_max_concurrent_batches
        self._infer_pool = ThreadPoolExecutor(slots, thread_name_prefix="effnet-infer")
        # The statistics extension's numbers (V2 /stats, gRPC ModelStatistics), beside the metrics.
        self.statistics = statistics or ModelStatistics()
        engine = model.engine
        # The span of each batch (while tracing is on). ``padded_batch_size(n)``: the size an engine pads n
        # images to (CUDA graph buckets), if it pads.
        batch_spans = tracing.BatchSpans(
            {"effnet.model": self.name, "effnet.engine": engine.backend,
             "effnet.device": str(engine.device), "effnet.dtype": str(engine.dtype)},
            bucket=engine.padded_batch_size,
        )
        self.batcher = DynamicBatcher(
            model.engine.run,
            max_batch_size=settings.max_batch_size,
            max_delay_s=settings.max_batch_delay_ms / 1000.0,
            max_queue=settings.max_queue,
            executor=self._infer_pool,
            observer=ObserverGroup(metrics.for_model(self.name), self.statistics),
            max_concurrent_batches=slots,
            buffers=model.engine.input_buffers(slots, settings.max_batch_size),
            spans=batch_spans,
        )
        self.state = Lifecycle.STARTING
        self.failure: str | None = None  # why the service failed after start-up (state FAILED)
        self.inflight = 0
        self._drain_deadline: float | None = None  # monotonic; set by the first drain()
        self._state_listeners: list[Callable[[Lifecycle], None]] = []
        self._warmup_task: asyncio.Task[None] | None = None

    # -- lifecycle ----------------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.state.ready

    def add_state_listener(self, listener: Callable[[Lifecycle], None]) -> None:
        """Call ``listener(state)`` (on the event loop) at every lifecycle change, e.g. to mirror readiness
        in a gRPC health service."""
        self._state_listeners.append(listener)

    def remove_state_listener(self, listener: Callable[[Lifecycle], None]) -> None:
        if listener in self._state_listeners:
            self._state_listeners.remove(listener)

    def _set_state(self, state: Lifecycle) -> None:
        self.state = state
        log.info("model '%s' state: %s", self.name, state.value)
        for listener in list(self._state_listeners):
            try:
                listener(state)
            except Exception:  # a front-end's hook must not break the lifecycle
                log.exception("state listener failed")

    def enter_lame_duck(self) -> bool:
        """SIGTERM's first step: readiness 503 while requests are still admitted. True if the service was
        ready (load balancers may still send traffic, so the caller waits before draining); False if it
        never was (warming, failed) or is already leaving, and there is nothing to wait for."""
        if self.state is not Lifecycle.READY:
            return False
        self._set_state(Lifecycle.LAME_DUCK)
        return True

    async def start(self) -> None:
        self.batcher.start()
        if self.settings.warmup:
            self._set_state(Lifecycle.WARMING)
            self._warmup_task = asyncio.get_running_loop().create_task(self._warm_up(), name="effnet-warmup")
        else:
            self._set_state(Lifecycle.READY)

    async def warmed_up(self) -> None:
        """Return once the warm-up (if any) has ended: the state is then ready or failed."""
        if self._warmup_task is not None:
            await asyncio.shield(self._warmup_task)

    async def _warm_up(self) -> None:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            # The first passes at each batch size pay for kernel selection and allocation; do that
            # before the first user does: the engine's per-thread step on every inference thread, then
            # its own warm-up (the torch engine on a GPU: every bucket on every slot, CUDA graph capture).
            await loop.run_in_executor(None, warm_up_on_threads, self.model.engine, self._infer_pool,
                                       self.settings.effective_max_concurrent_batches, self.settings.max_batch_size)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            self.failure = f"warm-up failed: {type(exc).__name__}: {detail}"
            log.error(self.failure)
            self._set_state(Lifecycle.FAILED)
            return
        if self.state is Lifecycle.WARMING:
            log.info("warm-up done in %.2f s", time.perf_counter() - started)
            self._set_state(Lifecycle.READY)

    async def drain(self, timeout: float) -> bool:
        """Stop admitting work and wait (up to ``timeout``) until every admitted request is answered.

        The first call fixes the drain's deadline; later calls (``close()``) wait at most until then.
        """
        if self.state not in (Lifecycle.DRAINING, Lifecycle.STOPPED):
            self._set_state(Lifecycle.DRAINING)
        if self._drain_deadline is None:
            self._drain_deadline = time.monotonic() + timeout
        deadline = min(self._drain_deadline, time.monotonic() + timeout)
        while self.inflight or not self.batcher.idle:
            if time.monotonic() >= deadline:
                log.warning("drain timed out with %d request(s) in flight", self.inflight)
                return False
            await asyncio.sleep(0.01)
        return True

    async def close(self) -> None:
        await self.drain(self.settings.shutdown_drain_s)
        if self._warmup_task is not None and not self._warmup_task.done():
            # The pass running in the inference thread cannot be interrupted; wait for it.
            self._warmup_task.cancel()
            try:
                await self._warmup_task
            except asyncio.CancelledError:
                pass
        await self.batcher.close()
        if self._owns_decode_pool:
            self._decode_pool.shutdown(wait=False, cancel_futures=True)
        await asyncio.to_thread(self._infer_pool.shutdown, wait=True)
        self._set_state(Lifecycle.STOPPED)

    # -- requests -----------------------------------------------------------------------------------------
    @property
    def max_images_per_request(self) -> int:
        """The most images one request may hold: the setting, and never more than the whole queue (a
        request that could never be admitted is a 413, not a 503)."""
        return min(self.settings.max_images_per_request, self.settings.max_queue)

    def check_image_count(self, count: int | None) -> None:
        """``TooManyImages`` for a request of ``count`` images (None: more than the limit, found while
        parsing, which stops at the limit) over the limit."""
        limit = self.max_images_per_request
        if count is None or count > limit:
            held = "more" if count is None else str(count)
            raise TooManyImages(f"too many images in one request ({held}); the limit is {limit}")

    async def serve(
        self,
        read: InferenceRequest | Callable[[], Awaitable[InferenceRequest]],
        *,
        cancel_when: Callable[[], Awaitable[object]] | None = None,
        record: AccessRecord | None = None,
    ) -> list[Outputs]:
        """The one request path of every front-end: admit, read the request (``read``: the request, or a
        coroutine function that reads and parses it, so an upload in progress is admitted and counted by
        the drain), cap its image count, set its deadline (``EFFNET_REQUEST_TIMEOUT_S`` from the end of
        the read, shortened by the request's own), run it, and answer per-image (features, logits) in
        order. ``cancel_when``: a coroutine function that returns when the caller has gone; the request
        is then withdrawn and ``ClientGone`` raised. ``record``: the access record, given the image count.

        Errors are ``ServiceError``s; one about a single image carries its ``image_index``. While tracing
        is on, the record's span gets a child per image (decode + preprocess) and one for the queue wait,
        and the span of each batch that serves it links to it.
        """
        trace = record.trace if record is not None else None
        with self.admit():
            started = time.perf_counter()
            request = await read() if callable(read) else read
            count = request.count
            if record is not None:
                record.images = count
                record.annotate(effnet_model=self.name, effnet_images=count)
            if count < 1:
                raise BadRequest("the request holds no image")
            self.check_image_count(count)
            timeout = self.settings.request_timeout_s
            if request.timeout_s is not None:
                timeout = min(timeout, max(0.0, request.timeout_s))
            deadline = time.monotonic() + timeout
            with self.budget.take(count):
                return await self._run(request, deadline, cancel_when, trace, started)

    async def _run(self, request: InferenceRequest, deadline: float,
                   cancel_when: Callable[[], Awaitable[object]] | None,
                   trace: tracing.RequestTrace | None, started: float) -> list[Outputs]:
        watcher = asyncio.ensure_future(cancel_when()) if cancel_when is not None else None
        ok = False
        try:
            if request.pixels is not None:
                results = await self.infer_arrays(request.pixels, deadline=deadline, cancel_when=watcher,
                                                  trace=trace)
            else:
                results = await self.infer(request.images, deadline=deadline, cancel_when=watcher, trace=trace)
            ok = True
            return results
        finally:
            # A request that reached the model: its outcome in the statistics (parse errors never do).
            self.statistics.request_finished(time.perf_counter() - started, ok)
            if watcher is not None:
                watcher.cancel()

    @contextmanager
    def admit(self) -> Iterator[None]:
        """Admission of one inference request: refused unless ready (or lame duck); counted until answered."""
        if not self.state.admits_requests:
            raise self.state.not_ready_error()
        self.inflight += 1
        try:
            yield
        finally:
            self.inflight -= 1

    async def infer(
        self,
        blobs: Sequence[tuple[str | None, bytes]],
        *,
        deadline: float,
        cancel_when: asyncio.Future[object] | None = None,
        trace: tracing.RequestTrace | None = None,
    ) -> list[tuple[np.ndarray, ...]]:
        """Decode, preprocess and batch the images; per-image (features, logits) in request order.

        ``deadline`` is a ``time.monotonic()`` value covering decoding, queueing and inference. ``trace``:
        the request's span (tracing on), under which each image's decoding gets a span.
        """
        loop = asyncio.get_running_loop()
        with self.batcher.reserve(len(blobs)) as room:
            decodes = [
                loop.run_in_executor(self._decode_pool, _decode, self.preprocessor, i, name, data, trace)
                for i, (name, data) in enumerate(blobs)
            ]
            try:
                arrays = await asyncio.wait_for(
                    asyncio.gather(*decodes), max(0.0, deadline - time.monotonic())
                )
            except asyncio.TimeoutError:
                raise RequestTimeout("request not answered in time (decoding)") from None
            finally:
                for future in decodes:
                    future.cancel()
            return await room.run(arrays, timeout=deadline - time.monotonic(), cancel_when=cancel_when,
                                  trace=trace)

    async def infer_arrays(
        self,
        batch: np.ndarray,
        *,
        deadline: float,
        cancel_when: asyncio.Future[object] | None = None,
        trace: tracing.RequestTrace | None = None,
    ) -> list[tuple[np.ndarray, ...]]:
        """Already preprocessed images (N, 3, S, S) through the same queue bound, batcher and deadline as
        ``infer``, without decoding; per-image (features, logits) in order.

        uint8: the resized, cropped pixels (0..255) that decoding makes; the engine normalises them.
        float32: an already normalised tensor (the user's own preprocessing, any values): the network is
        a float network, so it runs as sent, after the engine's normalisation. NaN or infinity is a
        ``BadRequest``. The batcher never mixes the two kinds in one batch.
        """
        size = self.preprocessor.input_size
        if batch.ndim != 4 or batch.shape[1:] != (3, size, size) or len(batch) == 0:
            raise BadRequest(f"expected a batch of shape [N, 3, {size}, {size}] with N >= 1, got {list(batch.shape)}")
        images = as_engine_input(batch)
        with self.batcher.reserve(len(images)) as room:
            return await room.run(list(images), timeout=deadline - time.monotonic(), cancel_when=cancel_when,
                                  trace=trace)


def as_engine_input(batch: np.ndarray) -> np.ndarray:
    """A preprocessed batch as an engine takes it: uint8 pixels as they are, any float as float32 (already
    normalised); ``BadRequest`` for NaN or infinite values (before and after the cast to float32) or any
    other dtype."""
    if batch.dtype == np.uint8:
        return batch
    if batch.dtype.kind != "f":
        raise BadRequest(f"preprocessed input must be uint8 pixels or float32, not {batch.dtype}")
    with np.errstate(over="ignore"):  # a value beyond float32 becomes inf, refused just below
        floats = batch.astype(np.float32, copy=False)
    if not np.isfinite(floats).all():
        raise BadRequest("input holds NaN or infinite values (or values beyond float32's range)")
    return floats


def _decode(preprocessor: Preprocessor, index: int, name: str | None, data: bytes,
            trace: tracing.RequestTrace | None = None) -> np.ndarray:
    if trace is not None:
        return _traced_decode(preprocessor, index, name, data, trace)
    try:
        return preprocessor(data)
    except ServiceError as exc:
        # Say which image of a multi-image request was refused.
        raise exc.about_image(index, name) from None
    except Exception as exc:  # pragma: no cover - decode_image maps every decoder failure already
        raise InvalidImage(f"cannot decode image ({type(exc).__name__})").about_image(index, name) from exc


def _traced_decode(preprocessor: Preprocessor, index: int, name: str | None, data: bytes,
                   trace: tracing.RequestTrace) -> np.ndarray:
    """``_decode`` inside a span of its own (one per image, in the decode thread)."""
    span = trace.child("decode", {"effnet.image_index": index, "effnet.image_bytes": len(data)})
    try:
        return _decode(preprocessor, index, name, data)
    except ServiceError as exc:
        tracing.end_with_error(span, exc.code, exc.message, fault=exc.server_fault)
        raise
    finally:
        span.end()
