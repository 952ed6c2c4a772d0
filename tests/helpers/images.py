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


def solid_png(colour: tuple[int, int, int], size: tuple[int, int] = (32, 32)) -> bytes:
    """A small one-colour PNG (the colour tells a test which image a batch held)."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def encode(image, fmt: str, **save_args) -> bytes:
    """A PIL image encoded as ``fmt`` (Pillow's format name) with ``save_args``."""
    import io

    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_args)
    return buffer.getvalue()


def solid_jpeg(size: tuple[int, int] = (64, 48), colour: tuple[int, int, int] = (120, 80, 40)) -> bytes:
    """A small one-colour JPEG: a valid image for tests about everything but the pixels."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def float_preprocessed(photo: bytes, mean, std, size: int = 224):
    """A client's own float preprocessing, as torch users write it: the photo as a float tensor, an
    antialiased bicubic resize of that tensor (``torch.nn.functional.interpolate``) to ``size`` x ``size``,
    normalised with ``mean``/``std``. The values lie on no 8-bit grid. Returns float32 (1, 3, size, size)."""
    import io

    import numpy as np
    import torch
    from PIL import Image

    image = np.asarray(Image.open(io.BytesIO(photo)).convert("RGB"), dtype=np.float32) / np.float32(255)
    x = torch.from_numpy(image).permute(2, 0, 1)[None]
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return ((x - m) / s).contiguous().numpy()
