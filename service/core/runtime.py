"""One served model at work: its engine, dynamic batcher, statistics and lifecycle (``ServedModel``).

Every front-end (HTTP, V2 REST and gRPC, the batch command) drives a served model through one entry,
``serve``: admission, the image cap, the deadline, cancellation when the caller leaves, decoding, batching
and inference, with errors that say which image failed. Probes read ``state`` (service.core.lifecycle) or
subscribe to its changes. It knows nothing of any transport.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass

import numpy as np

from service.core import tracing
from service.core.access import AccessRecord
from service.core.batching import DynamicBatcher, Reservation
from service.core.cam import CamWish, Explained, check_wish, class_maps
from service.core.engines.base import warm_up_on_threads
from service.core.errors import (
    BadRequest,
    ClientGone,
    InvalidImage,
    QueueFull,
    RequestTimeout,
    ServiceError,
    TooManyImages,
)
from service.core.imaging import Crop, Preprocessor
from service.core.lifecycle import Lifecycle, State
from service.core.metrics import Metrics
from service.core.models import LoadedModel
from service.core.settings import ServerSettings
from service.core.statistics import BatchObservers, ModelStatistics, StatisticsSnapshot

log = logging.getLogger("service.core.runtime")

# A transport that cancels a request itself when its deadline passes (gRPC) reaches the core as a plain
# cancellation; the client's own timer fires first by the one-way delay, so a cancellation within this
# long of the request's deadline is its timeout, not a caller that left.
DEADLINE_SLACK_S = 0.05


@dataclass
class InferenceRequest:
    """One request as every front-end hands it to ``ServedModel.serve``: encoded images (with their
    file names, if any) or already preprocessed pixels, the caller's own deadline if it has one, and
    whether it wants class activation maps (``cam``: which classes to explain; each image's answer is then
    an ``Explained``)."""

    images: Sequence[tuple[str | None, bytes]] = ()
    pixels: np.ndarray | None = None
    timeout_s: float | None = None  # the caller's deadline (V2 ``timeout``, gRPC deadline), if shorter
    cam: CamWish | None = None

    @property
    def count(self) -> int:
        return len(self.pixels) if self.pixels is not None else len(self.images)


class QueueBudget:
    """A bound on the images held at once across several models (``EFFNET_MAX_QUEUE_TOTAL``): a request
    takes its images' worth once admitted and gives it back when answered."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.held = 0

    @contextmanager
    def take(self, images: int) -> Iterator[None]:
        if self.limit is not None and self.held + images > self.limit:
            raise QueueFull(f"server queue full ({self.held} of {self.limit} images admitted across all "
                            "models); retry later")
        self.held += images
        try:
            yield
        finally:
            self.held -= images


Outputs = tuple[np.ndarray, ...]
"""Per image: (pooled features, logits), as the engine returns them; an ``Explained`` (a tuple that
begins the same way) for a request that asked for class activation maps."""


class ServedModel:
    """One served model: its engine, dynamic batcher, queue bound, statistics and lifecycle.

    ``model``: the loaded model (its name, engine and resolved settings); ``server``: the server's
    settings (request limits, deadline). ``decode_pool``: decode threads shared with other models
    (default: its own). ``statistics``: carried over from the instance it replaces (a reload).
    ``budget``: the bound on images admitted across every model of the server."""

    def __init__(
        self,
        model: LoadedModel,
        server: ServerSettings,
        metrics: Metrics,
        *,
        decode_pool: ThreadPoolExecutor | None = None,
        statistics: ModelStatistics | None = None,
        budget: QueueBudget | None = None,
    ) -> None:
        self._setup(model, server, decode_pool)
        settings = self.settings
        self.budget = budget or QueueBudget(None)
        self.metrics = metrics
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
            self._run_batch,
            max_batch_size=settings.max_batch_size,
            max_delay_s=settings.max_batch_delay_ms / 1000.0,
            max_queue=settings.max_queue,
            executor=self._infer_pool,
            observer=BatchObservers(metrics.for_model(self.name), self.statistics),
            max_concurrent_batches=slots,
            buffers=model.engine.input_buffers(slots, settings.max_batch_size),
            spans=batch_spans,
        )
        self._warmup_task: asyncio.Task[None] | None = None

    def _run_batch(self, batch: np.ndarray, slot: int, cams: list[CamWish | None] | None = None) -> tuple:
        """The engine's pass over one batch, in an inference thread. With ``cams`` (a batch holding images
        whose requests want maps) the engine also hands over the feature map, and each such image gets its
        class activation maps here, in this process, from the classifier weights the model carries; only
        those k x h x w maps go on, never the feature map."""
        engine = self.model.engine
        if cams is None:
            return engine.run(batch, slot)
        features, logits, feature_map = engine.run(batch, slot, feature_map=True)
        weights = self.model.classifier
        maps = [None if wish is None else class_maps(feature_map[i], weights, wish.classes_for(logits[i]))
                for i, wish in enumerate(cams)]
        return features, logits, maps

    def _setup(self, model: LoadedModel, server: ServerSettings, decode_pool: ThreadPoolExecutor | None) -> None:
        """What every served model has, wherever its engine runs (here, or in the engine process for a
        front-end worker's ``RemoteModel``): its facts, settings, decoding and lifecycle."""
        self.model = model
        self.settings = model.settings
        self.server = server
        self.name = model.name
        self.preprocessor = Preprocessor(model.preprocess, max_pixels=server.max_image_pixels)
        self._owns_decode_pool = decode_pool is None
        self._decode_pool = decode_pool or ThreadPoolExecutor(
            server.decode_threads_for([self.settings]), thread_name_prefix="effnet-decode"
        )
        self.lifecycle = Lifecycle(f"model '{self.name}'")
        self.inflight = 0

    async def statistics_snapshot(self) -> StatisticsSnapshot:
        """The statistics extension's numbers for this model."""
        return self.statistics.snapshot()

    # -- lifecycle ----------------------------------------------------------------------------------------
    @property
    def state(self) -> State:
        return self.lifecycle.state

    @property
    def ready(self) -> bool:
        return self.state.ready

    @property
    def failure(self) -> str | None:
        """Why the model failed after start-up (state ``failed``)."""
        return self.lifecycle.failure

    @property
    def busy(self) -> bool:
        """Requests admitted and not yet answered, or images queued or in a running batch."""
        return bool(self.inflight) or not self.batcher.idle

    async def start(self) -> None:
        self.batcher.start()
        if self.settings.warmup:
            self.lifecycle.set(State.WARMING)
            self._warmup_task = asyncio.get_running_loop().create_task(self._warm_up(), name="effnet-warmup")
        else:
            self.lifecycle.set(State.READY)

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
            failure = f"warm-up failed: {type(exc).__name__}: {detail}"
            log.error(failure)
            self.lifecycle.fail(failure)
            return
        if self.state is State.WARMING:
            log.info("warm-up done in %.2f s", time.perf_counter() - started)
            self.lifecycle.set(State.READY)

    async def drain(self, timeout: float) -> bool:
        """Stop admitting work and wait (up to ``timeout``) until every admitted request is answered."""
        drained = await self.lifecycle.drain(timeout, lambda: self.busy)
        if not drained:
            log.warning("drain of model '%s' timed out with %d request(s) in flight", self.name, self.inflight)
        return drained

    async def close(self) -> None:
        await self.drain(self.server.shutdown_drain_s)
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
        self.lifecycle.set(State.STOPPED)

    # -- requests -----------------------------------------------------------------------------------------
    @property
    def max_images_per_request(self) -> int:
        """The most images one request may hold: the setting, and never more than the whole queue (a
        request that could never be admitted is a 413, not a 503)."""
        return min(self.server.max_images_per_request, self.settings.max_queue)

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
        is on, the record's span gets a stage per image (decode + preprocess) and one for the queue wait
        (timed events, or child spans: ``EFFNET_TRACE_DETAIL``), and the span of each batch that serves it
        links to it.
        """
        trace = record.trace if record is not None else None
        deadline: float | None = None
        try:
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
                if request.cam is not None:
                    self.check_wish(request.cam)
                timeout = self.server.request_timeout_s
                if request.timeout_s is not None:
                    timeout = min(timeout, max(0.0, request.timeout_s))
                deadline = time.monotonic() + timeout
                return await self._run(request, deadline, cancel_when, trace, started)
        except asyncio.CancelledError:
            # The transport cancelled the request (gRPC does, when its caller leaves or its deadline
            # passes): its images were withdrawn on the way out; the record says which it was.
            if record is not None:
                late = deadline is not None and time.monotonic() >= deadline - DEADLINE_SLACK_S
                record.fail(RequestTimeout("request not answered in time") if late else ClientGone())
            raise

    async def _run(self, request: InferenceRequest, deadline: float,
                   cancel_when: Callable[[], Awaitable[object]] | None,
                   trace: tracing.RequestTrace | None, started: float) -> list[Outputs]:
        watcher = asyncio.ensure_future(cancel_when()) if cancel_when is not None else None
        ok = False
        try:
            if request.pixels is not None:
                results = await self.infer_arrays(request.pixels, deadline=deadline, cancel_when=watcher,
                                                  trace=trace, cam=request.cam)
            else:
                results = await self.infer(request.images, deadline=deadline, cancel_when=watcher, trace=trace,
                                           cam=request.cam)
            ok = True
            return results
        finally:
            # A request that reached the model: its outcome in the statistics (parse errors never do).
            self.statistics.request_finished(time.perf_counter() - started, ok)
            if watcher is not None:
                watcher.cancel()

    @asynccontextmanager
    async def room(self, images: int) -> AsyncIterator[Reservation]:
        """Room for ``images`` in this model's queue, taken before they are decoded: the server's queue
        budget (across models), then the batcher's own bound; ``QueueFull`` (503) at once otherwise. Given
        back on the way out for what was not queued."""
        with self.budget.take(images), self.batcher.reserve(images) as reservation:
            yield reservation

    @asynccontextmanager
    async def ticket(self, images: int) -> AsyncIterator[Reservation]:
        """Admission and room for ``images`` already decoded elsewhere (a front-end worker process): what
        ``serve`` does before decoding, for the engine process to run them through ``Reservation.run``."""
        with self.admit():
            self.check_image_count(images)
            async with self.room(images) as reservation:
                yield reservation

    def check_wish(self, wish: CamWish) -> None:
        """A request's wish for class activation maps, checked against this model (``cam.check_wish``)."""
        check_wish(self.model, wish)

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
        cam: CamWish | None = None,
    ) -> list[tuple[np.ndarray, ...]]:
        """Decode, preprocess and batch the images; per-image (features, logits) in request order.

        ``deadline`` is a ``time.monotonic()`` value covering decoding, queueing and inference. ``trace``:
        the request's span (tracing on), which times each image's decoding as a stage. ``cam``: the
        classes to explain; each answer is then an ``Explained`` with the crop each image's grid covers.
        """
        loop = asyncio.get_running_loop()
        async with self.room(len(blobs)) as room:
            decodes = [
                loop.run_in_executor(self._decode_pool, _decode, self.preprocessor, i, name, data, trace,
                                     cam is not None)
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
            if cam is None:
                return await room.run(arrays, timeout=deadline - time.monotonic(), cancel_when=cancel_when,
                                      trace=trace)
            crops = [crop for _, crop in arrays]
            results = await room.run([pixels for pixels, _ in arrays], timeout=deadline - time.monotonic(),
                                     cancel_when=cancel_when, trace=trace, cam=cam)
            return _explained(results, cam, crops)

    async def infer_arrays(
        self,
        batch: np.ndarray,
        *,
        deadline: float,
        cancel_when: asyncio.Future[object] | None = None,
        trace: tracing.RequestTrace | None = None,
        cam: CamWish | None = None,
    ) -> list[tuple[np.ndarray, ...]]:
        """Already preprocessed images (N, 3, S, S) through the same queue bound, batcher and deadline as
        ``infer``, without decoding; per-image (features, logits) in order (``Explained`` with ``cam``,
        without a crop: the pixels came from the caller).

        uint8: the resized, cropped pixels (0..255) that decoding makes; the engine normalises them.
        float32: an already normalised tensor (the user's own preprocessing, any values): the network is
        a float network, so it runs as sent, after the engine's normalisation. NaN or infinity is a
        ``BadRequest``. The batcher never mixes the two kinds in one batch.
        """
        size = self.preprocessor.input_size
        if batch.ndim != 4 or batch.shape[1:] != (3, size, size) or len(batch) == 0:
            raise BadRequest(f"expected a batch of shape [N, 3, {size}, {size}] with N >= 1, got {list(batch.shape)}")
        images = check_pixels(batch)
        async with self.room(len(images)) as room:
            results = await room.run(list(images), timeout=deadline - time.monotonic(), cancel_when=cancel_when,
                                     trace=trace, **({} if cam is None else {"cam": cam}))
        return results if cam is None else _explained(results, cam, [None] * len(results))


def _explained(results: Sequence[Outputs], cam: CamWish, crops: Sequence[Crop | None]) -> list[Outputs]:
    """Each image's (features, logits, maps) as an ``Explained``: the classes follow from the wish and the
    logits by the rule the engine's process applied (``CamWish.classes_for``)."""
    return [Explained(features, logits, maps, cam.classes_for(logits), crop)
            for (features, logits, maps), crop in zip(results, crops, strict=True)]


def check_pixels(batch: np.ndarray) -> np.ndarray:
    """A request's preprocessed batch as an engine takes it: uint8 pixels as they are, any float as float32 (already
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
            trace: tracing.RequestTrace | None = None, crop: bool = False) -> np.ndarray | tuple[np.ndarray, Crop]:
    """One image's pixels (with ``crop``: and the window of the original they came from)."""
    if trace is not None:
        return _traced_decode(preprocessor, index, name, data, trace, crop)
    try:
        return preprocessor.with_crop(data) if crop else preprocessor(data)
    except ServiceError as exc:
        # Say which image of a multi-image request was refused.
        raise exc.about_image(index, name) from None
    except Exception as exc:  # pragma: no cover - decode_image maps every decoder failure already
        raise InvalidImage(f"cannot decode image ({type(exc).__name__})").about_image(index, name) from exc


def _traced_decode(preprocessor: Preprocessor, index: int, name: str | None, data: bytes,
                   trace: tracing.RequestTrace, crop: bool = False) -> np.ndarray | tuple[np.ndarray, Crop]:
    """``_decode`` as a stage of the request's trace (one per image, in the decode thread): a timed event
    of the request's span, or a span of its own (``EFFNET_TRACE_DETAIL``)."""
    stage = trace.stage("decode", {"effnet.image_index": index, "effnet.image_bytes": len(data)})
    try:
        return _decode(preprocessor, index, name, data, crop=crop)
    except ServiceError as exc:
        stage.fail(exc.code, exc.message, fault=exc.server_fault)
        raise
    finally:
        stage.end()
