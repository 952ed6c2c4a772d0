"""What tracing costs: throughput of the same Lite0 service with tracing on (every request sampled, spans
exported over OTLP/HTTP), with tracing off, and as it was before tracing existed ("today"), in one run.

Three server processes run side by side: "today" from the source tree of the commit before tracing was
added (``git archive``; ``--today REF`` to choose another), "off" (this tree, no OTEL_* variable) and "on"
(this tree, ``OTEL_TRACES_SAMPLER=always_on``, exporting to an OTLP/HTTP receiver in this process that
counts what arrives without decoding it, as a remote collector would cost this machine nothing). They
take turns in short rounds (today, off, on, today, off, on, ...) under the same closed-loop load
(``benchmarks.loadgen``: raw keep-alive sockets, one JPEG per multipart ``/predict`` request), so drift
in the machine's load hits all three alike; each figure sums its rounds.

    python -m benchmarks.bench_tracing [--rounds 3] [--seconds 8] [--connections 16] [--today REF]

Run it under ``flock /tmp/bench.lock`` on a shared machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

import httpx

from tests.helpers.images import load_photos
from tests.helpers.otlp import OtlpReceiver
from tests.helpers.server import REPO, ServiceProcess, free_port

from .common import SUMMARY_MARKER, machine, markdown_table, save_json
from .loadgen import run_load

MODEL = "efficientnet-lite0"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def before_tracing() -> str:
    """The commit before the one that added service/core/tracing.py."""
    added = subprocess.run(["git", "log", "--diff-filter=A", "--format=%H", "--", "service/core/tracing.py"],
                           cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    if not added:
        raise SystemExit("cannot find the commit that added service/core/tracing.py; pass --today REF")
    return f"{added[-1]}^"


class TreeServer:
    """``python -m service`` from another source tree (a ``git archive`` of ``ref``), on a free port."""

    def __init__(self, ref: str, env: dict[str, str]) -> None:
        self.dir = tempfile.TemporaryDirectory(prefix="effnet-today-")
        archive = subprocess.run(["git", "archive", "--format=tar", ref, "model", "service"], cwd=REPO,
                                 capture_output=True, check=True).stdout
        with tarfile.open(fileobj=BytesIO(archive)) as tar:
            tar.extractall(self.dir.name, filter="data")
        self.ref = subprocess.run(["git", "rev-parse", "--short", ref], cwd=REPO, capture_output=True, text=True,
                                  check=True).stdout.strip()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        full = {k: v for k, v in os.environ.items() if not k.startswith(("EFFNET_", "OTEL_"))}
        full.update(env, PYTHONPATH=self.dir.name, EFFNET_GRPC_PORT="0", EFFNET_SHUTDOWN_DELAY_S="0")
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(self.port)],
                                     cwd=self.dir.name, env=full, stdout=self.log, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"today's server exited: {self.log.read().decode(errors='replace')[-2000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError("today's server never got ready")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.dir.cleanup()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--today", default=None, help="git ref of 'today' (default: the commit before tracing)")
    args = parser.parse_args()

    threads = str(os.cpu_count() or 1)
    base = {"EFFNET_MODEL": MODEL, "EFFNET_NUM_THREADS": threads}
    photos = list(load_photos().values())
    receiver = OtlpReceiver(decode=False).start()
    today = TreeServer(args.today or before_tracing(), base)
    servers: dict[str, object] = {"today": today}
    try:
        servers["off"] = ServiceProcess(base, threads=None)
        servers["on"] = ServiceProcess({**base, "OTEL_TRACES_EXPORTER": "otlp",
                                        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                                        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
                                        "OTEL_TRACES_SAMPLER": "always_on"}, threads=None)
        for server in servers.values():
            server.wait_ready()  # type: ignore[attr-defined]
        results: dict[str, dict] = {name: {"ok": 0, "seconds": 0.0, "cpu_s": 0.0, "p50": [], "p99": [],
                                           "errors": 0} for name in servers}
        for server in servers.values():  # a short warm-up of each, not counted
            run_load(server.url, photos, seconds=2, connections=args.connections)  # type: ignore[attr-defined]
        spans_before = receiver.spans_received
        for _ in range(args.rounds):
            for name, server in servers.items():
                pid = server.pid  # type: ignore[attr-defined]
                cpu = cpu_seconds(pid)
                load = run_load(server.url, photos, seconds=args.seconds,  # type: ignore[attr-defined]
                                connections=args.connections)
                r = results[name]
                r["ok"] += load["ok"]
                r["seconds"] += load["seconds"]
                r["cpu_s"] += cpu_seconds(pid) - cpu
                r["p50"].append(load["p50_ms"])
                r["p99"].append(load["p99_ms"])
                r["errors"] += sum(v for k, v in load["codes"].items() if str(k) != "200")
        time.sleep(6.0)  # the last spans: the exporter sends every 5 s by default (OTEL_BSP_SCHEDULE_DELAY)
        spans = receiver.spans_received - spans_before
    finally:
        for server in servers.values():
            server.stop()  # type: ignore[attr-defined]
        receiver.close()

    rows = []
    for name, r in results.items():
        rows.append({
            "variant": {"today": f"today ({today.ref}, before tracing)", "off": "tracing off",
                        "on": "tracing on, always sampled, OTLP/HTTP"}[name],
            "images_per_s": r["ok"] / r["seconds"],
            "p50_ms": statistics.median(r["p50"]),
            "p99_ms": statistics.median(r["p99"]),
            "cpu_ms": 1e3 * r["cpu_s"] / max(1, r["ok"]),
            "requests": r["ok"],
            "errors": r["errors"],
        })
    by = {name: row for name, row in zip(results, rows, strict=True)}
    on_off = by["on"]["images_per_s"] / by["off"]["images_per_s"]
    off_today = by["off"]["images_per_s"] / by["today"]["images_per_s"]
    payload = {"machine": machine(), "args": vars(args), "rows": rows, "on_over_off": on_off,
               "off_over_today": off_today, "spans_exported": spans, "requests_on": by["on"]["requests"]}
    save_json("tracing", payload)

    print(SUMMARY_MARKER)
    print(f"`python -m benchmarks.bench_tracing --rounds {args.rounds} --seconds {args.seconds:g} "
          f"--connections {args.connections}`")
    print()
    print(f"Machine: {machine()}; model {MODEL}; three server processes side by side, all CPUs each; "
          f"{args.connections} connections, one JPEG per multipart /predict request; {args.rounds} interleaved "
          f"rounds of {args.seconds:g} s per variant.")
    print()
    print(markdown_table(rows, [("variant", "variant", ""), ("images_per_s", "images/s", ".1f"),
                                ("p50_ms", "p50 ms", ".0f"), ("p99_ms", "p99 ms", ".0f"),
                                ("cpu_ms", "server CPU ms/request", ".2f"), ("requests", "requests", ""),
                                ("errors", "errors", "")]))
    print()
    print(f"on / off: {on_off:.3f}; off / today: {off_today:.3f}; spans received while tracing was on: "
          f"{spans} for {by['on']['requests']} requests")
    return 0


if __name__ == "__main__":
    sys.exit(main())
