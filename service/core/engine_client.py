"""A front-end worker's side of the wire (``EFFNET_WORKERS`` > 1): the engine process's models, mirrored.

``EngineLink`` is the worker's one connection to the engine process (``service.core.ipc``): requests that
get answers, the snapshots the engine pushes, and a reconnection loop for when the engine restarts.
While it is down every request is answered 503 ``engine_unavailable`` at once, and every request that
was waiting on it gets the same answer the moment the connection drops.

``RemoteRegistry`` and ``RemoteModel`` are what the doors see in a worker, with the same methods as the
in-process ``ModelRegistry`` and ``ServedModel``: a request goes through the very same ``serve`` (read,
limits, deadline, decoding in this worker's threads); only the room in the queue is reserved in the
engine process, where the queue is, and the decoded pixels are written into this worker's shared memory
for the engine's batcher to read.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.core import ipc, tracing
from service.core.cam import CamWish
from service.core.errors import ClientGone, EngineUnavailable, RequestTimeout, ServiceError
from service.core.lifecycle import Lifecycle, State
from service.core.models import loaded_from_wire
from service.core.registry import ServedModels
from service.core.runtime import ServedModel
from service.core.settings import ServerSettings
from service.core.statistics import StatisticsSnapshot

log = logging.getLogger("service.core.engine_client")

# How long after a request's deadline a worker still waits for the engine's answer before it gives up on
# its own (the engine enforces the deadline; this only covers an engine that stopped answering).
ANSWER_GRACE_S = 1.0
RECONNECT_EVERY_S = 0.1
# How long a starting worker waits for its first connection to the engine process before it accepts
# connections anyway (answering 503 engine_unavailable until the engine is back). Its listening socket
# takes its share of the port's new connections from the start (SO_REUSEPORT): accepting them before the
# engine is reachable would answer a share of the traffic 503 while the other workers serve.
FIRST_CONNECT_S = 10.0


@dataclass(frozen=True)
class EngineAddress:
    """Where a worker finds the engine process: its two sockets, the server's token, the worker's number."""

    control: str
    segments: str
    token: str
    worker: int


class EngineLink:
    """The connection to the engine process, re-established whenever it drops."""

    def __init__(self, address: EngineAddress, on_snapshot: Callable[[dict[str, Any]], None],
                 on_lost: Callable[[], None]) -> None:
        self.control = address.control
        self.segments_address = address.segments
        self.token = address.token
        self.worker = address.worker
        self.on_snapshot = on_snapshot
        self.on_lost = on_lost
        self.client: int | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._answers: dict[int, asyncio.Future[tuple[dict[str, Any], bytes]]] = {}
        self._ids = itertools.count(1)
        self._task: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._closing = False
        self.arena = ipc.Arena(self._register)

    @property
    def connected(self) -> bool:
        return self._writer is not None

    async def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def wait_connected(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._connected.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    async def close(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        self.arena.close()

    def _register(self, segment: ipc.Segment) -> None:
        if self.client is None:
            raise EngineUnavailable("the engine process is not reachable; retry shortly")
        ipc.send_segment(self.segments_address, self.token, self.client, segment)

    async def _run(self) -> None:
        while not self._closing:
            try:
                # Connected here rather than by the loop: uvloop (uvicorn's loop) cannot name an abstract
                # socket, but it takes a connected one.
                sock = await asyncio.to_thread(_connect, self.control)
                reader, writer = await asyncio.open_unix_connection(sock=sock, limit=1 << 22)
            except OSError:
                await asyncio.sleep(RECONNECT_EVERY_S)
                continue
            try:
                ipc.write_frame(writer, {"op": "hello", "token": self.token, "worker": self.worker,
                                         "pid": os.getpid()})
                welcome, _ = await asyncio.wait_for(ipc.read_frame(reader), 30)
                self.client = int(welcome["client"])
                # The segments made before (a restarted engine knows none of them) are handed over again.
                for segment in self.arena.segments:
                    await asyncio.to_thread(ipc.send_segment, self.segments_address, self.token, self.client,
                                            segment)
                self._writer = writer
                self._connected.set()
                log.info("worker %s connected to the engine process", self.worker)
                self.on_snapshot(welcome)
                while True:
                    header, payload = await ipc.read_frame(reader)
                    if header.get("op") == "snapshot":
                        self.on_snapshot(header)
                        continue
                    future = self._answers.pop(header.get("id"), None)
                    if future is not None and not future.done():
                        future.set_result((header, payload))
            except (asyncio.IncompleteReadError, ConnectionError, OSError, asyncio.TimeoutError):
                pass
            except Exception:  # a frame this worker cannot follow: the connection starts over
                log.exception("worker %s: the connection to the engine process failed", self.worker)
            finally:
                was_connected = self._writer is not None
                self._writer = None
                self.client = None
                self._connected.clear()
                writer.close()
                self._fail_all()
                if was_connected and not self._closing:
                    log.error("worker %s lost the engine process; answering 503 until it is back", self.worker)
                    self.on_lost()
            await asyncio.sleep(RECONNECT_EVERY_S)

    def _fail_all(self) -> None:
        answers, self._answers = self._answers, {}
        for future in answers.values():
            if not future.done():
                future.set_exception(EngineUnavailable("the engine process went away; retry shortly"))

    # -- frames ------------------------------------------------------------------------------------------------
    def send(self, header: dict[str, Any]) -> None:
        """A frame that gets no answer (dropped while the engine is away: a metric, an outcome)."""
        if self._writer is not None:
            ipc.write_frame(self._writer, header)

    def expect(self, number: int) -> asyncio.Future[tuple[dict[str, Any], bytes]]:
        """The future of the next answer with ``id`` ``number``."""
        future: asyncio.Future[tuple[dict[str, Any], bytes]] = asyncio.get_running_loop().create_future()
        if self._writer is None:
            future.set_exception(EngineUnavailable("the engine process is not reachable; retry shortly"))
        else:
            self._answers[number] = future
        return future

    def number(self) -> int:
        return next(self._ids)

    async def call(self, header: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
        """Send ``header`` and wait for its answer; the engine's ``ServiceError`` is raised here."""
        number = self.number()
        future = self.expect(number)
        if self._writer is not None:
            ipc.write_frame(self._writer, {**header, "id": number})
        answer, payload = await future
        if "error" in answer:
            raise ServiceError.from_wire(answer["error"])
        return answer, payload


class RemoteRoom:
    """Room for a request's images in a model's queue in the engine process (the local ``Reservation``'s
    counterpart): ``run`` writes the pixels into this worker's shared memory and waits for the outputs."""

    def __init__(self, link: EngineLink, number: int, model: str, images: int) -> None:
        self.link = link
        self.number = number
        self.model = model
        self.size = images
        self._ran = False

    def release(self) -> None:
        """Give back room not used (idempotent)."""
        if not self._ran:
            self._ran = True
            self.link.send({"op": "release", "id": self.number})

    async def run(self, arrays: Sequence[np.ndarray], *, timeout: float | None = None,
                  cancel_when: asyncio.Future[object] | None = None,
                  trace: tracing.RequestTrace | None = None,
                  cam: CamWish | None = None) -> list[tuple[np.ndarray, ...]]:
        """``cam``: the classes to explain; the engine process then sends each image's maps (k x h x w) as a
        third output, computed there: the feature map itself never crosses."""
        link = self.link
        first = arrays[0]
        nbytes = first.nbytes
        slots = link.arena.take(nbytes, len(arrays))
        for (segment, slot), array in zip(slots, arrays, strict=False):
            segment.view(slot, nbytes)[:] = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        answer = link.expect(self.number)
        # The slots are the engine's to read until it has answered (outputs, an error, or the withdrawal).
        answer.add_done_callback(lambda _f: link.arena.give_back(slots))
        self._ran = True
        remaining = max(0.0, timeout) if timeout is not None else None
        link.send({"op": "run", "id": self.number, "slots": [[s.id, slot] for s, slot in slots],
                   "shape": list(first.shape), "dtype": str(first.dtype),
                   "timeout": remaining if remaining is not None else 3600.0,
                   "trace": tracing.trace_context(trace),
                   **({} if cam is None else {"cam": cam.to_wire()})})
        waiting: set[asyncio.Future[Any]] = {answer}
        if cancel_when is not None:
            waiting.add(cancel_when)
        try:
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED,
                                         timeout=None if remaining is None else remaining + ANSWER_GRACE_S)
        except asyncio.CancelledError:
            self._withdraw(answer)
            raise
        if answer not in done:
            self._withdraw(answer)
            if cancel_when is not None and cancel_when in done:
                raise ClientGone()
            raise RequestTimeout("request not answered in time (the engine process did not answer)")
        header, payload = answer.result()
        tracing.add_stages(trace, header.get("stages"))  # the queue wait, timed in the engine process
        if "error" in header:
            raise ServiceError.from_wire(header["error"])
        flat = ipc.unpack_arrays(header["outputs"], payload)
        per_image = int(header["per_image"])
        return [tuple(flat[i:i + per_image]) for i in range(0, len(flat), per_image)]

    def _withdraw(self, answer: asyncio.Future[Any]) -> None:
        # The engine answers a withdrawal too (ClientGone), which frees the slots; until then they stay.
        answer.add_done_callback(_consume)
        self.link.send({"op": "withdraw", "id": self.number})


def _connect(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(2.0)
        sock.connect(address)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _consume(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


class RemoteStatistics:
    """A model's statistics in a worker: outcomes go to the engine process, which keeps the numbers."""

    def __init__(self, link: EngineLink, model: str) -> None:
        self.link = link
        self.model = model

    def request_finished(self, duration_s: float, ok: bool) -> None:
        self.link.send({"op": "finished", "model": self.model, "duration": duration_s, "ok": ok})


class RemoteModel(ServedModel):
    """A model of the engine process, as a front-end worker serves it: the same ``serve`` as in one
    process (this worker reads, limits, decodes), with the room and the batch in the engine process."""

    def __init__(self, description: dict[str, Any], server: ServerSettings, link: EngineLink,
                 decode_pool: ThreadPoolExecutor) -> None:
        self._setup(loaded_from_wire(description), server, decode_pool)
        self._owns_decode_pool = False
        self.link = link
        self.instance = description["instance"]
        self.statistics = RemoteStatistics(link, self.name)  # type: ignore[assignment]
        self.batcher = None  # type: ignore[assignment]
        self.follow(description)

    def follow(self, description: dict[str, Any]) -> None:
        """Mirror the engine's state of this model (while the worker itself is not leaving)."""
        if self.lifecycle.phase.shutting_down:
            return
        self.lifecycle.failure = description.get("failure")
        self.lifecycle.set(State(description["state"]))

    @property
    def busy(self) -> bool:
        return bool(self.inflight)

    @asynccontextmanager
    async def room(self, images: int) -> AsyncIterator[RemoteRoom]:
        link = self.link
        if not link.connected:
            raise EngineUnavailable("the engine process is not reachable; retry shortly")
        number = link.number()
        answer = link.expect(number)
        link.send({"op": "reserve", "id": number, "model": self.name, "images": images})
        try:
            header, _ = await asyncio.shield(answer)
        except asyncio.CancelledError:
            # The caller left while the engine decided: room it grants now is given straight back.
            answer.add_done_callback(lambda f: self._release_if_granted(f, number))
            raise
        if "error" in header:
            raise ServiceError.from_wire(header["error"])
        reservation = RemoteRoom(link, number, self.name, images)
        try:
            yield reservation
        finally:
            reservation.release()

    def _release_if_granted(self, answer: asyncio.Future[Any], number: int) -> None:
        if not answer.cancelled() and answer.exception() is None and "error" not in answer.result()[0]:
            self.link.send({"op": "release", "id": number})

    def admit(self):  # noqa: ANN201 - the base class's context manager, refused while the engine is away
        if not self.link.connected and self.state.admits_requests:
            raise EngineUnavailable("the engine process is not reachable; retry shortly")
        return super().admit()

    async def statistics_snapshot(self) -> StatisticsSnapshot:
        answer, _ = await self.link.call({"op": "stats", "model": self.name})
        return StatisticsSnapshot.from_wire(answer["answer"][self.name])

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        await self.drain(self.server.shutdown_drain_s)
        self.lifecycle.set(State.STOPPED)


class RemoteMetrics:
    """The metrics as a worker sees them: each answered request goes to the engine process, the one
    exporter, and the exposition comes from there, so every worker's ``/metrics`` is the whole server's."""

    def __init__(self, link: EngineLink) -> None:
        self.link = link

    def observe_request(self, endpoint: str, status: int, duration_s: float, reject_reason: str | None,
                        trace_id: str | None = None) -> None:
        self.link.send({"op": "observe", "endpoint": endpoint, "status": status, "duration": duration_s,
                        "reason": reject_reason, "trace": trace_id, **_spans_dropped()})

    async def render_for(self, accept: str | None) -> tuple[bytes, str]:
        answer, payload = await self.link.call({"op": "metrics", "accept": accept, **_spans_dropped()})
        return payload, answer["content_type"]


def _spans_dropped() -> dict[str, Any]:
    """The spans this worker's exporter dropped since it last said, for the engine process to count."""
    dropped = tracing.take_dropped()
    return {"spans_dropped": dropped} if dropped else {}


class RemoteRegistry(ServedModels):
    """The engine process's registry as a front-end worker sees it (the doors' ``ServedModels``): the
    models by name from the engine's snapshots, the repository calls forwarded, and this worker's own
    lifecycle (its lame duck and drain) over the engine's state."""

    def __init__(self, server: ServerSettings, address: EngineAddress, decode_threads: int) -> None:
        self.server = server
        self.link = link = EngineLink(address, self._snapshot, self._lost)
        self.metrics = RemoteMetrics(link)
        self.decode_threads = decode_threads
        self._decode_pool = ThreadPoolExecutor(decode_threads, thread_name_prefix="effnet-decode")
        self.models: dict[str, RemoteModel] = {}
        self._default: str | None = None
        self._repository: list[str] = []
        self._engine_state = State.STARTING
        self.lifecycle = Lifecycle(derive=self._derive)

    # -- the engine's snapshots ------------------------------------------------------------------------------
    def _derive(self) -> State:
        if not self.link.connected:
            return State.STARTING
        return self._engine_state

    def _snapshot(self, snapshot: dict[str, Any]) -> None:
        self._engine_state = State(snapshot["state"])
        self.lifecycle.failure = snapshot.get("failure")
        self._default = snapshot.get("default")
        self._repository = list(snapshot.get("repository_models") or [])
        current = {}
        for description in snapshot["models"]:
            name = description["name"]
            model = self.models.get(name)
            if model is None or model.instance != description["instance"]:
                model = RemoteModel(description, self.server, self.link, self._decode_pool)
                if self.lifecycle.phase.shutting_down:
                    model.lifecycle.set(self.lifecycle.phase)
            else:
                model.follow(description)
            current[name] = model
        self.models = current
        self.lifecycle.refresh()

    def _lost(self) -> None:
        self.lifecycle.refresh()

    # -- choosing a model (the registry's rules, ServedModels') ----------------------------------------------
    @property
    def default_name(self) -> str | None:
        return self._default

    def in_repository(self, name: str) -> bool:
        return name in self._repository

    def get(self, name: str | None = None, *, or_first: bool = False) -> RemoteModel:
        if not self.models and not self.link.connected:  # nothing known yet: the engine is not up
            raise EngineUnavailable("the engine process is not reachable; retry shortly")
        return super().get(name, or_first=or_first)  # type: ignore[return-value]

    async def index(self) -> list[dict[str, str]]:
        answer, _ = await self.link.call({"op": "index"})
        return answer["answer"]

    async def load(self, name: str) -> None:
        await self.link.call({"op": "load", "model": name})

    async def unload(self, name: str) -> None:
        await self.link.call({"op": "unload", "model": name})

    # -- lifecycle ---------------------------------------------------------------------------------------------
    async def start(self) -> None:
        # This process's own exporter, from the OTEL_* variables (as load_startup does).
        tracing.setup(detail=self.server.trace_detail)
        await self.link.start()
        if not await self.link.wait_connected(FIRST_CONNECT_S):
            log.warning("worker %s: the engine process is not reachable after %.0f s; serving anyway "
                        "(503 engine_unavailable until it is)", self.link.worker, FIRST_CONNECT_S)
        self.lifecycle.set(State.READY)  # running: the state is now the engine's

    async def close(self) -> None:
        await self.drain(self.server.shutdown_drain_s)
        await self.link.close()
        self._decode_pool.shutdown(wait=False, cancel_futures=True)
        self.lifecycle.set(State.STOPPED)


__all__ = ["EngineAddress", "EngineLink", "RemoteMetrics", "RemoteModel", "RemoteRegistry", "RemoteRoom"]
