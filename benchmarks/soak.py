"""Soak test: drive the service well past its capacity for a fixed time and report what came back.

N concurrent clients (default 64) each post real photos to /predict back to back for ``--seconds``
(default 60). Against a queue that holds far fewer images than that, most requests must be refused with
503 + Retry-After at once, the admitted ones answered 200, and nothing else (no 500, no transport error)
should appear. Reported: responses by class (200 / 503 / 504 / other status / transport errors by type),
throughput, latency percentiles of the 200s, the server's own rejection counters, and, when this script
started the server itself, its resident memory before, during (peak) and after the run, and how it shut
down (SIGTERM: exit code and time).

Loopback only: ``--url`` must point at 127.0.0.1, localhost or ::1. Every loop is bounded by the deadline.

    python -m benchmarks.soak --seconds 60 --clients 64 --max-queue 16
    python -m benchmarks.soak --url http://127.0.0.1:8000 --seconds 30

Writes benchmarks/results/soak.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from tests.helpers.images import load_photos
from tests.helpers.server import ServiceProcess, memory_kib

from .common import RESULTS, SUMMARY_MARKER, machine, metric_samples

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="target a running server (loopback only) instead of starting one")
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the run (default 60)")
    parser.add_argument("--clients", type=int, default=64, help="concurrent clients (default 64)")
    parser.add_argument("--model", default="efficientnet-lite0", help="EFFNET_MODEL of the started server")
    parser.add_argument("--max-queue", type=int, default=16, help="EFFNET_MAX_QUEUE of the started server")
    parser.add_argument("--max-batch-size", type=int, default=8, help="EFFNET_MAX_BATCH_SIZE")
    parser.add_argument("--batch-delay-ms", type=float, default=5.0, help="EFFNET_MAX_BATCH_DELAY_MS")
    parser.add_argument("--request-timeout-s", type=float, default=10.0, help="EFFNET_REQUEST_TIMEOUT_S")
    parser.add_argument("--threads", type=int, default=None, help="EFFNET_NUM_THREADS (default: all CPUs)")
    parser.add_argument("--output", type=Path, default=RESULTS / "soak.json")
    args = parser.parse_args(argv)
    if args.url is not None and urlsplit(args.url).hostname not in LOOPBACK:
        parser.error("--url must be a loopback address (127.0.0.1, localhost or ::1)")
    if not 1 <= args.clients <= 1024:
        parser.error("--clients must be between 1 and 1024")
    if not 0 < args.seconds <= 3600:
        parser.error("--seconds must be in (0, 3600]")
    return args


# -- the server, when this script starts it ---------------------------------------------------------------------
def start_server(args: argparse.Namespace) -> ServiceProcess:
    """A ready server with the settings from ``args``; SystemExit (with its log) if it does not get ready."""
    env = {
        "EFFNET_MODEL": args.model,
        "EFFNET_MAX_QUEUE": str(args.max_queue),
        "EFFNET_MAX_BATCH_SIZE": str(args.max_batch_size),
        "EFFNET_MAX_BATCH_DELAY_MS": str(args.batch_delay_ms),
        "EFFNET_REQUEST_TIMEOUT_S": str(args.request_timeout_s),
        "EFFNET_SHUTDOWN_DRAIN_S": "30",
    }
    if args.threads:
        env["EFFNET_NUM_THREADS"] = str(args.threads)
    server = ServiceProcess(env, args=["--log-level", "warning"], threads=None)
    try:
        server.wait_ready(300.0, poll_s=0.1)
    except (RuntimeError, TimeoutError) as exc:
        server.stop()
        raise SystemExit(str(exc)) from None
    return server


def stop_server(server: ServiceProcess, timeout: float = 60.0) -> dict[str, float | int | None]:
    """SIGTERM: exit code, seconds to exit and how many ERROR lines the server logged."""
    stopped = server.stop(timeout)
    errors = [line for line in stopped.log.splitlines() if '"level": "ERROR"' in line]
    return {"exit_code": stopped.exit_code, "shutdown_s": round(stopped.shutdown_s, 3), "error_log_lines": len(errors)}


# -- the load ---------------------------------------------------------------------------------------------------
def scrape(url: str) -> dict[str, float]:
    """effnet_rejected_total by reason, batch counts and the requests by code from /metrics."""
    wanted = {}
    for sample in metric_samples(url, timeout=30):
        if sample.name == "effnet_rejected_total":
            wanted[f"rejected_{sample.labels['reason']}"] = sample.value
        elif sample.name in (
            "effnet_batch_size_count",
            "effnet_batch_size_sum",
            "effnet_batch_failures_total",
            "effnet_queue_wait_seconds_sum",
            "effnet_queue_wait_seconds_count",
            "effnet_inference_duration_seconds_sum",
            "effnet_inference_duration_seconds_count",
        ):
            wanted[sample.name] = wanted.get(sample.name, 0.0) + sample.value  # summed over models
        elif (
            sample.name.startswith("effnet_request_duration_seconds")
            and sample.labels.get("endpoint") == "/predict"
        ):
            suffix = sample.name.removeprefix("effnet_request_duration_seconds")
            key = f"predict_duration{suffix}" + (f"_le_{sample.labels['le']}" if "le" in sample.labels else "")
            wanted[key] = sample.value
        elif sample.name == "effnet_requests_total" and sample.labels.get("endpoint") == "/predict":
            key = f"predict_{sample.labels['code']}"
            wanted[key] = wanted.get(key, 0) + sample.value
    return wanted


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


async def soak(url: str, clients: int, seconds: float, timeout: float, pid: int | None) -> dict:
    photos = list(load_photos().items())
    statuses: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    error_samples: list[dict] = []  # the first few transport errors, in detail
    latencies: list[float] = []
    missing_retry_after = 0
    peak_rss_kib = 0
    deadline = time.monotonic() + seconds

    async def client_loop(client: httpx.AsyncClient, index: int) -> None:
        nonlocal missing_retry_after
        sent = index
        while time.monotonic() < deadline:
            name, data = photos[sent % len(photos)]
            sent += 1
            started = time.perf_counter()
            try:
                response = await client.post("/predict", files={"file": (name, data, "image/jpeg")})
            except httpx.HTTPError as exc:
                errors[type(exc).__name__] += 1
                if len(error_samples) < 10:
                    cause = exc.__cause__ or exc.__context__
                    error_samples.append(
                        {
                            "error": repr(exc),
                            "cause": repr(cause) if cause is not None else None,
                            "at_s": round(seconds - (deadline - time.monotonic()), 3),
                            "after_s": round(time.perf_counter() - started, 3),
                        }
                    )
                await asyncio.sleep(0.05)  # a broken connection is not retried in a hot loop
                continue
            elapsed = time.perf_counter() - started
            code = response.status_code
            statuses[str(code) if code in (200, 503, 504) else "other"] += 1
            if code == 200:
                latencies.append(elapsed)
            elif code == 503 and "retry-after" not in response.headers:
                missing_retry_after += 1
            if code != 200:
                try:
                    reason = response.json()["error"]["code"]
                except (ValueError, KeyError, TypeError):
                    reason = "not-json"
                statuses[f"code:{code}:{reason}"] += 1

    async def watch_memory() -> None:
        nonlocal peak_rss_kib
        while pid is not None and time.monotonic() < deadline:
            peak_rss_kib = max(peak_rss_kib, memory_kib(pid)["VmRSS"])
            await asyncio.sleep(0.5)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        started = time.monotonic()
        await asyncio.gather(watch_memory(), *(client_loop(client, i) for i in range(clients)))
        wall = time.monotonic() - started
    total = sum(v for k, v in statuses.items() if not k.startswith("code:")) + sum(errors.values())
    return {
        "wall_s": round(wall, 3),
        "requests": total,
        "responses": {k: v for k, v in sorted(statuses.items()) if not k.startswith("code:")},
        "error_codes": {k[5:]: v for k, v in sorted(statuses.items()) if k.startswith("code:")},
        "transport_errors": dict(errors),
        "transport_error_samples": error_samples,
        "missing_retry_after": missing_retry_after,
        "throughput": {
            "requests_per_s": round(total / wall, 1),
            "ok_per_s": round(statuses["200"] / wall, 1),
        },
        "latency_200_ms": {
            "p50": ms(percentile(latencies, 0.50)),
            "p90": ms(percentile(latencies, 0.90)),
            "p99": ms(percentile(latencies, 0.99)),
            "max": ms(max(latencies) if latencies else None),
            "mean": ms(statistics.fmean(latencies) if latencies else None),
        },
        "peak_rss_mib_sampled": round(peak_rss_kib / 1024, 1) if pid is not None else None,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    server = None
    if args.url is None:
        server = start_server(args)
        url, pid = server.url, server.pid
    else:
        url, pid = args.url.rstrip("/"), None
    try:
        info = httpx.get(f"{url}/info", timeout=30).json()
        # Warm steady state before the "before" memory figure: a few ordinary requests.
        for name, data in load_photos().items():
            httpx.post(f"{url}/predict", files={"file": (name, data)}, timeout=60)
        before_metrics = scrape(url)
        memory_before = memory_kib(pid) if pid else None
        timeout = float(info.get("batching", {}).get("request_timeout_s", args.request_timeout_s)) + 30
        result = asyncio.run(soak(url, args.clients, args.seconds, timeout, pid))
        time.sleep(1.0)  # let the last answers leave the queue
        memory_after = memory_kib(pid) if pid else None
        after_metrics = scrape(url)
        readiness_after = httpx.get(f"{url}/readyz", timeout=30).status_code
    finally:
        shutdown = stop_server(server) if server is not None else None

    counters = {k: after_metrics.get(k, 0) - before_metrics.get(k, 0) for k in sorted(after_metrics)}
    batches = counters.get("effnet_batch_size_count", 0)

    def mean_ms(name: str) -> float | None:
        count = counters.get(f"{name}_count", 0)
        return round(1000 * counters.get(f"{name}_sum", 0) / count, 1) if count else None

    handled = counters.get("predict_duration_count", 0)
    server_side = {
        # Measured by the server from request arrival to the end of its answer (200s and 503s together):
        # set against the client's latencies, it separates the server's time from the load generator's.
        "predict_mean_ms": mean_ms("predict_duration"),
        "predict_share_under_1s": (
            round(counters.get("predict_duration_bucket_le_1.0", 0) / handled, 4) if handled else None
        ),
        "queue_wait_mean_ms": mean_ms("effnet_queue_wait_seconds"),
        "inference_mean_ms": mean_ms("effnet_inference_duration_seconds"),
    }
    report = {
        "machine": machine(),
        "target": "started by soak.py" if server is not None else url,
        "settings": {
            "model": info.get("model"),
            "backend": info.get("backend"),
            "clients": args.clients,
            "seconds": args.seconds,
            **info.get("batching", {}),
            "threads": info.get("threads"),
        },
        **result,
        "server_side": server_side,
        "server_counters": {k: v for k, v in counters.items() if v and not k.startswith("predict_duration")},
        "mean_batch_size": round(counters.get("effnet_batch_size_sum", 0) / batches, 2) if batches else None,
        "memory_mib": (
            {
                "rss_before": round(memory_before["VmRSS"] / 1024, 1),
                "rss_after": round(memory_after["VmRSS"] / 1024, 1),
                "rss_growth": round((memory_after["VmRSS"] - memory_before["VmRSS"]) / 1024, 1),
                "peak_hwm": round(memory_after["VmHWM"] / 1024, 1),
            }
            if memory_before and memory_after
            else None
        ),
        "readiness_after": readiness_after,
        "shutdown": shutdown,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    print(SUMMARY_MARKER)
    print(json.dumps(report, indent=2))
    print(f"written to {args.output}")
    bad = (
        sum(report["transport_errors"].values())
        + report["responses"].get("other", 0)
        + report["missing_retry_after"]
        + (1 if shutdown and shutdown["exit_code"] != 0 else 0)
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
