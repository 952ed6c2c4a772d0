"""The engine process's side of the wire (``EFFNET_WORKERS`` > 1): the served models, their batchers and
engines, answering the front-end workers.

Each worker holds one control connection (``service.core.ipc``). What it asks, and what the engine does:

- ``reserve`` (model, images): admission and room in that model's queue, decided here where the queue
  is, so the bound stays global and batches form across workers (``ServedModel.ticket``); answered at
  once, 503 when there is no room.
- ``run`` (reservation, slots of the worker's shared memory, timeout, trace context): the images join the
  model's batcher as views of the worker's memory; the answer is the per-image outputs as float32 bytes,
  or the error. ``withdraw`` takes them back out (the caller left); ``release`` gives back room unused.
- ``observe`` (one answered request: endpoint, status, duration): the request metrics, so that this
  process is the one exporter and ``metrics`` on any worker reports the whole server.
- ``stats``, ``index``, ``control`` (load, unload): the statistics and repository extensions.

Every change of the server's or a model's state, and every load or unload, is pushed to every worker as
a ``snapshot`` (the models' descriptions and states), which each worker's registry mirrors. When a
worker's connection closes (it exited or died), everything it held is withdrawn and its shared memory
unmapped.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.core import ipc, tracing
from service.core.cam import CamWish
from service.core.errors import BadRequest, ClientGone, ServiceError
from service.core.metrics import Metrics
from service.core.models import describe_for_wire
from service.core.registry import ModelRegistry
from service.core.runtime import ServedModel

log = logging.getLogger("service.core.engine_host")


@dataclass
class _Client:
    id: int
    writer: asyncio.StreamWriter
    worker: int | None = None
    tickets: dict[int, _Ticket] = field(default_factory=dict)

    def send(self, header: dict[str, Any], payload: bytes = b"") -> None:
        if not self.writer.is_closing():
            ipc.write_frame(self.writer, header, payload)


@dataclass
class _Ticket:
    """One reservation a worker holds: its model, its room, and once running, the task and its cancel."""

    model: ServedModel
    images: int
    context: Any  # the ServedModel.ticket context manager
    room: Any
    started: float
    task: asyncio.Task[None] | None = None
    gone: asyncio.Future[None] | None = None


def _describe(served: ServedModel) -> dict[str, Any]:
    """A served model as the workers mirror it: its loaded model's facts, and where it stands."""
    return {"name": served.name, "instance": id(served),  # a reload makes a new instance under the name
            "state": served.state.value, "failure": served.failure, **describe_for_wire(served.model)}


def _stages(trace: tracing.RequestTrace | None) -> dict[str, Any]:
    """The request's stages timed here (its queue wait), for the worker to put on the request's span."""
    stages = tracing.stages_of(trace)
    return {"stages": stages} if stages else {}


class EngineHost:
    """Serves the workers' connections for ``registry`` (already started) on two abstract Unix sockets:
    ``control`` (frames) and ``segments`` (shared memory hand-overs). ``token``: the secret each worker
    presents."""

    def __init__(self, registry: ModelRegistry, metrics: Metrics, token: str, control: str, segments: str) -> None:
        self.registry = registry
        self.metrics = metrics
        self.token = token
        self.control_address = control
        self.table = ipc.SegmentTable()
        self._clients: dict[int, _Client] = {}
        self._ids = itertools.count(1)
        self.segments = ipc.SegmentListener(segments, token, self.table, lambda client: client in self._clients)
        self._server: asyncio.AbstractServer | None = None
        self._snapshot_pending = False

    # -- life ---------------------------------------------------------------------------------------------------
    async def start(self) -> None:
        self.segments.start()
        self._server = await asyncio.start_unix_server(self._serve, path=self.control_address, limit=1 << 22)
        self.registry.lifecycle.add_listener(lambda _state: self._changed())
        self.registry.on_models_changed(self._changed)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for client in list(self._clients.values()):
            client.writer.close()
        self.segments.close()

    @property
    def workers(self) -> int:
        return len(self._clients)

    # -- snapshots ------------------------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        registry = self.registry
        return {
            "op": "snapshot",
            "state": registry.state.value,
            "failure": registry.failure,
            "default": registry.default_name,
            "repository_models": registry.repository.names() if registry.repository is not None else [],
            "decode_threads": registry.decode_threads,
            "models": [_describe(registry.models[name]) for name in registry.names],
        }

    def _changed(self, *_: object) -> None:
        # Several changes in one turn of the loop (a reload: the new model, the old one's state) make one
        # snapshot.
        if self._snapshot_pending:
            return
        self._snapshot_pending = True
        asyncio.get_running_loop().call_soon(self._broadcast)

    def _broadcast(self) -> None:
        self._snapshot_pending = False
        snapshot = self.snapshot()
        for client in list(self._clients.values()):
            client.send(snapshot)

    # -- one worker ---------------------------------------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock: socket.socket = writer.get_extra_info("socket")
        client: _Client | None = None
        try:
            if ipc.peer_uid(sock) != os.getuid():
                log.warning("refused a connection from another user")
                return
            hello, _ = await asyncio.wait_for(ipc.read_frame(reader), 10)
            if hello.get("op") != "hello" or hello.get("token") != self.token:
                log.warning("refused a connection without the server's token")
                return
            client = _Client(next(self._ids), writer, hello.get("worker"))
            self._clients[client.id] = client
            client.send({"op": "welcome", "client": client.id, **self.snapshot()})
            while True:
                header, payload = await ipc.read_frame(reader)
                self._handle(client, header, payload)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.TimeoutError):
            pass
        except ipc.ProtocolError as exc:
            log.error("worker %s broke the protocol: %s", client.worker if client else "?", exc)
        finally:
            if client is not None:
                self._forget(client)
            writer.close()

    def _forget(self, client: _Client) -> None:
        """A worker's connection closed: withdraw what it queued, give back its room, unmap its memory."""
        self._clients.pop(client.id, None)
        for number in list(client.tickets):
            self._drop(client, number, ClientGone("the worker holding the request went away"))
        self.table.drop(client.id)
        if client.worker is not None:
            log.info("worker %s disconnected", client.worker)

    def _handle(self, client: _Client, header: dict[str, Any], payload: bytes) -> None:
        op = header.get("op")
        number = header.get("id")
        try:
            if "spans_dropped" in header:  # by the worker's trace exporter, counted here with this process's
                tracing.count_reported(header["spans_dropped"])
            if op == "finished":
                self.registry.get(header["model"]).statistics.request_finished(float(header["duration"]),
                                                                              bool(header["ok"]))
            elif op == "observe":
                self.metrics.observe_request(header["endpoint"], int(header["status"]), float(header["duration"]),
                                             header.get("reason"), header.get("trace"))
            elif op == "reserve":
                asyncio.ensure_future(self._reserve(client, number, header))
            elif op == "run":
                self._run(client, number, header)
            elif op == "withdraw":
                ticket = client.tickets.get(number)
                if ticket is not None and ticket.gone is not None and not ticket.gone.done():
                    ticket.gone.set_result(None)
            elif op == "release":
                self._drop(client, number, None)
            else:
                asyncio.ensure_future(self._ask(client, number, header))
        except ServiceError as exc:
            client.send({"id": number, "error": exc.to_wire()})
        except (KeyError, TypeError, ValueError) as exc:
            raise ipc.ProtocolError(f"bad {op!r} frame: {exc}") from None

    async def _reserve(self, client: _Client, number: int, header: dict[str, Any]) -> None:
        try:
            model = self.registry.get(header["model"])
            images = int(header["images"])
            context = model.ticket(images)
            room = await context.__aenter__()
        except ServiceError as exc:
            client.send({"id": number, "error": exc.to_wire()})
            return
        if client.id not in self._clients:  # the worker left while this was decided
            await context.__aexit__(None, None, None)
            return
        client.tickets[number] = _Ticket(model, images, context, room, time.perf_counter())
        client.send({"id": number, "ok": True})

    def _run(self, client: _Client, number: int, header: dict[str, Any]) -> None:
        ticket = client.tickets.get(number)
        if ticket is None or ticket.task is not None:
            raise ipc.ProtocolError(f"run without a reservation ({number})")
        dtype = np.dtype(header["dtype"])
        shape = tuple(int(v) for v in header["shape"])
        arrays = [self.table.view(client.id, int(segment), int(slot), shape, dtype)
                  for segment, slot in header["slots"]]
        ticket.gone = asyncio.get_running_loop().create_future()
        trace = tracing.remote_trace(header.get("trace"))
        cam = CamWish.from_wire(header.get("cam"))
        ticket.task = asyncio.ensure_future(self._infer(client, number, ticket, arrays, float(header["timeout"]),
                                                        trace, cam))

    async def _infer(self, client: _Client, number: int, ticket: _Ticket, arrays: list[np.ndarray],
                     timeout: float, trace: tracing.RequestTrace | None, cam: CamWish | None = None) -> None:
        try:
            if len(arrays) > ticket.images:
                raise BadRequest(f"{len(arrays)} images sent for {ticket.images} reserved")
            if arrays and arrays[0].dtype not in (np.uint8, np.float32):
                raise ipc.ProtocolError(f"pixels of {arrays[0].dtype}")  # the worker checked values already
            gone = ticket.gone
            if cam is not None:  # checked here too: a worker's word is data
                ticket.model.check_wish(cam)
            # With a wish, each image's class activation maps are made here (ServedModel._run_batch) and only
            # they go back, as a third output beside the features and logits.
            outputs = await ticket.room.run(arrays, timeout=timeout, cancel_when=gone, trace=trace,
                                            **({} if cam is None else {"cam": cam}))
            described, payload = ipc.pack_arrays(a for per_image in outputs for a in per_image)
            client.send({"id": number, "outputs": described, "per_image": len(outputs[0]) if outputs else 0,
                         **_stages(trace)}, payload)
        except ServiceError as exc:
            client.send({"id": number, "error": exc.to_wire(), **_stages(trace)})
        except Exception as exc:  # pragma: no cover - the batcher maps engine failures already
            log.exception("request %s of worker %s failed", number, client.worker)
            client.send({"id": number, "error": ServiceError(f"internal error ({type(exc).__name__})").to_wire()})
        finally:
            # The request's outcome in the statistics is the worker's to note (``finished``): it timed the
            # whole request, reading and parsing included, as a one-process server does.
            await self._close_ticket(client, number)

    def _drop(self, client: _Client, number: int, error: ServiceError | None) -> None:
        ticket = client.tickets.get(number)
        if ticket is None:
            return
        if ticket.task is not None:
            if ticket.gone is not None and not ticket.gone.done():
                ticket.gone.set_result(None)  # the run ends with ClientGone and closes the ticket itself
            return
        asyncio.ensure_future(self._close_ticket(client, number))

    async def _close_ticket(self, client: _Client, number: int) -> None:
        ticket = client.tickets.pop(number, None)
        if ticket is not None:
            await ticket.context.__aexit__(None, None, None)

    # -- questions ------------------------------------------------------------------------------------------------
    async def _ask(self, client: _Client, number: int, header: dict[str, Any]) -> None:
        op = header.get("op")
        try:
            if op == "metrics":
                body, content_type = self.metrics.exposition(header.get("accept"))
                client.send({"id": number, "content_type": content_type}, body)
                return
            answer = await self._answer(op, header)
        except ServiceError as exc:
            client.send({"id": number, "error": exc.to_wire()})
            return
        client.send({"id": number, "answer": answer})

    async def _answer(self, op: str | None, header: dict[str, Any]) -> Any:
        registry = self.registry
        if op == "stats":
            name = header.get("model")
            chosen = [registry.get(name)] if name else [registry.get(n) for n in registry.names]
            return {model.name: model.statistics.snapshot().to_wire() for model in chosen}
        if op == "index":
            return await registry.index()
        if op == "load":
            await registry.load(header["model"])
            return None
        if op == "unload":
            await registry.unload(header["model"])
            return None
        raise ipc.ProtocolError(f"unknown operation {op!r}")


__all__ = ["EngineHost"]
