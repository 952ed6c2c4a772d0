"""The wire between front-end workers and the engine process, without processes: frames, the outputs'
packing, and shared memory slots written by one side and read by the other (``service.core.ipc``)."""

from __future__ import annotations

import asyncio
import os

import numpy as np
import pytest

from service.core import ipc
from service.core.errors import InvalidImage, QueueFull, ServiceError


def test_frames_round_trip_and_refuse_oversized_headers():
    async def main():
        reader = asyncio.StreamReader()
        for part in ipc.encode_frame({"op": "run", "id": 7, "slots": [[1, 2]]}, b"\x00\x01payload"):
            reader.feed_data(bytes(part))
        header, payload = await ipc.read_frame(reader)
        assert header == {"op": "run", "id": 7, "slots": [[1, 2]]} and payload == b"\x00\x01payload"
        huge = asyncio.StreamReader()
        huge.feed_data(ipc._FRAME.pack(ipc.MAX_HEADER_BYTES + 1, 0))
        with pytest.raises(ipc.ProtocolError):
            await ipc.read_frame(huge)
        truncated = asyncio.StreamReader()
        truncated.feed_data(ipc._FRAME.pack(10, 0) + b"{}")
        truncated.feed_eof()
        with pytest.raises(asyncio.IncompleteReadError):
            await ipc.read_frame(truncated)

    asyncio.run(main())


def test_outputs_pack_and_unpack_exactly():
    rng = np.random.default_rng(1)
    arrays = [rng.normal(size=1280).astype(np.float32), rng.normal(size=1000).astype(np.float32),
              np.zeros(0, dtype=np.float32)]
    described, payload = ipc.pack_arrays(arrays)
    back = ipc.unpack_arrays(described, payload)
    assert all(np.array_equal(a, b) for a, b in zip(arrays, back, strict=True))
    with pytest.raises(ipc.ProtocolError):
        ipc.unpack_arrays(described, payload + b"\x00" * 4)


def test_pixels_written_into_a_workers_slots_are_read_by_the_engine_side():
    """The worker's arena takes slots and writes pixels; the engine side maps the same memfd (its fd
    handed over, here directly) and reads them back as arrays; slots are reused once given back."""
    table = ipc.SegmentTable()

    def register(segment: ipc.Segment) -> None:  # what the segment listener does with the fd it receives
        table.add(5, segment.id, os.dup(segment.fd), segment.slot_bytes * segment.slots, segment.slot_bytes)

    arena = ipc.Arena(register)
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 256, size=(3, 224, 224), dtype=np.uint8) for _ in range(40)]
    slots = arena.take(images[0].nbytes, len(images))
    assert len({(s.id, i) for s, i in slots}) == 40 and len(arena.segments) == 1  # one segment of 40
    (extra, extra_slot), = arena.take(images[0].nbytes, 1)  # none free: the arena grows
    assert len(arena.segments) == 2 and extra.id != slots[0][0].id
    for (segment, slot), image in zip(slots, images, strict=True):
        segment.view(slot, image.nbytes)[:] = image.reshape(-1)
    for (segment, slot), image in zip(slots, images, strict=True):
        seen = table.view(5, segment.id, slot, (3, 224, 224), np.dtype(np.uint8))
        assert np.array_equal(seen, image)
    floats = rng.normal(size=(3, 224, 224)).astype(np.float32)
    (segment, slot), = arena.take(floats.nbytes, 1)  # a float tensor needs a bigger slot: a new pool
    segment.view(slot, floats.nbytes)[:] = floats.reshape(-1).view(np.uint8)
    assert np.array_equal(table.view(5, segment.id, slot, floats.shape, np.dtype(np.float32)), floats)
    arena.give_back(slots)
    again = arena.take(images[0].nbytes, 8)
    assert {(s.id, i) for s, i in again} <= {(s.id, i) for s, i in slots}  # reused, no new segment
    with pytest.raises(ipc.ProtocolError):
        table.view(5, segment.id, slot, (3, 512, 512), np.dtype(np.float32))  # more than a slot holds
    with pytest.raises(ipc.ProtocolError):
        table.view(6, segment.id, slot, (3, 224, 224), np.dtype(np.uint8))  # another worker's: unknown
    table.drop(5)
    assert table.clients() == set()
    arena.close()


def test_service_errors_cross_with_their_class_status_and_image():
    for error in (QueueFull("queue full"), InvalidImage("not an image").about_image(1)):
        back = ServiceError.from_wire(error.to_wire())
        assert type(back) is type(error)
        assert (back.status_code, back.code, back.message, back.headers, back.image_index) == (
            error.status_code, error.code, error.message, error.headers, error.image_index)
