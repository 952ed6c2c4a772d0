"""The engine process's side and a worker's side of the wire, in one process over real abstract Unix
sockets, around stand-in engines the test holds: the queue bound is the engine's (two workers share it),
a withdrawn request leaves the engine's queue, and a lost engine fails every waiting request at once."""

from __future__ import annotations

import asyncio
import secrets

import numpy as np
import pytest

from service.core.engine_client import EngineAddress, RemoteRegistry
from service.core.engine_host import EngineHost
from service.core.errors import ClientGone, EngineUnavailable, QueueFull
from service.core.ipc import socket_address
from service.core.lifecycle import State
from service.core.metrics import Metrics
from service.core.registry import ModelRegistry, Startup
from service.core.runtime import InferenceRequest
from tests.helpers.fakes import FakeEngine, fake_model, split_settings
from tests.helpers.images import load_photos


def pixels(n: int = 1) -> InferenceRequest:
    return InferenceRequest(pixels=np.zeros((n, 3, 224, 224), dtype=np.uint8))


def _address() -> tuple[str, str, str]:
    name = f"effnet-test-{secrets.token_hex(4)}"
    return socket_address(name + "-c"), socket_address(name + "-s"), secrets.token_hex(8)


async def _engine(engine: FakeEngine, address: tuple[str, str, str], **settings):
    """The engine process's side: a registry around ``engine`` and the host that listens at ``address``."""
    server, model_settings = split_settings(**settings)
    metrics = Metrics(8, process_metrics=False)
    values = model_settings.model_dump(include=model_settings.model_fields_set)
    registry = ModelRegistry(server, metrics, Startup(None, [fake_model(engine, warmup=False, **values)]))
    host = EngineHost(registry, metrics, address[2], address[0], address[1])
    await host.start()
    await registry.start()
    return server, registry, host


async def _engine_and_workers(engine: FakeEngine, workers: int = 2, **settings):
    address = _address()
    server, registry, host = await _engine(engine, address, **settings)
    remotes = [RemoteRegistry(server, EngineAddress(*address, worker=i), decode_threads=1) for i in range(workers)]
    for remote in remotes:
        await remote.start()
        assert await remote.link.wait_connected(10)
    await asyncio.sleep(0.05)  # the welcome's snapshot
    return registry, host, remotes


async def _close(registry, host, remotes) -> None:
    for remote in remotes:
        await remote.close()
    await host.close()
    await registry.close()


def test_two_workers_share_the_engines_queue_and_batches():
    async def main():
        engine = FakeEngine(hold=True)
        registry, host, (w0, w1) = await _engine_and_workers(engine, max_batch_size=4, max_queue=4,
                                                             max_batch_delay_ms=50)
        assert w0.state is State.READY and w0.names == ["efficientnet-lite0"]
        first = asyncio.ensure_future(w0.get().serve(pixels(1)))
        while not engine.batch_running.is_set():
            await asyncio.sleep(0.01)
        queued = [asyncio.ensure_future(w.get().serve(pixels(2))) for w in (w0, w1)]  # 4 of 4 in the queue
        await asyncio.sleep(0.2)
        with pytest.raises(QueueFull):  # the bound is the engine's, across both workers
            await w1.get().serve(pixels(1))
        engine.gate.set()
        results = [await first, *(await asyncio.gather(*queued))]
        assert [len(r) for r in results] == [1, 2, 2]
        assert [len(b) for b in engine.batches] == [1, 4]  # the second batch held both workers' images
        assert all(logits.argmax() == 967 for r in results for _, logits in r)
        await _close(registry, host, [w0, w1])

    asyncio.run(main())


def test_decoded_photos_cross_in_shared_memory_unchanged():
    async def main():
        engine = FakeEngine()
        registry, host, (w0,) = await _engine_and_workers(engine, workers=1)
        photos = load_photos()
        blobs = [(name, data) for name, data in photos.items()]
        out = await w0.get().serve(InferenceRequest(images=blobs))
        assert len(out) == 3
        expected = [w0.get().preprocessor(data) for _, data in blobs]
        assert all(np.array_equal(seen, want) for seen, want in zip(engine.batches[0], expected, strict=True))
        await _close(registry, host, [w0])

    asyncio.run(main())


def test_a_caller_that_leaves_withdraws_its_images_from_the_engines_queue():
    async def main():
        engine = FakeEngine(hold=True)
        registry, host, (w0,) = await _engine_and_workers(engine, workers=1, max_batch_size=1,
                                                          max_batch_delay_ms=0, max_queue=4)
        first = asyncio.ensure_future(w0.get().serve(pixels(1)))
        while not engine.batch_running.is_set():
            await asyncio.sleep(0.01)
        gone = asyncio.Event()
        leaving = asyncio.ensure_future(w0.get().serve(pixels(1), cancel_when=gone.wait))
        await asyncio.sleep(0.1)
        assert registry.get().batcher.depth == 1
        gone.set()
        with pytest.raises(ClientGone):
            await leaving
        await asyncio.sleep(0.1)
        assert registry.get().batcher.depth == 0  # out of the engine's queue while the engine is busy
        engine.gate.set()
        await first
        assert len(engine.batches) == 1  # the withdrawn image never ran
        await _close(registry, host, [w0])

    asyncio.run(main())


def test_a_lost_engine_fails_every_waiting_request_at_once():
    async def main():
        engine = FakeEngine(hold=True)
        registry, host, (w0,) = await _engine_and_workers(engine, workers=1)
        waiting = asyncio.ensure_future(w0.get().serve(pixels(1)))
        while not engine.batch_running.is_set():
            await asyncio.sleep(0.01)
        started = asyncio.get_running_loop().time()
        await host.close()  # as the engine process dying closes every connection
        with pytest.raises(EngineUnavailable):
            await waiting
        assert asyncio.get_running_loop().time() - started < 1.0
        assert not w0.ready
        with pytest.raises(EngineUnavailable):
            await w0.get().serve(pixels(1))
        engine.gate.set()
        await _close(registry, host, [w0])

    asyncio.run(main())


def test_a_starting_worker_finishes_its_start_only_once_it_reaches_the_engine(monkeypatch):
    """Its listening socket already takes its share of the port's connections (SO_REUSEPORT): uvicorn
    accepts them once the start is done, so the start waits for the engine, and only so long."""
    import service.core.engine_client as engine_client

    async def main():
        server, _ = split_settings()
        address = _address()
        remote = RemoteRegistry(server, EngineAddress(*address, worker=0), decode_threads=1)
        starting = asyncio.ensure_future(remote.start())
        await asyncio.sleep(0.5)
        assert not starting.done()  # no engine yet: not accepting
        _, registry, host = await _engine(FakeEngine(), address)
        await asyncio.wait_for(starting, 5)
        assert remote.link.connected and remote.names  # the welcome's snapshot came with the connection
        assert await remote.get().serve(pixels(1))
        await _close(registry, host, [remote])

        # An engine that stays away: the start ends after FIRST_CONNECT_S, and the worker answers 503.
        monkeypatch.setattr(engine_client, "FIRST_CONNECT_S", 0.3)
        alone = RemoteRegistry(server, EngineAddress(*address, worker=1), decode_threads=1)
        await asyncio.wait_for(alone.start(), 5)
        assert not alone.ready
        with pytest.raises(EngineUnavailable):
            alone.get()
        await alone.close()

    asyncio.run(main())
