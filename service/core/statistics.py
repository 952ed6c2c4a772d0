"""Per-model inference statistics, as the Open Inference Protocol's statistics extension (Triton's
``/v2/models/NAME/stats`` and gRPC ``ModelStatistics``) reports them: counts and cumulative durations in
nanoseconds, since the server started.

Fed by the batcher (as one of its observers: queue waits, each batch's phases) and by the core's request
entry (each request's outcome); read by any front-end through ``snapshot()``. Transport-free: the shape of
the answer is the front-end's business.

The batcher batches images, not requests, so the per-inference figures count images: ``queue`` and the
three ``compute_*`` durations are counted once per image (each image of a batch is charged the batch's
whole phase, as Triton charges each request of a batch), ``inference_count`` is images inferred and
``execution_count`` batches run. ``success`` and ``fail`` count requests (their whole time in the server,
read and parse included). A request of one image is therefore one inference, exactly as in Triton.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from service.core.batching import BatchObserver

NS = 1_000_000_000


@dataclass
class Duration:
    """A count and the total of its durations, in nanoseconds."""

    count: int = 0
    ns: int = 0

    def add(self, seconds: float, count: int = 1) -> None:
        self.count += count
        self.ns += int(round(seconds * NS)) * count

    def copy(self) -> Duration:
        return Duration(self.count, self.ns)


@dataclass
class BatchStatistics:
    """The compute phases of every batch of one size."""

    batch_size: int
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass
class StatisticsSnapshot:
    """A consistent copy of the statistics at one moment."""

    last_inference_ms: int  # wall-clock milliseconds since the epoch of the last success (0: none yet)
    inference_count: int
    execution_count: int
    success: Duration
    fail: Duration
    queue: Duration
    compute_input: Duration
    compute_infer: Duration
    compute_output: Duration
    batches: list[BatchStatistics]

    def to_wire(self) -> dict[str, Any]:
        """Plain data (the engine process sends it to a front-end worker)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> StatisticsSnapshot:
        durations = {key: Duration(**data[key]) for key in _DURATIONS}
        batches = [BatchStatistics(b["batch_size"], *(Duration(**b[key]) for key in _DURATIONS[-3:]))
                   for b in data["batches"]]
        return cls(data["last_inference_ms"], data["inference_count"], data["execution_count"], batches=batches,
                   **durations)


_DURATIONS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")


class ModelStatistics(BatchObserver):
    """Counts and durations for one model. Batch hooks run on the event loop, request outcomes too; a
    lock keeps ``snapshot()`` consistent if read from another thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_inference_ms = 0
        self._inference_count = 0
        self._execution_count = 0
        self._success = Duration()
        self._fail = Duration()
        self._queue = Duration()
        self._compute_input = Duration()
        self._compute_infer = Duration()
        self._compute_output = Duration()
        self._batches: dict[int, BatchStatistics] = {}

    # -- the batcher's hooks ----------------------------------------------------------------------------
    def batch_started(self, size: int, queue_waits_s: Sequence[float]) -> None:
        with self._lock:
            for wait in queue_waits_s:
                self._queue.add(max(0.0, wait))

    def batch_timed(self, size: int, input_s: float, infer_s: float, output_s: float) -> None:
        with self._lock:
            self._execution_count += 1
            self._inference_count += size
            batch = self._batches.get(size)
            if batch is None:
                batch = self._batches[size] = BatchStatistics(size)
            for total, per_size, seconds in (
                (self._compute_input, batch.compute_input, input_s),
                (self._compute_infer, batch.compute_infer, infer_s),
                (self._compute_output, batch.compute_output, output_s),
            ):
                total.add(seconds, size)
                per_size.add(seconds)  # Triton's batch_stats: one count per execution of this size

    # -- the request entry's hook -----------------------------------------------------------------------
    def request_finished(self, duration_s: float, ok: bool) -> None:
        """One request that reached the model (it was admitted and parsed) ended, answered or failed."""
        with self._lock:
            (self._success if ok else self._fail).add(duration_s)
            if ok:
                self._last_inference_ms = int(time.time() * 1000)

    def snapshot(self) -> StatisticsSnapshot:
        with self._lock:
            return StatisticsSnapshot(
                last_inference_ms=self._last_inference_ms,
                inference_count=self._inference_count,
                execution_count=self._execution_count,
                success=self._success.copy(),
                fail=self._fail.copy(),
                queue=self._queue.copy(),
                compute_input=self._compute_input.copy(),
                compute_infer=self._compute_infer.copy(),
                compute_output=self._compute_output.copy(),
                batches=[
                    BatchStatistics(b.batch_size, b.compute_input.copy(), b.compute_infer.copy(),
                                    b.compute_output.copy())
                    for _, b in sorted(self._batches.items())
                ],
            )


class BatchObservers(BatchObserver):
    """Several batch observers (the metrics, the statistics) behind the batcher's one."""

    def __init__(self, *observers: BatchObserver) -> None:
        self.observers = observers

    def queue_depth_changed(self, images: int) -> None:
        for observer in self.observers:
            observer.queue_depth_changed(images)

    def batch_started(self, size: int, queue_waits_s: Sequence[float]) -> None:
        for observer in self.observers:
            observer.batch_started(size, queue_waits_s)

    def batch_finished(self, size: int, duration_s: float, ok: bool) -> None:
        for observer in self.observers:
            observer.batch_finished(size, duration_s, ok)

    def batches_in_flight_changed(self, batches: int) -> None:
        for observer in self.observers:
            observer.batches_in_flight_changed(batches)

    def batch_timed(self, size: int, input_s: float, infer_s: float, output_s: float) -> None:
        for observer in self.observers:
            observer.batch_timed(size, input_s, infer_s, output_s)


__all__ = ["BatchStatistics", "Duration", "ModelStatistics", "BatchObservers", "StatisticsSnapshot"]
