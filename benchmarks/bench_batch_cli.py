"""efficientnet-batch against the figures it is held to.

- In-process: ``efficientnet-batch predict FOLDER`` (default settings) against the offline
  pipeline of bench_service (Pillow preprocessing then the same onnxruntime engine, one image after the
  other, no I/O): the command overlaps decoding with inference, so it should beat it.
- Server mode: ``--server URL --concurrency N`` against a local server, next to the service's own figure at
  the same concurrency (bench_service's load generator posting the same photos from memory for a fixed
  time). The command reads files, parses and writes every answer: it should keep at least 90% of that.

Everything runs in this process, so that each pair shares one engine and CPU time is measured exactly:
the offline pipeline and ``main([...])`` of the command alternate on the same loaded model (the command's
model loader is pointed at it); in server mode the service's load generator and ``main([... "--server"])``
alternate against one server process. A command's rate is its own summary's (images / time from first
image to last). Beside each rate: CPU milliseconds per image, of this process (all threads) and of the
server process, which holds steady when other work on the machine makes wall-clock rates jitter. Finally
one real ``efficientnet-batch`` process is timed end to end, model load included.

    python -m benchmarks.bench_batch_cli [--images 600] [--rounds 3] [--concurrency 4 16]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from tests.helpers.images import load_photos
from tests.helpers.server import REPO, ServiceProcess

from .bench_service import load
from .common import SUMMARY_MARKER, machine, markdown_table, save_json

SUMMARY = re.compile(r"efficientnet-batch: (\d+) images in ([\d.:]+) s? ?\(([\d.]+) images/s\): (\d+) ok")


def make_folder(root: Path, count: int, photos: dict[str, bytes]) -> None:
    names = sorted(photos)
    for i in range(count):
        folder = root / f"part{i % 10}"
        folder.mkdir(exist_ok=True)
        (folder / f"{i:05d}-{names[i % len(names)]}").write_bytes(photos[names[i % len(names)]])


def server_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_main(argv: list[str]) -> float:
    """``efficientnet-batch`` in this process; its own images/s from the summary line."""
    from service.cli.main import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    match = SUMMARY.search(err.getvalue())
    if code != 0 or match is None:
        raise RuntimeError(f"efficientnet-batch failed ({code}):\n{err.getvalue()}")
    return float(match.group(3))


def offline(model, photos: list[bytes], batch: int, seconds: float) -> float:
    """bench_service's offline pipeline: Pillow preprocessing then the engine, batch after batch; images/s."""
    from service.core.imaging import Preprocessor

    pre = Preprocessor(model.preprocess, max_pixels=64_000_000)
    done, i = 0, 0
    model.engine.run(np.stack([pre(photos[0])] * batch))  # warm this batch size
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        model.engine.run(np.stack([pre(photos[(i + k) % len(photos)]) for k in range(batch)]))
        i += batch
        done += batch
    return done / (time.perf_counter() - started)


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="efficientnet-lite0")
    parser.add_argument("--images", type=int, default=600, help="files in the folder (the test photos, cycled)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--concurrency", nargs="+", type=int, default=[4, 16])
    parser.add_argument("--seconds", type=float, default=4.0, help="length of each offline and load measurement")
    args = parser.parse_args()
    from service.core import registry
    from service.core.loading import load_model
    from service.core.settings import ModelSettings

    photos = load_photos()
    blobs = list(photos.values())
    load_before = load_average()
    rates: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}  # this process's CPU ms per image
    server_cpu: dict[str, list[float]] = {}

    def measure(key: str, images: int | None, fn, server_pid: int | None = None) -> None:
        """Run ``fn`` (-> images/s, or (images/s, images) when ``images`` is None) and record it."""
        c0, s0 = time.process_time(), server_cpu_s(server_pid) if server_pid else 0.0
        out = fn()
        rate, count = (out, images) if images is not None else out
        rates.setdefault(key, []).append(rate)
        cpu.setdefault(key, []).append(1e3 * (time.process_time() - c0) / count)
        line = f"{key:46s} {rate:7.1f} images/s, {cpu[key][-1]:.2f} CPU ms/image here"
        if server_pid:
            server_cpu.setdefault(key, []).append(1e3 * (server_cpu_s(server_pid) - s0) / count)
            line += f", {server_cpu[key][-1]:.2f} in the server"
        print(line, flush=True)

    with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp:
        folder = Path(tmp) / "photos"
        folder.mkdir()
        make_folder(folder, args.images, photos)
        out = str(Path(tmp) / "out.jsonl")
        model = load_model(ModelSettings(model=args.model, num_threads=args.threads))
        original_load = registry.load_model
        registry.load_model = lambda spec: model  # the command runs on the very engine the offline loop uses
        os.environ["EFFNET_MODEL"] = args.model
        os.environ["EFFNET_NUM_THREADS"] = str(args.threads)
        for _ in range(args.rounds):
            for batch in (1, 8):
                def offline_run(batch=batch):
                    rate = offline(model, blobs, batch, args.seconds)
                    return rate, round(rate * args.seconds)
                measure(f"offline pipeline, batch {batch}", None, offline_run)
            measure("efficientnet-batch in-process", args.images,
                    lambda: run_main(["predict", str(folder), "-o", out, "--overwrite", "--progress-every", "3600"]))
        registry.load_model = original_load

        env = {"EFFNET_MODEL": args.model, "EFFNET_MAX_QUEUE": "256", "EFFNET_NUM_THREADS": str(args.threads)}
        with ServiceProcess(env, ready_timeout=180) as server:
            asyncio.run(load(server.url, 4, 1.0, blobs))  # settle
            for _ in range(args.rounds):
                for c in args.concurrency:
                    def generator(c=c):
                        r = asyncio.run(load(server.url, c, args.seconds, blobs))
                        return r["images_per_s"], r["ok"]
                    measure(f"service's own load generator, {c} clients", None, generator, server.pid)
                    measure(f"efficientnet-batch --server, concurrency {c}", args.images,
                            lambda c=c: run_main(["predict", str(folder), "-o", out, "--overwrite", "--progress-every",
                                                  "3600", "--server", server.url, "--concurrency", str(c)]),
                            server.pid)

        # One real process, end to end: interpreter start, model load (ONNX export and check), the run.
        env = {k: v for k, v in os.environ.items() if not k.startswith("EFFNET_")}
        env.update({"PYTHONPATH": str(REPO), "EFFNET_MODEL": args.model, "EFFNET_NUM_THREADS": str(args.threads)})
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "service.cli", "predict", str(folder), "-o", out,
                               "--overwrite", "--progress-every", "3600"], env=env, cwd=REPO, capture_output=True,
                              text=True)
        wall = time.perf_counter() - started
        print(done.stderr.strip().splitlines()[-1], f"(wall {wall:.1f} s)", flush=True)

    rows = [{"run": key, "best": max(v), "median": statistics.median(v), "n": len(v),
             "cpu": statistics.median(cpu[key]),
             "server_cpu": f"{statistics.median(server_cpu[key]):.2f}" if key in server_cpu else "-"}
            for key, v in rates.items()]
    best = {row["run"]: row["best"] for row in rows}
    offline_best = max(best["offline pipeline, batch 1"], best["offline pipeline, batch 8"])
    ratios = [f"in-process / best offline pipeline (best of {args.rounds} each): "
              f"{best['efficientnet-batch in-process']:.1f} / {offline_best:.1f} = "
              f"{best['efficientnet-batch in-process'] / offline_best:.2f}"]
    for c in args.concurrency:
        cli = best[f"efficientnet-batch --server, concurrency {c}"]
        own = best[f"service's own load generator, {c} clients"]
        ratios.append(f"--server / the service's own figure at concurrency {c}: {cli:.1f} / {own:.1f} = "
                      f"{cli / own:.2f}")
    ratios.append(f"one real process end to end (model load included): {done.stderr.strip().splitlines()[-1]}; "
                  f"wall {wall:.1f} s")

    print(SUMMARY_MARKER)
    print(f"Machine: {machine()}; model {args.model}; {args.threads} threads; {args.images} files (the three test "
          f"photos, cycled); {args.rounds} rounds, alternating; load average before {load_before}, after "
          f"{load_average()}")
    print(markdown_table(rows, [("run", "run", ""), ("best", "best images/s", ".1f"),
                                ("median", "median images/s", ".1f"), ("n", "runs", "d"),
                                ("cpu", "client CPU ms/image", ".2f"), ("server_cpu", "server CPU ms/image", "")]))
    print()
    for line in ratios:
        print(line)
    save_json("batch_cli", {"machine": machine(), "model": args.model, "images": args.images, "rates": rates,
                            "cpu_ms_per_image": cpu, "server_cpu_ms_per_image": server_cpu, "end_to_end_wall_s": wall})
    return 0


if __name__ == "__main__":
    sys.exit(main())
