"""Decoding cost per image by format: JPEG, HEIC and AVIF at 0.2, 12 and 48 megapixels.

One real photo (tests/data/coffee.jpg) scaled with bicubic resampling to each size, then written as
JPEG (quality 92), HEIC (pillow-heif/x265, quality 90, 512-pixel grid tiles as an iPhone writes them,
preset ``ultrafast`` so a 48 MP file is made in seconds) and AVIF (Pillow/libavif, quality 90, speed 8).
Each file goes through the service's own ``decode_image`` as the Lite0 preprocessor calls it (JPEG draft
decoding down to twice the resize target; HEVC and AV1 have no reduced decode, so they decode in full),
and through the whole preprocessing (decode, resize, centre crop to uint8). Reported: the median wall
time per image and the CPU time of this process per image (all threads: libheif decodes grid tiles on up
to 4 threads, libavif on every core, libjpeg on one). The JPEG full decode (no draft) is shown beside.

    python -m benchmarks.bench_decode_formats [--sizes 0.2 12 48] [--seconds 3]
"""

from __future__ import annotations

import argparse
import io
import math
import statistics
import time

import pillow_heif
from PIL import Image

from model import get_efficientnet_config
from service.core.imaging import DRAFT_OVERSAMPLE, Preprocessor, decode_image

from .common import SUMMARY_MARKER, machine, markdown_table, save_json

MAX_PIXELS = 100_000_000


def photo_at(megapixels: float) -> Image.Image:
    from tests.helpers.images import DATA

    source = Image.open(DATA / "coffee.jpg").convert("RGB")
    scale = math.sqrt(megapixels * 1e6 / (source.width * source.height))
    return source.resize((round(source.width * scale), round(source.height * scale)), Image.Resampling.BICUBIC)


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    if fmt == "JPEG":
        image.save(buffer, "JPEG", quality=92)
    elif fmt == "HEIC":
        previous = pillow_heif.options.GRID_TILE_SIZE
        pillow_heif.options.GRID_TILE_SIZE = 512
        try:
            image.save(buffer, "HEIF", quality=90, enc_params={"preset": "ultrafast"})
        finally:
            pillow_heif.options.GRID_TILE_SIZE = previous
    else:
        image.save(buffer, "AVIF", quality=90, speed=8)
    return buffer.getvalue()


def measure(fn, seconds: float) -> tuple[float, float, int]:
    """Median wall ms and mean CPU ms (this process, all threads) per call, and the number of calls."""
    fn()  # warm-up (libraries loaded, caches)
    walls: list[float] = []
    cpu_start, started = time.process_time(), time.perf_counter()
    while len(walls) < 3 or time.perf_counter() - started < seconds:
        t0 = time.perf_counter()
        fn()
        walls.append(time.perf_counter() - t0)
    cpu = time.process_time() - cpu_start
    return statistics.median(walls) * 1e3, cpu / len(walls) * 1e3, len(walls)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[0.2, 12, 48], metavar="MP")
    parser.add_argument("--seconds", type=float, default=3.0, help="minimum time per measurement")
    args = parser.parse_args()

    spec = get_efficientnet_config("efficientnet-lite0").preprocess
    preprocess = Preprocessor(spec, max_pixels=MAX_PIXELS)
    min_size = DRAFT_OVERSAMPLE * spec.resize_size
    rows = []
    for megapixels in args.sizes:
        image = photo_at(megapixels)
        for fmt in ("JPEG", "HEIC", "AVIF"):
            t0 = time.perf_counter()
            data = encode(image, fmt)
            encode_s = time.perf_counter() - t0
            decoded = decode_image(data, max_pixels=MAX_PIXELS, min_size=min_size)
            served = lambda d=data: decode_image(d, max_pixels=MAX_PIXELS, min_size=min_size)  # noqa: E731
            wall, cpu, n = measure(served, args.seconds)
            whole, whole_cpu, _ = measure(lambda d=data: preprocess(d), args.seconds)
            row = {
                "megapixels": round(image.width * image.height / 1e6, 1),
                "size": f"{image.width}x{image.height}",
                "format": fmt,
                "file_kib": len(data) / 1024,
                "decoded": f"{decoded.width}x{decoded.height}",
                "decode_ms": wall,
                "decode_cpu_ms": cpu,
                "preprocess_ms": whole,
                "preprocess_cpu_ms": whole_cpu,
                "iters": n,
                "encode_s": encode_s,
            }
            if fmt == "JPEG":
                full, full_cpu, _ = measure(lambda d=data: decode_image(d, max_pixels=MAX_PIXELS), args.seconds)
                row["full_decode_ms"], row["full_decode_cpu_ms"] = full, full_cpu
            rows.append(row)
            print(row, flush=True)

    save_json("decode_formats", {"machine": machine(), "pillow_heif": pillow_heif.__version__,
                                 "libheif": pillow_heif.libheif_version(), "rows": rows})
    print(SUMMARY_MARKER)
    print(f"Machine: {machine()}; pillow-heif {pillow_heif.__version__} (libheif {pillow_heif.libheif_version()}).\n")
    for row in rows:
        row.setdefault("full_decode_ms", float("nan"))
    print(markdown_table(rows, [
        ("megapixels", "MP", ""),
        ("size", "size", ""),
        ("format", "format", ""),
        ("file_kib", "file KiB", ".0f"),
        ("decoded", "decoded at", ""),
        ("decode_ms", "decode ms", ".1f"),
        ("decode_cpu_ms", "decode CPU ms", ".1f"),
        ("preprocess_ms", "decode+resize+crop ms", ".1f"),
        ("full_decode_ms", "JPEG without draft ms", ".1f"),
    ]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
