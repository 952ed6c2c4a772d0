"""What one service process can feed a fast accelerator: requests/s for /predict with the model taken away.

The HTTP front-end runs in one process with one event loop (uvicorn): it parses every request, runs the
middleware, access log and metrics, answers in JSON; decoding runs in its thread pool. On a GPU the model
is cheap, so this per-request work decides how many single-image requests one process can turn into
batches. Here the engine is the tests' stand-in (no network, Lite0's output shapes); everything else is
the real service (decoding of real JPEGs included). Measured: requests/s, and the CPU per request of the
event-loop thread (the main thread: /proc/<pid>/task/<pid>) and of the whole process (decode threads
included), for /healthz, /predict with a multipart body and /predict with a raw image body, under
benchmarks.loadgen.

    python -m benchmarks.bench_one_process [--seconds 8] [--connections 16 64]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from benchmarks.common import SUMMARY_MARKER, machine, markdown_table, save_json
from benchmarks.loadgen import run_load
from tests.helpers.images import load_photos
from tests.helpers.server import free_port

REPO = Path(__file__).resolve().parent.parent


def serve(port: int, decode_threads: int) -> None:
    """The real app around the stand-in engine, in uvicorn as ``efficientnet-serve`` runs it."""
    import uvicorn

    from tests.helpers.fakes import FakeEngine, app_with_engine

    app = app_with_engine(FakeEngine(), warmup=False, max_batch_size=32, max_queue=1024,
                          decode_threads=decode_threads, grpc_port=0)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def thread_cpu_s(pid: int, tid: int) -> float:
    with open(f"/proc/{pid}/task/{tid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--connections", nargs="+", type=int, default=[16, 64])
    parser.add_argument("--decode-threads", type=int, default=1)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.decode_threads)
        return 0

    photos = list(load_photos().values())
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    server = subprocess.Popen([sys.executable, "-m", "benchmarks.bench_one_process", "--serve", str(port),
                               "--decode-threads", str(args.decode_threads)], cwd=REPO, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        rows = []
        kinds = (("/healthz", "/healthz", False, 1), ("/predict (multipart)", "/predict", False, 1),
                 ("/predict (raw body)", "/predict", True, 1), ("/predict (multipart, 8 images)", "/predict", False, 8))
        for label, path, raw, per_request in kinds:
            for connections in args.connections:
                bodies = [None] if path == "/healthz" else photos
                load = dict(connections=connections, raw=raw, path=path, per_request=per_request)
                run_load(url, bodies, seconds=1.0, **load)  # settle
                loop0, proc0 = thread_cpu_s(server.pid, server.pid), process_cpu_s(server.pid)
                r = run_load(url, bodies, seconds=args.seconds, **load)
                loop1, proc1 = thread_cpu_s(server.pid, server.pid), process_cpu_s(server.pid)
                n = max(r["ok"], 1)
                row = {"request": label, "connections": connections, "requests_per_s": r["requests_per_s"],
                       "images_per_s": r["images_per_s_sent"],
                       "p50_ms": r["p50_ms"], "p99_ms": r["p99_ms"], "loop_cpu_ms": (loop1 - loop0) / n * 1e3,
                       "process_cpu_ms": (proc1 - proc0) / n * 1e3, "client_cpu_ms": r["client_cpu_s"] / n * 1e3,
                       "loop_bound_requests_per_s": n / max(loop1 - loop0, 1e-9),
                       "errors": sum(v for k, v in r["codes"].items() if k != "200")}
                rows.append(row)
                print(f"{row['request']:32s} x{connections:3d}: {row['requests_per_s']:7.0f} req/s  p50 "
                      f"{row['p50_ms']:6.1f} ms  loop {row['loop_cpu_ms']:.3f} CPU-ms/req  process "
                      f"{row['process_cpu_ms']:.3f}  client {row['client_cpu_ms']:.3f}", flush=True)
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(SUMMARY_MARKER)
    print(f"Machine: {machine()}; one server process (stand-in engine, real decoding, "
          f"{args.decode_threads} decode thread(s)); load generator on the same CPUs")
    print(markdown_table(rows, [("request", "request", ""), ("connections", "connections", "d"),
                                ("requests_per_s", "requests/s", ".0f"), ("images_per_s", "images/s", ".0f"),
                                ("p50_ms", "p50 ms", ".1f"),
                                ("p99_ms", "p99 ms", ".1f"), ("loop_cpu_ms", "event-loop CPU ms/req", ".3f"),
                                ("loop_bound_requests_per_s", "event-loop bound req/s", ".0f"),
                                ("process_cpu_ms", "process CPU ms/req", ".3f"),
                                ("client_cpu_ms", "client CPU ms/req", ".3f"), ("errors", "errors", "d")]))
    save_json("one_process", {"machine": machine(), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
