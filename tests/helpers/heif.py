"""HEIC/HEIF and AVIF payloads made in the tests: real photos re-encoded (pillow-heif for HEIC, Pillow's own
libavif plugin for AVIF), an iPhone-style HEIC, and hand-edited headers for the hostile cases."""

from __future__ import annotations

import io
import struct

import numpy as np
import pillow_heif
from PIL import Image

ORIENTATION, MAKE, MODEL = 0x0112, 0x010F, 0x0110


def _save(image: Image.Image, fmt: str, **kwargs) -> bytes:
    import service.core.imaging  # noqa: F401 - registers the HEIF opener (and saver) with Pillow

    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def to_heic(image: Image.Image, *, quality: int = 90, **kwargs) -> bytes:
    """``image`` as a HEIC file (HEVC in a HEIF container), written by libheif through pillow-heif."""
    return _save(image, "HEIF", quality=quality, **kwargs)


def to_avif(image: Image.Image, *, quality: int = 90, **kwargs) -> bytes:
    """``image`` as an AVIF file (AV1 in a HEIF container), written by Pillow's libavif plugin."""
    return _save(image, "AVIF", quality=quality, **kwargs)


def iphone_style_heic(upright: Image.Image, *, quality: int = 90, tile: int = 256) -> bytes:
    """What an iPhone held upright writes: the pixels stored as the sensor saw them (rotated a quarter
    turn), EXIF orientation 6 ("rotate 90 degrees clockwise to display") *and* the equivalent HEIF
    ``irot`` transform, and the picture coded as a grid of tiles (the iPhone uses 512-pixel tiles)."""
    stored = upright.convert("RGB").rotate(90, expand=True)  # counter-clockwise: display turns it back
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    exif[MAKE] = "Apple"
    exif[MODEL] = "iPhone 15 Pro"
    previous = pillow_heif.options.GRID_TILE_SIZE
    pillow_heif.options.GRID_TILE_SIZE = tile
    try:
        return to_heic(stored, quality=quality, exif=exif.tobytes())
    finally:
        pillow_heif.options.GRID_TILE_SIZE = previous


def heic_10_bit(values: np.ndarray) -> bytes:
    """A 10-bit HEIC from 16-bit RGB ``values`` (H, W, 3): libheif keeps the top 10 bits."""
    assert values.dtype == np.uint16 and values.ndim == 3
    height, width = values.shape[:2]
    heif = pillow_heif.from_bytes(mode="RGB;16", size=(width, height), data=values.tobytes())
    buffer = io.BytesIO()
    heif.save(buffer, quality=-1)  # lossless
    return buffer.getvalue()


def boxes(data: bytes) -> set[bytes]:
    """The four-letter box types that occur anywhere in ``data`` (a rough check of what a file holds)."""
    known = (b"ftyp", b"meta", b"iprp", b"ipco", b"ispe", b"irot", b"imir", b"grid", b"clap", b"Exif")
    return {kind for kind in known if kind in data}


def declaring(data: bytes, width: int, height: int) -> bytes:
    """``data`` with every ``ispe`` (image spatial extents) property rewritten to ``width`` x ``height``:
    the header claims a huge picture while the coded data stays a few hundred bytes."""
    out = bytearray(data)
    position = out.find(b"ispe")
    assert position != -1, "no ispe box"
    while position != -1:
        struct.pack_into(">II", out, position + 8, width, height)  # after the type and version/flags
        position = out.find(b"ispe", position + 4)
    return bytes(out)


# Two classes closer than this (in probability) are a tie that any lossy re-encoding may flip: chelsea.jpg
# is tiger cat 0.38 / Egyptian cat 0.35 under Lite0, and AVIF at quality 90 gives 0.366 / 0.368.
TIE = 0.05


def top_k(logits: np.ndarray, k: int = 5) -> list[tuple[int, float]]:
    """(class, probability) of the ``k`` most likely classes, from one row of logits."""
    logits = np.asarray(logits, dtype=np.float64)
    probabilities = np.exp(logits - logits.max())
    probabilities /= probabilities.sum()
    order = np.argsort(-probabilities)[:k]
    return [(int(i), float(probabilities[i])) for i in order]


def assert_same_top1(reference: list[tuple[int, float]], other: list[tuple[int, float]], what: str = "") -> None:
    """``other`` (a re-encoded photo's top-k) has the top-1 of ``reference`` (its JPEG original's); the only
    exception allowed is a tie in the reference (its first two within ``TIE``) resolved the other way,
    and then ``other``'s first two must be the same two classes, also within ``TIE``."""
    if other[0][0] == reference[0][0]:
        return
    first, second = reference[0], reference[1]
    assert first[1] - second[1] < TIE, f"{what}: top-1 {other[0]} instead of {first} (no tie: {second})"
    assert {other[0][0], other[1][0]} == {first[0], second[0]}, f"{what}: {other[:2]} vs {reference[:2]}"
    assert other[0][1] - other[1][1] < TIE, f"{what}: {other[:2]} is not a tie"
