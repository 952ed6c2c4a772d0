"""What tracing costs: throughput, tail latency and server CPU of the same Lite0 service with tracing off and
on at several sampling rates, exporting over OTLP/HTTP, in one run of interleaved rounds.

One server process per variant, side by side (all CPUs each, as an operator runs it; ``--workers N``: each
with EFFNET_WORKERS=N, its CPU summed over the process tree):

- ``off``: no OTEL_* variable; ``off-b``: a second server just like it, whose ratio to ``off`` is the run's
  noise floor (two processes of the same code differ by more than the machine's drift);
- ``all``: ``OTEL_TRACES_SAMPLER=always_on``, every request traced, its stages (decode, queue) as events
  of its span (EFFNET_TRACE_DETAIL=events, the default);
- ``all-spans``: the same with EFFNET_TRACE_DETAIL=spans (decode and queue as child spans, as before
  issue 32);
- ``10%``, ``1%``: ``OTEL_TRACES_SAMPLER=traceidratio`` with ``OTEL_TRACES_SAMPLER_ARG`` 0.1, 0.01;
- ``all-before`` (with ``--before REF``): every request sampled, served by the code of commit ``REF``
  (``git archive`` of model/ and service/), e.g. the commit before issue 32's changes.

Each traced server exports to an OTLP/HTTP receiver of its own in this process that counts the spans
without decoding them (a remote collector would cost this machine nothing). The variants take turns in
rounds under the same closed-loop load (``benchmarks.loadgen``: kept-alive sockets, one ImageNet-sized
photo per raw ``/predict``), the order rotated each round, so drift in the machine's load hits all alike;
many short rounds rather than a few long ones. Each figure sums its rounds; p50 and p99 are over every
request of the variant. Server CPU per request, and the part of it the export threads (``effnet-tracing``)
spent, come from /proc.

    python -m benchmarks.bench_tracing [--rounds 10] [--seconds 6] [--connections 16] [--workers 1]
        [--photos /tmp/imagenet-sample] [--variants off off-b all all-spans 10% 1%] [--before REF]

Run it under ``flock /tmp/effnet-bench.lock`` on a shared machine, on a quiet one for figures.
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
from tests.helpers.server import REPO, ServiceProcess

from .bench_workers import cpu_s, process_tree
from .common import SUMMARY_MARKER, machine, markdown_table, save_json
from .loadgen import _process, run_load

MODEL = "efficientnet-lite0"
EXPORT_THREAD = "effnet-tracing"  # the trace export thread's name for the OS (service/core/trace_export.py)

VARIANTS: dict[str, tuple[str, dict[str, str]]] = {
    "off": ("tracing off", {}),
    "off-b": ("tracing off, a second server (the noise floor)", {}),
    "all": ("every request sampled (stages as events)", {"OTEL_TRACES_SAMPLER": "always_on"}),
    "all-spans": ("every request sampled, EFFNET_TRACE_DETAIL=spans",
                  {"OTEL_TRACES_SAMPLER": "always_on", "EFFNET_TRACE_DETAIL": "spans"}),
    "10%": ("10% sampled", {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1"}),
    "1%": ("1% sampled", {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.01"}),
    "all-before": ("every request sampled, code of --before", {"OTEL_TRACES_SAMPLER": "always_on"}),
}


def source_tree(ref: str, into: str) -> str:
    """model/ and service/ of commit ``ref`` extracted into the folder ``into``; its short hash."""
    archive = subprocess.run(["git", "archive", "--format=tar", ref, "model", "service"], cwd=REPO,
                             capture_output=True, check=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return subprocess.run(["git", "rev-parse", "--short", ref], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout.strip()


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def photos_from(folder: Path, count: int) -> list[bytes]:
    """Up to ``count`` JPEGs of ``folder`` (sorted by name), or the test photos when it holds none."""
    files = sorted(p for p in folder.glob("*") if p.suffix.lower() in (".jpeg", ".jpg")) if folder.is_dir() else []
    files = files[:count]
    if not files:
        print(f"no photos in {folder}: using the test photos", file=sys.stderr)
        return list(load_photos().values())
    return [p.read_bytes() for p in files]


def load(url: str, photos: list[bytes], seconds: float, connections: int) -> dict:
    """``loadgen.run_load`` in one process (raw bodies), keeping every latency (p99 over all rounds)."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    worker = ctx.Process(target=_process, args=(url, "/predict", photos, True, connections, time.time() + 0.5,
                                                seconds, 0, queue))
    worker.start()
    result = queue.get(timeout=seconds + 120)
    worker.join(timeout=10)
    return {"ok": len(result["latencies"]), "seconds": seconds, "latencies": result["latencies"],
            "codes": result["codes"]}


def tree_cpu(root: int) -> tuple[float, float]:
    """(CPU seconds of ``root`` and every process under it, of their trace-export threads alone)."""
    total = export = 0.0
    for pid in process_tree(root):
        total += cpu_s(pid)
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                name = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
            except OSError:
                continue
            if name.startswith(EXPORT_THREAD):
                export += cpu_s(pid, int(tid))
    return total, export


def spans_dropped(url: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=30).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "effnet_trace_spans_dropped_total")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--workers", type=int, default=1, help="EFFNET_WORKERS of every server")
    parser.add_argument("--photos", type=Path, default=Path("/tmp/imagenet-sample"))
    parser.add_argument("--count", type=int, default=1000, help="photos sent in turn")
    parser.add_argument("--variants", nargs="+", default=[v for v in VARIANTS if v != "all-before"],
                        choices=list(VARIANTS))
    parser.add_argument("--before", default=None, help="git ref whose code serves the all-before variant")
    args = parser.parse_args()
    if "off" not in args.variants:
        parser.error("the variants must include off (every ratio is against it)")
    if args.before and "all-before" not in args.variants:
        args.variants.append("all-before")
    if "all-before" in args.variants and not args.before:
        parser.error("all-before needs --before REF")
    before_dir = tempfile.TemporaryDirectory(prefix="effnet-before-") if args.before else None
    titles = {name: title for name, (title, _) in VARIANTS.items()}
    if before_dir is not None:
        titles["all-before"] = f"every request sampled, before ({source_tree(args.before, before_dir.name)})"

    threads = str(os.cpu_count() or 1)
    base = {"EFFNET_MODEL": MODEL, "EFFNET_NUM_THREADS": threads, "EFFNET_WORKERS": str(args.workers)}
    photos = photos_from(args.photos, args.count)
    receivers: dict[str, OtlpReceiver] = {}
    servers: dict[str, ServiceProcess] = {}
    load_before = load_average()
    started = time.time()
    try:
        for name in args.variants:
            env = dict(base)
            if VARIANTS[name][1]:
                receivers[name] = OtlpReceiver(decode=False).start()
                env.update(OTEL_TRACES_EXPORTER="otlp", OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf",
                           OTEL_EXPORTER_OTLP_ENDPOINT=receivers[name].endpoint, **VARIANTS[name][1])
            repo = Path(before_dir.name) if name == "all-before" and before_dir is not None else None
            servers[name] = ServiceProcess(env, threads=None, repo=repo)
        for server in servers.values():
            server.wait_ready()
        results: dict[str, dict] = {name: {"ok": 0, "seconds": 0.0, "cpu_s": 0.0, "export_cpu_s": 0.0,
                                           "latencies": [], "rate": [], "errors": 0} for name in servers}
        for server in servers.values():  # a short warm-up of each, not counted
            run_load(server.url, photos, seconds=3, connections=args.connections, raw=True)
        time.sleep(6.0)  # the warm-up's spans exported (every 5 s by default)
        spans_before = {name: r.spans_received for name, r in receivers.items()}
        order = list(servers)
        for round_ in range(args.rounds):
            for name in order[round_ % len(order):] + order[:round_ % len(order)]:
                server = servers[name]
                cpu, export = tree_cpu(server.pid)
                done = load(server.url, photos, args.seconds, args.connections)
                cpu_after, export_after = tree_cpu(server.pid)
                r = results[name]
                r["ok"] += done["ok"]
                r["seconds"] += done["seconds"]
                r["cpu_s"] += cpu_after - cpu
                r["export_cpu_s"] += export_after - export
                r["latencies"] += done["latencies"]
                r["rate"].append(done["ok"] / done["seconds"])
                r["errors"] += sum(v for k, v in done["codes"].items() if str(k) != "200")
                print(f"round {round_ + 1} {name}: {done['ok'] / done['seconds']:.1f} img/s", file=sys.stderr,
                      flush=True)
        time.sleep(6.0)  # the last spans: the exporter sends every 5 s by default (OTEL_BSP_SCHEDULE_DELAY)
        spans = {name: r.spans_received - spans_before[name] for name, r in receivers.items()}
        dropped = {name: spans_dropped(servers[name].url) for name in receivers}
    finally:
        for server in servers.values():
            server.stop()
        for receiver in receivers.values():
            receiver.close()
        if before_dir is not None:
            before_dir.cleanup()
    load_after = load_average()

    def percentile(values: list[float], q: int) -> float:
        return 1e3 * statistics.quantiles(values, n=100)[q - 1] if len(values) >= 2 else float("nan")

    off = results["off"]
    off_rate = off["ok"] / off["seconds"]
    off_p99 = percentile(off["latencies"], 99)
    rows = []
    for name, r in results.items():
        rate = r["ok"] / r["seconds"]
        p99 = percentile(r["latencies"], 99)
        rows.append({
            "variant": titles[name],
            "key": name,
            "images_per_s": rate,
            "vs_off": rate / off_rate,
            "p50_ms": percentile(r["latencies"], 50),
            "p99_ms": p99,
            "p99_vs_off": p99 / off_p99,
            "cpu_ms": 1e3 * r["cpu_s"] / max(1, r["ok"]),
            "export_cpu_ms": 1e3 * r["export_cpu_s"] / max(1, r["ok"]),
            "spans_per_request": (spans[name] / r["ok"]) if name in spans and r["ok"] else None,
            "dropped": dropped.get(name),
            "requests": r["ok"],
            "errors": r["errors"],
            "round_rates": r["rate"],
        })
    payload = {"machine": machine(), "args": {**vars(args), "photos": str(args.photos)}, "rows": rows,
               "load_before": load_before, "load_after": load_after, "started": started,
               "photos": len(photos), "mean_photo_bytes": statistics.mean(len(p) for p in photos)}
    save_json("tracing" if args.workers == 1 else f"tracing_workers{args.workers}", payload)

    print(SUMMARY_MARKER)
    print(f"`python -m benchmarks.bench_tracing --rounds {args.rounds} --seconds {args.seconds:g} "
          f"--connections {args.connections} --workers {args.workers}`")
    print()
    print(f"Machine: {machine()}; model {MODEL}, EFFNET_WORKERS={args.workers}; one server per variant, all "
          f"CPUs each; {args.connections} connections, one photo per raw /predict ({len(photos)} photos, "
          f"mean {payload['mean_photo_bytes'] / 1e3:.0f} kB); {args.rounds} interleaved rounds of "
          f"{args.seconds:g} s per variant; load average {load_before} before, {load_after} after.")
    print()
    columns = [("variant", "variant", ""), ("images_per_s", "images/s", ".1f"), ("vs_off", "/ off", ".3f"),
               ("p50_ms", "p50 ms", ".0f"), ("p99_ms", "p99 ms", ".0f"), ("p99_vs_off", "p99 / off", ".2f"),
               ("cpu_ms", "server CPU ms/request", ".2f"), ("export_cpu_ms", "of it, export thread", ".3f"),
               ("spans_per_request", "spans/request", ".2f"), ("dropped", "spans dropped", ".0f"),
               ("requests", "requests", ""), ("errors", "errors", "")]
    shown = [{k: "-" if r[k] is None else (format(r[k], f) if f else str(r[k])) for k, _, f in columns} for r in rows]
    print(markdown_table(shown, [(k, h, "") for k, h, _ in columns]))
    print()
    print("per round, images/s: " + "; ".join(
        f"{r['key']} {' '.join(f'{x:.1f}' for x in r['round_rates'])}" for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
