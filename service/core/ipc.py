"""The wire between the server's front-end workers and its engine process (``EFFNET_WORKERS`` > 1).

Two kinds of traffic, both over Unix sockets in Linux's abstract namespace (no socket file exists, so
none can outlive the server):

- Control frames on one stream connection per worker: ``[u32 header length][u32 payload length][JSON
  header][payload]``. Headers are small JSON objects (never pickled: a frame is data, whoever sent it);
  payloads carry the engine's outputs as raw float32 bytes.
- Pixels in shared memory: each worker decodes into slots of its own ``memfd`` segments (anonymous
  memory: nothing appears in ``/dev/shm``, and the kernel frees a segment when the last process holding
  it exits, ``kill -9`` included). A segment's file descriptor is handed to the engine once, over a second
  socket, with ``SCM_RIGHTS``; after that a request's images cross as (segment, offset) pairs, never as
  bytes in a frame.

Both sockets accept only processes of the server's own user (``SO_PEERCRED``) that present the server's
random token: an abstract socket has no file permissions of its own.
"""

from __future__ import annotations

import asyncio
import json
import mmap
import os
import socket
import struct
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

_FRAME = struct.Struct("<II")
MAX_HEADER_BYTES = 1 << 20
MAX_PAYLOAD_BYTES = 1 << 30


class ProtocolError(Exception):
    """A frame that breaks the wire's rules (the connection is closed)."""


def socket_address(name: str) -> str:
    """An address in the abstract namespace (a leading NUL byte: no file on disk)."""
    return "\0" + name


# -- control frames -------------------------------------------------------------------------------------------
def encode_frame(header: dict[str, Any], payload: bytes | memoryview = b"") -> list[bytes | memoryview]:
    head = json.dumps(header, separators=(",", ":")).encode()
    return [_FRAME.pack(len(head), len(payload)), head, payload]


def write_frame(writer: asyncio.StreamWriter, header: dict[str, Any], payload: bytes | memoryview = b"") -> None:
    writer.writelines(encode_frame(header, payload))


async def read_frame(reader: asyncio.StreamReader) -> tuple[dict[str, Any], bytes]:
    """The next frame; ``asyncio.IncompleteReadError`` when the peer has closed."""
    head_len, payload_len = _FRAME.unpack(await reader.readexactly(_FRAME.size))
    if head_len > MAX_HEADER_BYTES or payload_len > MAX_PAYLOAD_BYTES:
        raise ProtocolError(f"frame of {head_len} + {payload_len} bytes is over the limit")
    header = json.loads(await reader.readexactly(head_len))
    if not isinstance(header, dict):
        raise ProtocolError("a frame's header must be a JSON object")
    payload = await reader.readexactly(payload_len) if payload_len else b""
    return header, payload


def peer_uid(sock: socket.socket) -> int:
    """The user id of the process at the other end of a Unix socket."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


# -- outputs: float32 arrays in a payload -------------------------------------------------------------------------
def pack_arrays(arrays: Iterable[np.ndarray]) -> tuple[list[dict[str, Any]], bytes]:
    """Arrays as (descriptions, one payload): float32 C order, described by shape."""
    described, chunks = [], []
    for array in arrays:
        data = np.ascontiguousarray(array, dtype=np.float32)
        described.append({"shape": list(data.shape)})
        chunks.append(data.tobytes())
    return described, b"".join(chunks)


def unpack_arrays(described: list[dict[str, Any]], payload: bytes) -> list[np.ndarray]:
    out, offset = [], 0
    for entry in described:
        shape = tuple(int(v) for v in entry["shape"])
        count = int(np.prod(shape)) if shape else 1
        out.append(np.frombuffer(payload, dtype=np.float32, count=count, offset=offset).reshape(shape))
        offset += count * 4
    if offset != len(payload):
        raise ProtocolError(f"outputs describe {offset} bytes, the payload holds {len(payload)}")
    return out


# -- shared memory: the worker's side -----------------------------------------------------------------------------
@dataclass
class Segment:
    """One memfd segment of equal slots."""

    id: int
    fd: int
    slot_bytes: int
    slots: int
    memory: mmap.mmap
    free: list[int]

    def view(self, slot: int, nbytes: int) -> np.ndarray:
        return np.frombuffer(self.memory, dtype=np.uint8, count=nbytes, offset=slot * self.slot_bytes)


class Arena:
    """A worker's shared memory: segments of equal slots, one pool per slot size, grown on demand.

    ``register(segment)`` hands a new segment to the engine (blocking; called before the segment is
    used). Slots are taken by ``take`` and given back by ``give_back``; a segment is never shrunk (the
    arena keeps the high-water mark of images a worker had in flight)."""

    SLOTS_PER_SEGMENT = 32

    def __init__(self, register) -> None:  # noqa: ANN001 - a callable (Segment) -> None
        self._register = register
        self._segments: dict[int, Segment] = {}
        self._lock = threading.Lock()
        self._next_id = 0

    @property
    def segments(self) -> list[Segment]:
        return list(self._segments.values())

    def take(self, nbytes: int, count: int) -> list[tuple[Segment, int]]:
        """``count`` slots of at least ``nbytes`` each."""
        taken: list[tuple[Segment, int]] = []
        with self._lock:
            for segment in self._segments.values():
                while segment.slot_bytes >= nbytes and segment.free and len(taken) < count:
                    taken.append((segment, segment.free.pop()))
        while len(taken) < count:
            segment = self._grow(nbytes, max(self.SLOTS_PER_SEGMENT, count - len(taken)))
            with self._lock:
                while segment.free and len(taken) < count:
                    taken.append((segment, segment.free.pop()))
        return taken

    def give_back(self, slots: Iterable[tuple[Segment, int]]) -> None:
        with self._lock:
            for segment, slot in slots:
                segment.free.append(slot)

    def _grow(self, nbytes: int, slots: int) -> Segment:
        # Slot sizes rounded up to a page, so a model of another input size reuses a pool when it fits.
        slot_bytes = -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE
        with self._lock:
            self._next_id += 1
            segment_id = self._next_id
        fd = os.memfd_create(f"effnet-pixels-{segment_id}", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, slot_bytes * slots)
            memory = mmap.mmap(fd, slot_bytes * slots)
        except BaseException:
            os.close(fd)
            raise
        segment = Segment(segment_id, fd, slot_bytes, slots, memory, list(range(slots - 1, -1, -1)))
        self._register(segment)
        with self._lock:
            self._segments[segment_id] = segment
        return segment

    def close(self) -> None:
        with self._lock:
            segments, self._segments = list(self._segments.values()), {}
        for segment in segments:
            try:
                segment.memory.close()
            except BufferError:  # a view is still alive; the mapping goes with it
                pass
            os.close(segment.fd)


def send_segment(address: str, token: str, client: int, segment: Segment, timeout: float = 10.0) -> None:
    """Hand ``segment``'s file descriptor to the engine (its segment listener); blocking."""
    header = json.dumps({"token": token, "client": client, "segment": segment.id,
                         "slot_bytes": segment.slot_bytes, "slots": segment.slots}).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(address)
        socket.send_fds(sock, [header], [segment.fd])
        answer = sock.recv(64)
    if answer != b"ok":
        raise ConnectionError(f"the engine refused shared memory segment {segment.id}: {answer!r}")


# -- shared memory: the engine's side ----------------------------------------------------------------------------
class SegmentTable:
    """The segments each connected worker has handed over, mapped read-only, by (client, segment)."""

    def __init__(self) -> None:
        self._maps: dict[tuple[int, int], tuple[mmap.mmap, int]] = {}
        self._lock = threading.Lock()

    def add(self, client: int, segment: int, fd: int, size: int, slot_bytes: int) -> None:
        try:
            memory = mmap.mmap(fd, size, prot=mmap.PROT_READ)
        finally:
            os.close(fd)  # the mapping keeps the memory; the descriptor is not needed any more
        with self._lock:
            self._maps[(client, segment)] = (memory, slot_bytes)

    def view(self, client: int, segment: int, slot: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        with self._lock:
            entry = self._maps.get((client, segment))
        if entry is None:
            raise ProtocolError(f"unknown shared memory segment {segment}")
        memory, slot_bytes = entry
        count = int(np.prod(shape))
        if count * dtype.itemsize > slot_bytes or slot < 0 or (slot + 1) * slot_bytes > len(memory):
            raise ProtocolError(f"slot {slot} of segment {segment} cannot hold {shape} {dtype}")
        return np.frombuffer(memory, dtype=dtype, count=count, offset=slot * slot_bytes).reshape(shape)

    def drop(self, client: int) -> None:
        """Unmap every segment of a worker that has gone (views still alive keep theirs until freed)."""
        with self._lock:
            gone = [key for key in self._maps if key[0] == client]
            entries = [self._maps.pop(key) for key in gone]
        for memory, _ in entries:
            try:
                memory.close()
            except BufferError:
                pass

    def clients(self) -> set[int]:
        with self._lock:
            return {client for client, _ in self._maps}


class SegmentListener:
    """The engine's blocking listener for segment hand-overs (a thread): checks the peer's user and the
    token, maps the segment, answers "ok"."""

    def __init__(self, address: str, token: str, table: SegmentTable, known_client) -> None:  # noqa: ANN001
        self.table = table
        self.token = token
        self.known_client = known_client  # (client id) -> bool: a control connection of that id is open
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(address)
        self.sock.listen(64)
        self._thread = threading.Thread(target=self._serve, name="effnet-segments", daemon=True)
        self._closed = False

    def start(self) -> None:
        self._thread.start()

    def _serve(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                try:
                    self._one(conn)
                except Exception:  # a bad hand-over fails that worker's request, not the listener
                    try:
                        conn.sendall(b"refused")
                    except OSError:
                        pass

    def _one(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        if peer_uid(conn) != os.getuid():
            conn.sendall(b"refused: user")
            return
        message, fds, _, _ = socket.recv_fds(conn, 4096, 1)
        header = json.loads(message)
        if header.get("token") != self.token or not fds or not self.known_client(int(header["client"])):
            for fd in fds:
                os.close(fd)
            conn.sendall(b"refused: token")
            return
        size = int(header["slot_bytes"]) * int(header["slots"])
        self.table.add(int(header["client"]), int(header["segment"]), fds[0], size, int(header["slot_bytes"]))
        conn.sendall(b"ok")

    def close(self) -> None:
        self._closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


__all__ = ["Arena", "ProtocolError", "Segment", "SegmentListener", "SegmentTable", "encode_frame", "pack_arrays",
           "peer_uid", "read_frame", "send_segment", "socket_address", "unpack_arrays", "write_frame"]
