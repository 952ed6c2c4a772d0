"""The service under load, against the offline pipeline it is held to.

For each mode (dynamic batching on, and off = max_batch_size 1) a real server process is started on
loopback; N concurrent clients (1, 4, 16, 64) post real JPEGs to /predict for a fixed time each.
Reported: images/s, p50/p95/p99 latency, mean batch size (from the server's own histogram), errors. The
offline pipeline (decode + preprocess + the same engine, in one loop, no HTTP) is the ceiling.

The load generator runs on the same 2 cores as the server, so the figures include its cost.

    python -m benchmarks.bench_service [--seconds 10] [--concurrency 1 4 16 64] [--model efficientnet-lite0]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import statistics
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from tests.helpers.images import load_photos
from tests.helpers.server import ServiceProcess

from .common import DOCS, SUMMARY_MARKER, machine, markdown_table, metric_samples, save_json, time_callable


def batch_stats(url: str) -> tuple[float, float]:
    """The server's effnet_batch_size histogram so far, over every model: (sum, count)."""
    totals = {"effnet_batch_size_sum": 0.0, "effnet_batch_size_count": 0.0}
    for sample in metric_samples(url, timeout=5):
        if sample.name in totals:
            totals[sample.name] += sample.value
    return totals["effnet_batch_size_sum"], totals["effnet_batch_size_count"]


async def load(url: str, clients: int, seconds: float, photos: list[bytes], path: str = "/predict") -> dict:
    latencies: list[float] = []
    codes: dict[str, int] = {}
    deadline = time.perf_counter() + seconds
    order = itertools.cycle(range(len(photos)))
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client(c: httpx.AsyncClient) -> None:
        while time.perf_counter() < deadline:
            body = photos[next(order)]
            t0 = time.perf_counter()
            try:
                r = await c.post(path, content=body, headers={"Content-Type": "image/jpeg"})
                key = str(r.status_code)
            except httpx.HTTPError as exc:
                key = type(exc).__name__
            codes[key] = codes.get(key, 0) + 1
            if key == "200":
                latencies.append(time.perf_counter() - t0)

    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as c:
        await asyncio.gather(*(client(c) for _ in range(clients)))
    elapsed = time.perf_counter() - started
    q = statistics.quantiles(latencies, n=100) if len(latencies) >= 2 else [float("nan")] * 99
    return {
        "clients": clients,
        "images_per_s": len(latencies) / elapsed,
        "p50_ms": q[49] * 1e3,
        "p95_ms": q[94] * 1e3,
        "p99_ms": q[98] * 1e3,
        "ok": len(latencies),
        "errors": sum(v for k, v in codes.items() if k != "200"),
        "codes": codes,
    }


def offline_pipeline(model_name: str, threads: int, photos: list[bytes], seconds: float) -> dict:
    """Decode + preprocess + the service's own engine, sequentially in one loop: the ceiling."""
    from service.core.imaging import Preprocessor
    from service.core.loading import load_model
    from service.core.settings import ModelSettings, ServerSettings

    loaded = load_model(ModelSettings(model=model_name, num_threads=threads))
    pre = Preprocessor(loaded.preprocess, max_pixels=ServerSettings().max_image_pixels)
    x1 = pre(photos[0])[None]
    out: dict[str, float] = {"backend": loaded.engine.backend}
    per_set = statistics.median(time_callable(lambda: [pre(p) for p in photos], seconds))
    out["preprocess_ms"] = per_set / len(photos) * 1e3
    out["infer_b1_ms"] = statistics.median(time_callable(lambda: loaded.engine.run(x1), seconds)) * 1e3
    for batch in (1, 8):
        sample = [photos[i % len(photos)] for i in range(batch)]

        def step(sample=sample):
            loaded.engine.run(np.stack([pre(p) for p in sample]))

        out[f"pipeline_b{batch}_images_per_s"] = batch / statistics.median(time_callable(step, seconds))
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for mode in sorted({r["mode"] for r in rows}):
        rs = [r for r in rows if r["mode"] == mode]
        a.plot([r["clients"] for r in rs], [r["images_per_s"] for r in rs], marker="o", label=mode)
        b.plot([r["clients"] for r in rs], [r["p99_ms"] for r in rs], marker="o", label=mode)
    for ax, ylabel in ((a, "images/s"), (b, "p99 latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle("effnet-serve under load (2 vCPU, client on the same cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="efficientnet-lite0")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 4, 16, 64])
    parser.add_argument("--batch-size", type=int, default=None, help="max_batch_size when batching is on "
                        "(default: the service's own default)")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--env", nargs="*", default=[], metavar="EFFNET_X=VALUE",
                        help="extra settings for the server, e.g. EFFNET_DECODE_THREADS=2")
    parser.add_argument("--only-batching", action="store_true", help="skip the batching-off runs")
    parser.add_argument("--skip-offline", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    photos = list(load_photos().values())

    offline = offline_pipeline(args.model, args.threads, photos, 3.0)
    print("offline:", offline, flush=True)

    modes = {"batching on": {}, "batching off": {"EFFNET_MAX_BATCH_SIZE": "1", "EFFNET_MAX_BATCH_DELAY_MS": "0"}}
    if args.only_batching:
        del modes["batching off"]
    if args.batch_size:
        modes["batching on"]["EFFNET_MAX_BATCH_SIZE"] = str(args.batch_size)
    rows = []
    for mode, extra in modes.items():
        env = {"EFFNET_MODEL": args.model, "EFFNET_BACKEND": args.backend, "EFFNET_MAX_QUEUE": "256",
               "EFFNET_NUM_THREADS": str(args.threads), **extra,
               **dict(kv.split("=", 1) for kv in args.env)}
        with ServiceProcess(env, ready_timeout=180) as server:
            for clients in args.concurrency:
                asyncio.run(load(server.url, clients, 1.0, photos))  # settle
                s0, c0 = batch_stats(server.url)
                r = asyncio.run(load(server.url, clients, args.seconds, photos))
                s1, c1 = batch_stats(server.url)
                r.update(mode=mode, mean_batch=(s1 - s0) / max(c1 - c0, 1))
                rows.append(r)
                print(f"{mode:13s} clients {clients:3d}: {r['images_per_s']:6.1f} img/s  p50 {r['p50_ms']:7.1f}  "
                      f"p99 {r['p99_ms']:7.1f} ms  batch {r['mean_batch']:.2f}  codes {r['codes']}", flush=True)

    best = max(r["images_per_s"] for r in rows)
    ceiling = max(offline["pipeline_b1_images_per_s"], offline["pipeline_b8_images_per_s"])
    single = [r for r in rows if r["mode"] == "batching on" and r["clients"] == 1]
    budget = offline["preprocess_ms"] + offline["infer_b1_ms"]
    print(SUMMARY_MARKER)
    print(f"Machine: {machine()}; model {args.model}; engine {offline['backend']}; {args.threads} threads")
    print(markdown_table(rows, [("mode", "mode", ""), ("clients", "clients", "d"), ("images_per_s", "images/s", ".1f"),
                                ("p50_ms", "p50 ms", ".1f"), ("p95_ms", "p95 ms", ".1f"), ("p99_ms", "p99 ms", ".1f"),
                                ("mean_batch", "mean batch", ".2f"), ("errors", "errors", "d")]))
    print(f"\noffline pipeline: preprocess {offline['preprocess_ms']:.1f} ms/image, batch-1 inference "
          f"{offline['infer_b1_ms']:.1f} ms; pipeline {offline['pipeline_b1_images_per_s']:.1f} img/s at batch 1, "
          f"{offline['pipeline_b8_images_per_s']:.1f} at batch 8")
    print(f"service at saturation / offline ceiling: {best:.1f} / {ceiling:.1f} = {best / ceiling:.2f}")
    if single:
        print(f"single-client p50 / (preprocess + batch-1 inference): {single[0]['p50_ms']:.1f} / {budget:.1f} = "
              f"{single[0]['p50_ms'] / budget:.2f}")
    save_json("service", {"machine": machine(), "model": args.model, "offline": offline, "rows": rows})
    DOCS.mkdir(exist_ok=True)
    plot(rows, DOCS / "service_load.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
