"""Fuzzing image decoding: whatever the bytes, ``Preprocessor`` (decode + EXIF + mode conversion +
resize/crop/normalise) either returns a (3, 224, 224) uint8 array or raises one of the errors
``service.core.imaging`` declares: ``InvalidImage`` (400) or ``ImageTooLarge`` (413). Never anything else: no
OSError, no SyntaxError, no struct.error, no MemoryError, no numpy error escapes to become a 500.

Three generators, each with a fixed, derandomised number of examples (counted and checked at the end):
arbitrary bytes; real photos and small encodings of them in every accepted format, mutated (bytes
overwritten, inserted, deleted, truncated, blocks duplicated); and PNGs whose header fields are random but
whose checksums are right, so the decoder gets past the CRC checks to the interesting parts.
(tests/unit/test_service_imaging.py has two smaller fuzz tests on synthetic noise images.)
"""

from __future__ import annotations

import io
import struct
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from model import get_efficientnet_config
from service.core.errors import ImageTooLarge, InvalidImage, ServiceError
from service.core.imaging import Preprocessor
from tests.helpers.images import encode

# Pillow warns about every corrupt EXIF block.
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]

EXAMPLES = 300
MAX_PIXELS = 4_000_000  # small, so huge-but-allowed declared sizes stay cheap to try
DATA = Path(__file__).resolve().parent.parent / "data"

PREPROCESS = Preprocessor(get_efficientnet_config("efficientnet-lite0").preprocess, max_pixels=MAX_PIXELS)
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
OUTCOMES: Counter[str] = Counter()


def _seeds() -> list[bytes]:
    photos = [(DATA / name).read_bytes() for name in ("coffee.jpg", "chelsea.jpg")]
    small = Image.open(io.BytesIO(photos[0])).convert("RGB").resize((48, 32))
    exif = Image.Exif()
    exif[0x0112] = 6
    return [
        *photos,
        encode(small, "JPEG", quality=80, exif=exif.tobytes()),
        encode(small, "JPEG", progressive=True),
        encode(small, "PNG"),
        encode(small.convert("P"), "PNG", transparency=3),
        encode(Image.fromarray(np.asarray(small.convert("L")).astype(np.uint16) * 257), "PNG"),
        encode(small, "GIF", save_all=True, append_images=[small.rotate(90)]),
        encode(small, "WEBP"),
        encode(small, "BMP"),
        encode(small, "TIFF", compression="tiff_lzw"),
        encode(small.convert("CMYK"), "JPEG"),
    ]


SEEDS = _seeds()


def check(data: bytes, kind: str) -> None:
    """The property: a good array, or a declared error with its status."""
    try:
        array = PREPROCESS(data)
    except (InvalidImage, ImageTooLarge) as exc:
        assert isinstance(exc, ServiceError) and exc.status_code in (400, 413)
        assert exc.message
        OUTCOMES[f"{kind}: {type(exc).__name__}"] += 1
        return
    assert array.shape == (3, 224, 224) and array.dtype == np.uint8 and array.flags.c_contiguous
    OUTCOMES[f"{kind}: decoded"] += 1


@FUZZ
@given(st.binary(max_size=4096))
def test_arbitrary_bytes(data):
    check(data, "arbitrary")


@st.composite
def mutated(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        # Headers are where parsers branch: aim half of the edits at the first 256 bytes.
        limit = min(len(data), 256) if draw(st.booleans()) else len(data)
        position = draw(st.integers(0, max(0, limit - 1)))
        operation = draw(st.sampled_from(["overwrite", "insert", "delete", "truncate", "duplicate", "flip"]))
        if operation == "overwrite":
            data[position : position + 4] = draw(st.binary(min_size=1, max_size=4))
        elif operation == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=16))
        elif operation == "delete":
            del data[position : position + draw(st.integers(1, 64))]
        elif operation == "truncate":
            del data[max(1, position) :]
        elif operation == "duplicate":
            data[position:position] = data[position : position + draw(st.integers(1, 512))]
        elif data:
            data[position % len(data)] ^= 1 << draw(st.integers(0, 7))
    return bytes(data)


@FUZZ
@given(mutated())
def test_mutated_real_images(data):
    check(data, "mutated")


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


_VALID_DEPTHS = {0: [1, 2, 4, 8, 16], 2: [8, 16], 3: [1, 2, 4, 8], 4: [8, 16], 6: [8, 16]}


@st.composite
def png_with_random_header(draw) -> bytes:
    # Half the headers are well-formed (a small size, a bit depth the colour type allows, no interlace
    # trouble), so the decoder is reached often and not only the header checks; the rest are anything.
    well_formed = draw(st.booleans())
    colour = draw(st.sampled_from([0, 2, 3, 4, 6] if well_formed else [0, 2, 3, 4, 6, 1, 5, 7]))
    if well_formed:
        width, height = draw(st.integers(1, 64)), draw(st.integers(1, 64))
        depth = draw(st.sampled_from(_VALID_DEPTHS[colour]))
    else:
        width = draw(st.one_of(st.integers(0, 64), st.integers(0, 2**31 - 1)))
        height = draw(st.one_of(st.integers(0, 64), st.integers(0, 2**31 - 1)))
        depth = draw(st.sampled_from([8, 8, 16, 1, 2, 4, 0, 3, 32]))
    interlace = draw(st.sampled_from([0, 1, 2]))
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, interlace)
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}.get(colour)
    if channels and 0 < width * height <= 4096 and (well_formed or draw(st.booleans())):
        # Pixel data of exactly the declared size (random filter byte per row): decodable more often.
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        row = -(-width * channels * depth // 8)
        rows = rng.integers(0, 256, (height, row + 1), dtype=np.uint8)
        rows[:, 0] = rng.integers(0, 5, height)
        raw = rows.tobytes()
    else:
        raw = draw(st.binary(max_size=64)) * draw(st.integers(0, 64))
    chunks = [_chunk(b"IHDR", ihdr)]
    if colour == 3 or draw(st.booleans()):
        chunks.append(_chunk(b"PLTE", draw(st.binary(min_size=0, max_size=48))))
    if draw(st.booleans()):
        chunks.append(_chunk(b"tRNS", draw(st.binary(max_size=16))))
    chunks.append(_chunk(b"IDAT", zlib.compress(raw)))
    chunks.append(_chunk(b"IEND", b""))
    return b"\x89PNG\r\n\x1a\n" + b"".join(chunks)


@FUZZ
@given(png_with_random_header())
def test_pngs_with_random_headers_and_valid_checksums(data):
    check(data, "png-header")


def test_the_fuzzers_ran_their_examples():
    totals = Counter()
    for key, count in OUTCOMES.items():
        totals[key.split(":")[0]] += count
    if not totals:
        pytest.skip("the fuzz tests did not run in this session (deselected)")
    print(f"\nimage fuzzing outcomes: {dict(sorted(OUTCOMES.items()))}")
    for kind in ("arbitrary", "mutated", "png-header"):
        assert totals[kind] >= EXAMPLES, (kind, totals)
    # The mutations are not all rejected at the first byte: some still decode, and both errors occur.
    assert OUTCOMES["mutated: decoded"] > 0 and OUTCOMES["mutated: InvalidImage"] > 0
    assert OUTCOMES["png-header: ImageTooLarge"] > 0 and OUTCOMES["png-header: decoded"] > 0
