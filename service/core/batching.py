"""Dynamic batching: preprocessed images from all concurrent requests share forward passes.

The queue is bounded and counted in images. A request first *reserves* room for all of its images
(before it spends CPU decoding them), so overload is refused at once with ``QueueFull`` rather than
queued forever. Its decoded images then become queue items, each with its own future.

A batch closes when it holds ``max_batch_size`` images, or ``max_batch_delay`` after its oldest image
was queued, or as soon as every admitted image is queued (none is still decoding, so none is about to
join): a lone request never waits out the delay, and under load the queue is already full when the
previous batch ends, so batches close at once. A batch that raises fails only its own items. Items of
a request that timed out or was cancelled (client gone) are removed from the queue, freeing their room,
and their results are dropped if their batch is already running.

Batches in flight: up to ``max_concurrent_batches`` batches run at once, each in an inference *slot* of
its own (a thread of the executor; on a GPU also a CUDA stream and pinned buffers that the engine keeps
per slot). While one batch computes on the device, the next is stacked and copied in. A slot is taken
before a batch is formed, so while every slot is busy the queue keeps growing into a bigger next batch.
With ``buffers`` (one array per slot, shape ``(max_batch_size, *image_shape)``, pinned memory on a GPU)
a batch is stacked into its slot's buffer, never into freshly allocated memory. One slot (the CPU
default) is the plain one-batch-at-a-time batcher.

Tracing (``spans``, while it is on): a request's items carry its trace; its queue-wait span ends when
its last image is taken into a batch, and each batch gets a span of its own linked to every request it
serves. With tracing off the items carry None and nothing more happens.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.core import tracing
from service.core.errors import ClientGone, InferenceFailed, QueueFull, RequestTimeout, ShuttingDown

log = logging.getLogger("service.core.batching")

RunBatch = Callable[..., Sequence[Sequence[Any]]]
"""Takes a stacked NCHW batch (uint8 pixels, or normalised float32 tensors, in the service) and the
inference slot it runs in (0 .. max_concurrent_batches - 1; never two batches at once in one slot);
returns arrays whose first dimension is N (e.g. features, logits). When an item of the batch carries a
wish (``Reservation.run``'s ``cam``), it is also given ``cams=`` (each row's wish, or None) and may return
further per-row outputs; a row's None there is left out of that row's result."""


class BatchObserver:
    """Hooks for metrics; the default does nothing."""

    def queue_depth_changed(self, images: int) -> None:
        pass

    def batch_started(self, size: int, queue_waits_s: Sequence[float]) -> None:
        pass

    def batch_finished(self, size: int, duration_s: float, ok: bool) -> None:
        pass

    def batches_in_flight_changed(self, batches: int) -> None:
        pass

    def batch_timed(self, size: int, input_s: float, infer_s: float, output_s: float) -> None:
        """A batch that succeeded, in its three phases: stacking its images (input), the engine's pass
        (infer) and handing each image its rows (output)."""


@dataclass(eq=False)
class _Item:
    array: np.ndarray
    future: asyncio.Future[tuple[np.ndarray, ...]]
    enqueued_at: float
    queued: bool = True  # still in the batcher's queue (not yet taken into a batch)
    trace: tracing.RequestTrace | None = None  # its request's span (tracing on)
    queue_wait: tracing.QueueWait | None = None
    cam: Any = None  # what its request asks beyond the outputs (a class activation map: a CamWish)


class Reservation:
    """Room for ``size`` images in the batcher's queue, held by one request.

    Use as a context manager so unused room is always given back::

        with batcher.reserve(len(blobs)) as room:
            arrays = await decode(blobs)
            outputs = await room.run(arrays, timeout=deadline - now)
    """

    def __init__(self, batcher: DynamicBatcher, size: int) -> None:
        self._batcher = batcher
        self.size = size
        self._unused = size

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        """Give back room not turned into queue items (idempotent)."""
        if self._unused:
            self._batcher._unreserve(self._unused)
            self._unused = 0

    async def run(
        self,
        arrays: Sequence[np.ndarray],
        *,
        timeout: float | None = None,
        cancel_when: asyncio.Future[object] | None = None,
        trace: tracing.RequestTrace | None = None,
        cam: Any = None,
    ) -> list[tuple[np.ndarray, ...]]:
        """Queue ``arrays`` and wait for their per-item outputs, in order.

        Raises ``RequestTimeout`` after ``timeout`` seconds, ``ClientGone`` when ``cancel_when``
        completes first, ``InferenceFailed`` when a batch holding one of the items failed. In each case
        the request's items still queued are removed. ``trace``: the request's span (tracing on).
        ``cam``: a wish every item carries to the batch function (class activation maps).
        """
        if len(arrays) > self._unused:
            raise ValueError(f"reserved {self._unused} more images, got {len(arrays)}")
        self._unused -= len(arrays)
        queue_wait = tracing.QueueWait(trace, len(arrays)) if trace is not None else None
        items = self._batcher._enqueue(arrays, trace, queue_wait, cam)
        try:
            all_done = asyncio.gather(*(item.future for item in items))
            # Mark its outcome as seen even when nobody awaits it (timeout, cancellation).
            all_done.add_done_callback(_consume)
            waiters: set[asyncio.Future[object]] = {all_done}  # type: ignore[arg-type]
            if cancel_when is not None:
                waiters.add(cancel_when)
            remaining = None if timeout is None else max(0.0, timeout)
            done, _ = await asyncio.wait(waiters, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            if all_done in done:
                return all_done.result()
            all_done.cancel()
            if cancel_when is not None and cancel_when in done:
                raise ClientGone()
            raise RequestTimeout(f"request not answered within {timeout:.3g} s")
        finally:
            self._batcher._withdraw(items)
            if queue_wait is not None:
                queue_wait.end()


class DynamicBatcher:
    """Groups queued images into batches and runs them through ``run_batch``, up to
    ``max_concurrent_batches`` at once (``executor`` must have that many threads; by default the batcher
    makes its own pool)."""

    def __init__(
        self,
        run_batch: RunBatch,
        *,
        max_batch_size: int,
        max_delay_s: float,
        max_queue: int,
        executor: Executor | None = None,
        observer: BatchObserver | None = None,
        max_concurrent_batches: int = 1,
        buffers: Sequence[np.ndarray] | None = None,
        spans: tracing.BatchSpans | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        if max_concurrent_batches < 1:
            raise ValueError("max_concurrent_batches must be >= 1")
        if buffers is not None:
            if len(buffers) != max_concurrent_batches:
                raise ValueError(f"need one buffer per slot ({max_concurrent_batches}), got {len(buffers)}")
            if any(len(b) < max_batch_size for b in buffers):
                raise ValueError(f"every slot buffer must hold max_batch_size ({max_batch_size}) images")
        if max_queue < max_batch_size:
            raise ValueError("max_queue must be >= max_batch_size, or batches could never fill")
        if max_delay_s < 0:
            raise ValueError("max_delay_s must be >= 0")
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.max_queue = max_queue
        self.max_concurrent_batches = max_concurrent_batches
        self._own_executor = executor is None
        self._executor = executor or ThreadPoolExecutor(
            max_workers=max_concurrent_batches, thread_name_prefix="effnet-infer"
        )
        self._observer = observer or BatchObserver()
        self._buffers = list(buffers) if buffers is not None else None
        self._spans = spans
        self._queue: deque[_Item] = deque()
        self._depth = 0  # reserved room + queued items: what max_queue bounds
        self._running = 0  # items in the batches being run
        self._free_slots = list(range(max_concurrent_batches - 1, -1, -1))  # a stack: slot 0 first
        self._slot_freed = asyncio.Event()
        self._in_flight: set[asyncio.Task[None]] = set()
        self._accepting = True
        self._wakeup = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        self.batches_run = 0

    # -- lifecycle -------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the worker task on the running event loop."""
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._work(), name="effnet-batcher")

    @property
    def depth(self) -> int:
        """Images reserved or queued, not yet in a running batch (what ``max_queue`` bounds and the queue
        depth gauge shows)."""
        return self._depth

    @property
    def idle(self) -> bool:
        return self._depth == 0 and self._running == 0

    @property
    def batches_in_flight(self) -> int:
        return len(self._in_flight)

    @property
    def accepting(self) -> bool:
        return self._accepting

    async def close(self) -> None:
        """Refuse new work and stop the worker; whatever is still queued or running fails with
        ``ShuttingDown``. Waiting for admitted work first is the drain's (``service.core.lifecycle``),
        which waits while the batcher is not ``idle``."""
        self._accepting = False
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
            self._worker = None
        # Batches still running (the drain timed out): their items fail with ShuttingDown now.
        for task in list(self._in_flight):
            task.cancel()
        if self._in_flight:
            await asyncio.gather(*self._in_flight, return_exceptions=True)
        while self._queue:
            item = self._queue.popleft()
            item.queued = False
            self._depth -= 1
            if not item.future.done():
                item.future.set_exception(ShuttingDown("server is shutting down"))
        self._observer.queue_depth_changed(self._depth)
        if self._own_executor:
            # Not waiting: a batch still running in the thread finishes in the background.
            self._executor.shutdown(wait=False)

    # -- admission ---------------------------------------------------------------------------------------
    def reserve(self, size: int) -> Reservation:
        """Reserve room for ``size`` images, or raise ``QueueFull`` / ``ShuttingDown`` at once."""
        if size < 1:
            raise ValueError("size must be >= 1")
        if not self._accepting:
            raise ShuttingDown("server is shutting down")
        if size > self.max_queue:
            raise QueueFull(f"a request of {size} images can never fit the queue of {self.max_queue}")
        if self._depth + size > self.max_queue:
            raise QueueFull(f"queue full ({self._depth} of {self.max_queue} images admitted); retry later")
        self._depth += size
        self._observer.queue_depth_changed(self._depth)
        return Reservation(self, size)

    def _unreserve(self, size: int) -> None:
        self._depth -= size
        self._observer.queue_depth_changed(self._depth)

    def _enqueue(self, arrays: Sequence[np.ndarray], trace: tracing.RequestTrace | None = None,
                 queue_wait: tracing.QueueWait | None = None, cam: Any = None) -> list[_Item]:
        if self._worker is None:
            raise ShuttingDown("batcher is not running")
        loop = asyncio.get_running_loop()
        now = loop.time()
        items = [_Item(np.asarray(a), loop.create_future(), now, True, trace, queue_wait, cam) for a in arrays]
        self._queue.extend(items)
        self._wakeup.set()
        return items

    def _withdraw(self, items: Sequence[_Item]) -> None:
        """Remove still-queued items (their request is over) and give back their room in the queue."""
        removed = 0
        for item in items:
            if not item.future.done():
                item.future.cancel()
            # Not a try/except around remove(): its ValueError message holds repr(item), and formatting
            # a 150k-float array cost several milliseconds per request.
            if item.queued:
                self._queue.remove(item)
                item.queued = False
                removed += 1
        if removed:
            self._depth -= removed
            self._observer.queue_depth_changed(self._depth)

    # -- the worker ------------------------------------------------------------------------------------
    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            # A free slot first, then the batch: while every slot is busy, the queue grows into the
            # next batch instead of waiting as many small ones.
            while not self._free_slots:
                self._slot_freed.clear()
                await self._slot_freed.wait()
            batch = await self._next_batch()
            if not batch:
                continue
            slot = self._free_slots.pop()
            task = loop.create_task(self._run(batch, slot), name=f"effnet-batch-{slot}")
            self._in_flight.add(task)
            self._observer.batches_in_flight_changed(len(self._in_flight))
            task.add_done_callback(lambda t, slot=slot: self._batch_done(t, slot))

    def _batch_done(self, task: asyncio.Task[None], slot: int) -> None:
        self._in_flight.discard(task)
        self._free_slots.append(slot)
        self._slot_freed.set()
        self._observer.batches_in_flight_changed(len(self._in_flight))
        if not task.cancelled() and task.exception() is not None:  # pragma: no cover - _run catches all
            log.error("batch task failed", exc_info=task.exception())

    async def _next_batch(self) -> list[_Item]:
        """Wait until a batch should close, then take it off the queue (empty if all was withdrawn)."""
        loop = asyncio.get_running_loop()
        while not self._queue:
            self._wakeup.clear()
            await self._wakeup.wait()
        deadline = self._queue[0].enqueued_at + self.max_delay_s
        # Wait for more images only while some are on their way (admitted, still decoding): when
        # everything admitted is already queued, waiting could only add latency.
        while 0 < len(self._queue) < self.max_batch_size and self._depth > len(self._queue):
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except asyncio.TimeoutError:
                break
        # One kind of input per batch (uint8 pixels or normalised float32 tensors): a batch closes where
        # the kind changes, so the queue's order is kept.
        batch: list[_Item] = []
        if not self._queue:  # everything queued was withdrawn while waiting
            return batch
        kind = self._queue[0].array.dtype
        while self._queue and len(batch) < self.max_batch_size and self._queue[0].array.dtype == kind:
            batch.append(self._queue.popleft())
        for item in batch:
            item.queued = False
            if item.queue_wait is not None:
                item.queue_wait.taken()
        self._depth -= len(batch)
        self._observer.queue_depth_changed(self._depth)
        return batch

    async def _run(self, batch: list[_Item], slot: int) -> None:
        """Run one batch in an inference thread, in ``slot``, and resolve its items' futures."""
        loop = asyncio.get_running_loop()
        self._running += len(batch)
        self._observer.batch_started(len(batch), [loop.time() - item.enqueued_at for item in batch])
        span = None
        if self._spans is not None and tracing.tracer() is not None:
            span = self._spans.start((item.trace for item in batch), len(batch), slot)
        t0 = time.perf_counter()
        ok = False
        error: BaseException | None = None
        buffer = self._buffers[slot] if self._buffers is not None else None
        # Only a batch that holds a wish passes the wishes on: the batch function then fetches what they need.
        cams = [item.cam for item in batch] if any(item.cam is not None for item in batch) else None
        try:
            outputs, input_s, infer_s = await loop.run_in_executor(
                self._executor, _stack_and_run, self._run_batch, [item.array for item in batch], slot, buffer, cams
            )
            ok = True
            t_out = time.perf_counter()
        except asyncio.CancelledError as exc:
            error = exc
            _fail(batch, ShuttingDown("server is shutting down"))
            raise
        except Exception as exc:
            error = exc
            log.error("batch of %d failed: %s", len(batch), exc, exc_info=exc)
            _fail(batch, InferenceFailed("inference failed for this batch"))
        else:
            for index, item in enumerate(batch):
                if not item.future.done():
                    item.future.set_result(tuple(row for row in (output[index] for output in outputs)
                                                 if row is not None))
            self._observer.batch_timed(len(batch), input_s, infer_s, time.perf_counter() - t_out)
        finally:
            self._running -= len(batch)
            self.batches_run += 1
            self._observer.batch_finished(len(batch), time.perf_counter() - t0, ok)
            if span is not None:
                tracing.BatchSpans.end(span, ok, error)


def _fail(batch: Sequence[_Item], error: Exception) -> None:
    for item in batch:
        if not item.future.done():
            item.future.set_exception(error)


def _consume(future: asyncio.Future[object]) -> None:
    if not future.cancelled():
        future.exception()


def _stack_and_run(run_batch: RunBatch, arrays: list[np.ndarray], slot: int, buffer: np.ndarray | None,
                   cams: list[Any] | None = None) -> tuple[Sequence[Sequence[Any]], float, float]:
    """Stack and run one batch: (outputs, seconds stacking, seconds in ``run_batch``)."""
    t0 = time.perf_counter()
    # Into the slot's own (pinned) buffer when there is one: no allocation per batch. The slot is not
    # reused before this batch's run_batch has returned, so nothing else writes the buffer meanwhile.
    # A float batch (normalised tensors sent as they are) does not fit the uint8 buffers: stacked apart.
    if buffer is None or buffer.dtype != arrays[0].dtype:
        batch = np.stack(arrays)
    else:
        batch = np.stack(arrays, out=buffer[: len(arrays)])
    t1 = time.perf_counter()
    outputs = run_batch(batch, slot) if cams is None else run_batch(batch, slot, cams=cams)
    t2 = time.perf_counter()
    for output in outputs:
        if len(output) != len(arrays):
            raise RuntimeError(f"engine returned {len(output)} rows for a batch of {len(arrays)}")
    return outputs, t1 - t0, t2 - t1


__all__ = ["BatchObserver", "ClientGone", "DynamicBatcher", "Reservation", "RunBatch"]
