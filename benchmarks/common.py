"""Timing, reporting and /metrics helpers shared by the benchmark scripts (not part of the installed package).

Servers are started with ``tests.helpers.server.ServiceProcess``.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prometheus_client.samples import Sample

DOCS = Path(__file__).resolve().parent.parent / "docs"
RESULTS = Path(__file__).resolve().parent / "results"
# Printed by each benchmark before its summary; run_all.py copies what follows into docs/benchmarks.md.
SUMMARY_MARKER = "----- summary -----"


def metric_samples(url: str, timeout: float = 30.0) -> list[Sample]:
    """Every sample of the server's ``url``/metrics, read with prometheus-client's text parser.

    Names are as exposed: ``effnet_batch_size_sum``, ``effnet_rejected_total`` (labels in ``.labels``).
    """
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=timeout).text
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def time_callable(fn: Callable[[], object], min_seconds: float = 3.0, min_iters: int = 5,
                  warmup: int = 2) -> list[float]:
    """Wall-clock seconds of each call of ``fn`` after ``warmup`` calls; runs at least ``min_seconds``."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_iters or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def summarize(times: list[float], batch: int) -> dict[str, float]:
    ordered = sorted(times)
    p50 = statistics.median(ordered)
    return {
        "batch": batch,
        "iters": len(times),
        "images_per_s": batch / p50,
        "p50_ms": p50 * 1e3,
        "p90_ms": ordered[int(0.9 * (len(ordered) - 1))] * 1e3,
    }


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs, Python {platform.python_version()}"


def save_json(name: str, payload: object) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2))
    return path


def markdown_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """``columns``: (key, header, format spec)."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(format(r[k], f) if f else str(r[k]) for k, _, f in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])
