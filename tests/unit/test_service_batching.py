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


def item(value: float) -> np.ndarray:
    return np.full((3, 2, 2), value, dtype=np.float32)


class RecordingEngine:
    """Returns (per-item mean, per-item value * 2); records batch sizes; raises on a poisoned item (-1)."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.batches: list[list[float]] = []
        self.gate = gate

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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
        assert batcher.admitted == 2
        held.release()
        held.release()  # idempotent
        assert batcher.admitted == 0
        with pytest.raises(QueueFull):
            batcher.reserve(3)  # can never fit
        batcher.reserve(1).release()
        await batcher.close()

    run(main())


def _blocked_batcher(gate: threading.Event) -> tuple[DynamicBatcher, RecordingEngine]:
    engine = RecordingEngine(gate)
    return DynamicBatcher(engine, max_batch_size=1, max_delay_s=0.0, max_queue=1), engine


def test_timed_out_request_gets_504_and_frees_its_slot_without_running():
    gate = threading.Event()

    async def main():
        batcher, engine = _blocked_batcher(gate)
        batcher.start()
        running = asyncio.ensure_future(submit(batcher, [1.0]))  # taken into a batch, blocked in the engine
        await asyncio.sleep(0.1)
        assert batcher.admitted == 0
        waiting = asyncio.ensure_future(submit(batcher, [2.0], timeout=0.2))
        await asyncio.sleep(0.05)
        with pytest.raises(QueueFull):
            batcher.reserve(1)
        with pytest.raises(RequestTimeout):
            await waiting
        assert batcher.admitted == 0  # slot freed while the engine is still busy
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
        assert batcher.admitted == 0
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
        assert batcher.admitted == 0
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
        closing = asyncio.ensure_future(batcher.close(drain_timeout=0.2))
        await asyncio.sleep(0.01)
        with pytest.raises(ShuttingDown):
            batcher.reserve(1)
        await closing  # the engine is still blocked: the drain times out
        gate.set()
        return await asyncio.gather(running, queued, return_exceptions=True)

    outcomes = run(main())
    assert all(isinstance(o, ShuttingDown) for o in outcomes), outcomes


def test_close_drains_admitted_work_first():
    engine = RecordingEngine()

    async def main():
        batcher = DynamicBatcher(engine, max_batch_size=4, max_delay_s=0.2, max_queue=8)
        batcher.start()
        pending = [asyncio.ensure_future(submit(batcher, [float(v)])) for v in range(3)]
        await asyncio.sleep(0.01)
        await batcher.close(drain_timeout=5.0)
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
