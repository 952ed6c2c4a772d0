"""The real test photos (``tests/data/``) and hand-built image payloads."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "data"
# The real photos, in sorted order (the order the benchmarks have always cycled through them).
PHOTO_NAMES = ("chelsea.jpg", "coffee.jpg", "grace_hopper.jpg")


def load_photos(names: Iterable[str] = PHOTO_NAMES) -> dict[str, bytes]:
    """The bytes of the test photos by file name, in the order of ``names``."""
    return {name: (DATA / name).read_bytes() for name in names}


def png_declaring(width: int, height: int, rows: int = 1) -> bytes:
    """A valid-looking RGB PNG header declaring ``width`` x ``height``, followed by a zlib stream of only
    ``rows`` rows of pixels: a few KB that would inflate to width*height*3 bytes if decoded."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * ((3 * width + 1) * rows), 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def solid_jpeg(size: tuple[int, int] = (64, 48), colour: tuple[int, int, int] = (120, 80, 40)) -> bytes:
    """A small one-colour JPEG: a valid image for tests about everything but the pixels."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="JPEG")
    return buffer.getvalue()
