"""Unit tests of the dynamic batcher with stand-in engines (no model, no HTTP)."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from service.core import batching
from service.core.batching import ClientGone, DynamicBatcher
from service.core.errors import InferenceFailed, QueueFull, RequestTimeout, ShuttingDown
from service.core.lifecycle import Lifecycle


def item(value: float) -> np.ndarray:
    return np.full((3, 2, 2), value, dtype=np.float32)


class RecordingEngine:
    """Returns (per-item mean, per-item value * 2); records batch sizes; raises on a poisoned item (-1)."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.batches: list[list[float]] = []
        self.gate = gate

    def __call__(self, batch: np.ndarray, slot: int = 0) -> tuple[np.ndarray, np.ndarray]:
        if self.gate is not None:
            assert self.gate.wait(10), "test gate never opened"
        values = batch.reshape(len(batch), -1)[:, 0]
        self.batches.append(values.tolist())
        if (values == -1).any():
            raise RuntimeError("poisoned batch")
        return batch.reshape(len(batch), -1).mean(axis=1, keepdims=True), values * 2


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


async def submit(
    batcher: DynamicBatcher, values: list[float], timeout: float | None = 10.0, cancel_when=None
):
    with batcher.reserve(len(values)) as slot:
        return await slot.run([item(v) for v in values], timeout=timeout, cancel_when=cancel_when)


def test_batch_closes_when_full_without_waiting_for_the_delay():
    engine = RecordingEngine()

    async def main():
        batcher = DynamicBatcher(engine, max_batch_size=4, max_delay_s=10.0, max_queue=16)
        batcher.start()
        started = time.perf_counter()
        results = await asyncio.gather(*(submit(batcher, [float(i)]) for i in range(4)))
        elapsed = time.perf_counter() - started
        await batcher.close()
        return results, elapsed

    results, elapsed = run(main())
    assert elapsed < 2.0
    assert engine.batches == [[0.0, 1.0, 2.0, 3.0]]
    # Each request gets its own row back.
    assert [float(r[0][1]) for r in results] == [0.0, 2.0, 4.0, 6.0]


def test_batch_closes_after_the_delay_from_its_first_item():
    # Another request has reserved room (it is still decoding) but its image never arrives in time:
    # the batch waits for it no longer than the delay.
    engine = RecordingEngine()

    async def main():
        batcher = DynamicBatcher(engine, max_batch_size=8, max_delay_s=0.2, max_queue=16)
        batcher.start()
        slow = batcher.reserve(1)
        started = time.perf_counter()
        await submit(batcher, [1.0])
        elapsed = time.perf_counter() - started
        slow.release()
        await batcher.close()
        return elapsed

    elapsed = run(main())
    assert 0.18 <= elapsed < 1.5
    assert engine.batches == [[1.0]]


def test_images_still_decoding_join_the_batch_within_the_delay():
    engine = RecordingEngine()

    async def main():
        batcher = DynamicBatcher(engine, max_batch_size=8, max_delay_s=2.0, max_queue=16)
        batcher.start()
        started = time.perf_counter()
        with batcher.reserve(2) as second:  # reserved first, decoded 50 ms later
            first = asyncio.ensure_future(submit(batcher, [1.0]))
            await asyncio.sleep(0.05)
            await second.run([item(2.0), item(3.0)], timeout=10.0)
        await first
        elapsed = time.perf_counter() - started
        await batcher.close()
        return elapsed

    elapsed = run(main())
    assert elapsed < 1.0, "the batch must close once every admitted image is queued, not wait the delay"
    assert engine.batches == [[1.0, 2.0, 3.0]]


def test_a_lone_request_does_not_wait_for_the_delay():
    # Nothing else admitted: waiting could only add latency, so the batch runs at once.
    engine = RecordingEngine()

    async def main():
        batcher = DynamicBatcher(engine, max_batch_size=8, max_delay_s=5.0, max_queue=16)
        batcher.start()
        started = time.perf_counter()
        await submit(batcher, [1.0])
        elapsed = time.perf_counter() - started
        await batcher.close()
        return elapsed

    assert run(main()) < 1.0
    assert engine.batches == [[1.0]]


def test_a_request_with_many_images_gets_them_back_in_order_across_batches():
    engine = RecordingEngine()

    async def main():
        batcher = DynamicBatcher(engine, max_batch_size=3, max_delay_s=0.001, max_queue=16)
        batcher.start()
        outputs = await submit(batcher, [float(v) for v in range(7)])
        await batcher.close()
        return outputs

    outputs = run(main())
    assert [float(o[1]) for o in outputs] == [2.0 * v for v in range(7)]
    assert [len(b) for b in engine.batches] == [3, 3, 1]


def test_a_failing_batch_fails_only_its_own_requests():
    engine = RecordingEngine()

    async def main():
        batcher = DynamicBatcher(engine, max_batch_size=2, max_delay_s=0.05, max_queue=16)
        batcher.start()
        # Batch 1: poison + good (both fail). Batch 2: two good requests (succeed).
        first = [asyncio.ensure_future(submit(batcher, [v])) for v in (-1.0, 5.0)]
        await asyncio.sleep(0.01)
        second = [asyncio.ensure_future(submit(batcher, [v])) for v in (6.0, 7.0)]
        outcomes = await asyncio.gather(*first, *second, return_exceptions=True)
        later = await submit(batcher, [8.0])  # the batcher goes on
        await batcher.close()
        return outcomes, later

    outcomes, later = run(main())
    assert isinstance(outcomes[0], InferenceFailed) and isinstance(outcomes[1], InferenceFailed)
    assert [float(o[0][1]) for o in outcomes[2:]] == [12.0, 14.0]
    assert float(later[0][1]) == 16.0


def test_full_queue_is_refused_at_once_and_room_comes_back():
    async def main():
        batcher = DynamicBatcher(RecordingEngine(), max_batch_size=2, max_delay_s=1.0, max_queue=2)
        batcher.start()
        held = batcher.reserve(2)
        with pytest.raises(QueueFull):
            batcher.reserve(1)
        assert batcher.depth == 2
        held.release()
        held.release()  # idempotent
        assert batcher.depth == 0
        with pytest.raises(QueueFull):
            batcher.reserve(3)  # can never fit
        batcher.reserve(1).release()
        await batcher.close()

    run(main())


def _blocked_batcher(gate: threading.Event) -> tuple[DynamicBatcher, RecordingEngine]:
    engine = RecordingEngine(gate)
    return DynamicBatcher(engine, max_batch_size=1, max_delay_s=0.0, max_queue=1), engine


def test_timed_out_request_gets_504_and_frees_its_room_without_running():
    gate = threading.Event()

    async def main():
        batcher, engine = _blocked_batcher(gate)
        batcher.start()
        running = asyncio.ensure_future(submit(batcher, [1.0]))  # taken into a batch, blocked in the engine
        await asyncio.sleep(0.1)
        assert batcher.depth == 0
        waiting = asyncio.ensure_future(submit(batcher, [2.0], timeout=0.2))
        await asyncio.sleep(0.05)
        with pytest.raises(QueueFull):
            batcher.reserve(1)
        with pytest.raises(RequestTimeout):
            await waiting
        assert batcher.depth == 0  # slot freed while the engine is still busy
        batcher.reserve(1).release()
        gate.set()
        await running
        await batcher.close()
        return engine

    engine = run(main())
    assert engine.batches == [[1.0]]  # the timed-out item never ran


def test_cancelled_request_items_are_skipped():
    gate = threading.Event()

    async def main():
        batcher, engine = _blocked_batcher(gate)
        batcher.start()
        running = asyncio.ensure_future(submit(batcher, [1.0]))
        await asyncio.sleep(0.1)
        waiting = asyncio.ensure_future(submit(batcher, [2.0]))
        await asyncio.sleep(0.05)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert batcher.depth == 0
        gate.set()
        await running
        await submit(batcher, [3.0])
        await batcher.close()
        return engine

    engine = run(main())
    assert engine.batches == [[1.0], [3.0]]


def test_client_gone_withdraws_items():
    gate = threading.Event()

    async def main():
        batcher, engine = _blocked_batcher(gate)
        batcher.start()
        running = asyncio.ensure_future(submit(batcher, [1.0]))
        await asyncio.sleep(0.1)
        gone = asyncio.get_running_loop().create_future()
        waiting = asyncio.ensure_future(submit(batcher, [2.0], cancel_when=gone))
        await asyncio.sleep(0.05)
        gone.set_result(None)
        with pytest.raises(ClientGone):
            await waiting
        assert batcher.depth == 0
        gate.set()
        await running
        await batcher.close()
        return engine

    assert run(main()).batches == [[1.0]]


def test_close_refuses_new_work_and_fails_what_is_left():
    gate = threading.Event()

    async def main():
        batcher = DynamicBatcher(RecordingEngine(gate), max_batch_size=1, max_delay_s=0.0, max_queue=2)
        batcher.start()
        running = asyncio.ensure_future(submit(batcher, [1.0]))
        await asyncio.sleep(0.1)
        queued = asyncio.ensure_future(submit(batcher, [2.0]))
        await asyncio.sleep(0.05)
        drained = await Lifecycle().drain(0.2, lambda: not batcher.idle)
        assert drained is False  # the engine is still blocked: the drain times out
        closing = asyncio.ensure_future(batcher.close())
        await asyncio.sleep(0.01)
        with pytest.raises(ShuttingDown):
            batcher.reserve(1)
        await closing
        gate.set()
        return await asyncio.gather(running, queued, return_exceptions=True)

    outcomes = run(main())
    assert all(isinstance(o, ShuttingDown) for o in outcomes), outcomes


def test_the_drain_waits_for_admitted_work_before_close():
    """The one drain (the lifecycle's) waits while the batcher is busy; close after it loses nothing."""
    engine = RecordingEngine()

    async def main():
        batcher = DynamicBatcher(engine, max_batch_size=4, max_delay_s=0.2, max_queue=8)
        batcher.start()
        pending = [asyncio.ensure_future(submit(batcher, [float(v)])) for v in range(3)]
        await asyncio.sleep(0.01)
        assert await Lifecycle().drain(5.0, lambda: not batcher.idle) is True
        await batcher.close()
        return await asyncio.gather(*pending)

    outputs = run(main())
    assert [float(o[0][1]) for o in outputs] == [0.0, 2.0, 4.0]


def test_configuration_is_validated():
    with pytest.raises(ValueError, match="max_queue"):
        DynamicBatcher(RecordingEngine(), max_batch_size=8, max_delay_s=0.0, max_queue=4)
    with pytest.raises(ValueError):
        DynamicBatcher(RecordingEngine(), max_batch_size=0, max_delay_s=0.0, max_queue=4)


def test_answering_a_request_never_formats_its_images(monkeypatch):
    # Formatting a queued image (a 150k-float array) on the hot path cost milliseconds per request.
    def no_repr(self):
        raise AssertionError("the batcher formatted a queued image")

    monkeypatch.setattr(batching._Item, "__repr__", no_repr)
    engine = RecordingEngine()

    async def main():
        batcher = DynamicBatcher(engine, max_batch_size=4, max_delay_s=0.0, max_queue=8)
        batcher.start()
        with batcher.reserve(2) as slot:
            out = await slot.run([item(1.0), item(2.0)], timeout=10.0)
        await batcher.close()
        return out

    assert [float(o[1]) for o in run(main())] == [2.0, 4.0]


# -- batches in flight ------------------------------------------------------------------------------------


class SlotEngine:
    """Records, per batch, its slot, values and whether it was given a slot buffer (by identity of the
    memory); holds a batch while its first value has a gate that is clear; raises on a poisoned (-1)
    item. Tracks how many batches run at once, and whether a slot was ever used twice at once."""

    def __init__(self, buffers: list[np.ndarray] | None = None) -> None:
        self.buffers = buffers
        self.gates: dict[float, threading.Event] = {}
        self.lock = threading.Lock()
        self.running: set[int] = set()
        self.most_at_once = 0
        self.slot_reused_while_busy = False
        self.records: list[tuple[int, list[float], bool]] = []

    def __call__(self, batch: np.ndarray, slot: int) -> tuple[np.ndarray, np.ndarray]:
        values = batch.reshape(len(batch), -1)[:, 0].tolist()
        with self.lock:
            self.slot_reused_while_busy |= slot in self.running
            self.running.add(slot)
            self.most_at_once = max(self.most_at_once, len(self.running))
            in_buffer = self.buffers is not None and np.shares_memory(batch, self.buffers[slot])
            self.records.append((slot, values, in_buffer))
        try:
            gate = self.gates.get(values[0])
            if gate is not None:
                assert gate.wait(10), "test gate never opened"
            if -1.0 in values:
                raise RuntimeError("poisoned batch")
            return batch.reshape(len(batch), -1).mean(axis=1, keepdims=True), np.asarray(values) * 2
        finally:
            with self.lock:
                self.running.discard(slot)


class InFlightObserver(batching.BatchObserver):
    def __init__(self) -> None:
        self.in_flight: list[int] = []

    def batches_in_flight_changed(self, batches: int) -> None:
        self.in_flight.append(batches)


def test_two_batches_in_flight_the_second_finishes_while_the_first_is_held():
    """With two slots, a batch held in the engine does not stop the next one: it runs in the other slot
    and its request is answered first; the gauge counts two in flight, then none."""
    engine = SlotEngine()
    held = engine.gates[1.0] = threading.Event()
    observer = InFlightObserver()

    async def main():
        batcher = DynamicBatcher(engine, max_batch_size=1, max_delay_s=0.0, max_queue=4,
                                 max_concurrent_batches=2, observer=observer)
        batcher.start()
        first = asyncio.ensure_future(submit(batcher, [1.0]))
        await asyncio.sleep(0.1)
        second = await submit(batcher, [2.0])
        assert not first.done() and batcher.batches_in_flight == 1
        held.set()
        out = await first
        await batcher.close()
        return out, second

    first, second = run(main())
    assert float(first[0][1]) == 2.0 and float(second[0][1]) == 4.0
    assert sorted(slot for slot, _, _ in engine.records) == [0, 1]
    assert engine.most_at_once == 2 and not engine.slot_reused_while_busy
    assert max(observer.in_flight) == 2 and observer.in_flight[-1] == 0


def test_one_slot_runs_one_batch_at_a_time_and_the_queue_grows_meanwhile():
    """The default: one batch at a time; while it runs, later images gather into one bigger batch."""
    engine = SlotEngine()
    held = engine.gates[1.0] = threading.Event()

    async def main():
        batcher = DynamicBatcher(engine, max_batch_size=8, max_delay_s=0.0, max_queue=16)
        batcher.start()
        first = asyncio.ensure_future(submit(batcher, [1.0]))
        await asyncio.sleep(0.1)
        later = [asyncio.ensure_future(submit(batcher, [v])) for v in (2.0, 3.0, 4.0)]
        await asyncio.sleep(0.1)
        held.set()
        await asyncio.gather(first, *later)
        await batcher.close()

    run(main())
    assert [values for _, values, _ in engine.records] == [[1.0], [2.0, 3.0, 4.0]]
    assert engine.most_at_once == 1


def test_batches_are_stacked_into_their_slot_buffer_and_the_buffers_are_reused():
    """Given one buffer per slot, every batch arrives as a view of its own slot's buffer (no allocation
    per batch), and each answer is copied out before the buffer is refilled."""
    buffers = [np.zeros((4, 3, 2, 2), dtype=np.float32) for _ in range(2)]
    engine = SlotEngine(buffers)

    async def main():
        batcher = DynamicBatcher(engine, max_batch_size=4, max_delay_s=0.0, max_queue=64,
                                 max_concurrent_batches=2, buffers=buffers)
        batcher.start()
        outs = await asyncio.gather(*(submit(batcher, [float(v), float(v) + 0.5]) for v in range(20)))
        await batcher.close()
        return outs

    outs = run(main())
    assert [[float(o[1]) for o in out] for out in outs] == [[2.0 * v, 2.0 * v + 1.0] for v in range(20)]
    assert len(engine.records) >= 10 and all(in_buffer for _, _, in_buffer in engine.records)
    assert not engine.slot_reused_while_busy


def test_a_failing_batch_in_one_slot_leaves_the_batch_in_the_other_slot_alone():
    engine = SlotEngine()
    held = engine.gates[-1.0] = threading.Event()

    async def main():
        batcher = DynamicBatcher(engine, max_batch_size=2, max_delay_s=0.0, max_queue=8,
                                 max_concurrent_batches=2)
        batcher.start()
        poisoned = asyncio.ensure_future(submit(batcher, [-1.0, 5.0]))  # held, then fails
        await asyncio.sleep(0.1)
        good = await submit(batcher, [6.0, 7.0])  # runs meanwhile in the other slot
        held.set()
        outcome = await asyncio.gather(poisoned, return_exceptions=True)
        later = await submit(batcher, [8.0])
        await batcher.close()
        return good, outcome[0], later

    good, failed, later = run(main())
    assert [float(o[1]) for o in good] == [12.0, 14.0]
    assert isinstance(failed, InferenceFailed)
    assert float(later[0][1]) == 16.0


def test_a_request_split_over_concurrent_batches_gets_its_rows_in_order():
    """Seven images over batches of two in two slots (which may finish in either order)."""
    engine = SlotEngine()

    async def main():
        batcher = DynamicBatcher(engine, max_batch_size=2, max_delay_s=0.0, max_queue=16,
                                 max_concurrent_batches=2)
        batcher.start()
        out = await submit(batcher, [float(v) for v in range(7)])
        await batcher.close()
        return out

    assert [float(o[1]) for o in run(main())] == [2.0 * v for v in range(7)]


def test_timeout_and_drain_with_two_batches_in_flight():
    """Both slots held: a queued request times out (504) and frees its room; close() waits for the
    running batches up to its drain timeout, then fails them with ShuttingDown."""
    engine = SlotEngine()
    gates = [engine.gates.setdefault(v, threading.Event()) for v in (1.0, 2.0)]

    async def main():
        batcher = DynamicBatcher(engine, max_batch_size=1, max_delay_s=0.0, max_queue=2,
                                 max_concurrent_batches=2)
        batcher.start()
        running = [asyncio.ensure_future(submit(batcher, [v])) for v in (1.0, 2.0)]
        await asyncio.sleep(0.1)
        assert batcher.batches_in_flight == 2 and batcher.depth == 0
        with pytest.raises(RequestTimeout):
            await submit(batcher, [3.0], timeout=0.2)
        assert batcher.depth == 0
        started = time.perf_counter()
        assert await Lifecycle().drain(0.3, lambda: not batcher.idle) is False
        await batcher.close()
        waited = time.perf_counter() - started
        for gate in gates:
            gate.set()
        return waited, await asyncio.gather(*running, return_exceptions=True)

    waited, outcomes = run(main())
    assert 0.25 <= waited < 2.0
    assert all(isinstance(o, ShuttingDown) for o in outcomes), outcomes
    assert [values for _, values, _ in engine.records] == [[1.0], [2.0]]  # 3.0 never ran


def test_slot_configuration_is_validated():
    with pytest.raises(ValueError, match="max_concurrent_batches"):
        DynamicBatcher(RecordingEngine(), max_batch_size=1, max_delay_s=0.0, max_queue=4, max_concurrent_batches=0)
    with pytest.raises(ValueError, match="one buffer per slot"):
        DynamicBatcher(RecordingEngine(), max_batch_size=1, max_delay_s=0.0, max_queue=4, max_concurrent_batches=2,
                       buffers=[np.zeros((1, 1))])
    with pytest.raises(ValueError, match="max_batch_size"):
        DynamicBatcher(RecordingEngine(), max_batch_size=4, max_delay_s=0.0, max_queue=4,
                       buffers=[np.zeros((2, 1))])


def test_uint8_and_float_images_never_share_a_batch_and_keep_their_order():
    """Pixels (uint8) and normalised tensors (float32) queued together: a batch closes where the kind
    changes, so each batch is one dtype, the queue's order is kept, a float batch is stacked apart from the
    uint8 slot buffer, and each request gets its own rows; the statistics see every batch's phases."""
    from service.core.statistics import BatchObservers, ModelStatistics

    buffers = [np.zeros((8, 3, 2, 2), dtype=np.uint8)]
    engine = SlotEngine(buffers)
    dtypes: list[set[str]] = []
    statistics = ModelStatistics()

    def run_batch(batch: np.ndarray, slot: int):
        dtypes.append({str(batch.dtype)})
        return engine(batch, slot)

    def pixels(value: int) -> np.ndarray:
        return np.full((3, 2, 2), value, dtype=np.uint8)

    async def main():
        gate = threading.Event()
        engine.gates[99.0] = gate
        batcher = DynamicBatcher(run_batch, max_batch_size=8, max_delay_s=0.0, max_queue=64, buffers=buffers,
                                 observer=BatchObservers(batching.BatchObserver(), statistics))
        batcher.start()

        async def send(arrays):
            with batcher.reserve(len(arrays)) as room:
                return await room.run(arrays, timeout=10)

        # A first batch holds the only slot while the mixed queue builds up behind it.
        first = asyncio.ensure_future(send([pixels(99)]))
        await asyncio.sleep(0.2)
        requests = [[pixels(1), pixels(2)], [item(3.5)], [pixels(4)], [item(5.5), item(6.5)]]
        pending = [asyncio.ensure_future(send(r)) for r in requests]
        await asyncio.sleep(0.2)
        gate.set()
        outs = await asyncio.gather(first, *pending)
        await batcher.close()
        return outs

    outs = run(main())
    assert [[float(o[1]) for o in out] for out in outs[1:]] == [[2.0, 4.0], [7.0], [8.0], [11.0, 13.0]]
    assert [values for _, values, _ in engine.records] == [[99.0], [1.0, 2.0], [3.5], [4.0], [5.5, 6.5]]
    assert dtypes == [{"uint8"}, {"uint8"}, {"float32"}, {"uint8"}, {"float32"}]
    assert [in_buffer for _, _, in_buffer in engine.records] == [True, True, False, True, False]
    snap = statistics.snapshot()
    assert snap.execution_count == 5 and snap.inference_count == 7 and snap.queue.count == 7
    assert snap.compute_infer.count == 7 and [b.batch_size for b in snap.batches] == [1, 2]
    assert [b.compute_infer.count for b in snap.batches] == [3, 2]


def test_the_worker_survives_a_queue_emptied_while_a_batch_waits():
    """A batch waiting for images still decoding, whose only queued image is withdrawn (its client left):
    the worker finds an empty queue, and the next request is still served."""
    engine = RecordingEngine()

    async def main():
        batcher = DynamicBatcher(engine, max_batch_size=4, max_delay_s=0.5, max_queue=16)
        batcher.start()
        decoding = batcher.reserve(1)  # admitted, still "decoding": the batch waits for it
        leaving = asyncio.ensure_future(submit(batcher, [1.0]))
        await asyncio.sleep(0.05)
        leaving.cancel()  # withdrawn while the batch waits
        await asyncio.gather(leaving, return_exceptions=True)
        await asyncio.sleep(0.6)  # past the delay: the batch closes on an empty queue
        decoding.release()
        out = await submit(batcher, [2.0])
        await batcher.close()
        return out

    assert float(run(main())[0][1]) == 4.0
    assert engine.batches == [[2.0]]
