"""Several processes against a peer's: ``EFFNET_WORKERS=2`` against LitServe's own multi-process mode.

Both serve the same Lite0 with the same engine and the same image work, so what differs is the serving
around it:

- **effnet-serve** (``python -m service``), ``EFFNET_WORKERS=2``: a supervisor, one engine process
  (onnxruntime float32, ``--threads`` inference threads, the dynamic batcher: up to 8 images, 5 ms) and two
  front-end workers, each parsing the multipart upload and decoding in its own decode thread (Pillow with
  draft, resize, crop to uint8), the pixels crossing to the engine in shared memory. ``EFFNET_WORKERS=1``
  (one process) is measured beside it for reference.
- **LitServe** (``litserve`` pinned in constraints.txt), ``LitServer(api, accelerator="cpu",
  workers_per_device=K)`` run with ``num_api_servers=2`` (``api_server_worker_type="process"``: two forked
  uvicorn processes) and ``LitAPI(max_batch_size=8, batch_timeout=0.005)``. LitServe's design: an API
  server parses the multipart form (Starlette) and puts it, pickled, on a ``multiprocessing.Manager`` queue
  (LitServe 0.2.19's ``fast_queue=True`` does not switch to ZeroMQ: ``TransportConfig`` is given
  ``transport_config=`` and keeps its default ``mp``); an inference worker takes up to 8, calls
  ``decode_request`` on each (here: the project's own ``Preprocessor``, the same decoding as the server's),
  stacks them, runs the project's own engine (``service.core.loading.load_model``: the same onnxruntime
  session with uint8 input), and answers each with the same top-5 JSON (``service.core.outputs``) through
  a response queue back to the API server. Decoding is in the inference worker, in turn with inference.
  Two settings: ``K=1`` (one model, ``--threads`` threads: one engine batching across both API servers,
  like ours) and ``K=2`` (two copies, 1 thread each: what LitServe's documentation advises on CPU).

Load: ``benchmarks.loadgen`` posting the ImageNet-sized photos (the 900 of ``bench_workers``) as multipart
uploads (LitServe's API server takes form or JSON bodies, not a raw image), ``--clients`` keep-alive
connections (saturation), then a fixed rate (open loop, Poisson, the same arrivals for every server: 60% of
the lowest saturated rate of the round). Per row: images/s, p50/p99, the server's CPU per image summed
over every process under it (``/proc``), the mean batch (ours from ``/metrics``, LitServe's counted in its
``predict``), the load generator's CPU, and the server's CPU while idle (measured for ``--idle-seconds``
after its start). Each server runs alone: started, measured, stopped (an idle LitServe polls its queues,
0.2-0.35 cores here, which would be taken from the server measured); the servers take turns in each round,
so each ratio is from one run.

    python -m benchmarks.bench_peers_workers [--seconds 8] [--rounds 3] [--clients 16]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from tests.helpers.server import REPO, ServiceProcess, free_port

from .bench_workers import (
    CpuWindow,
    cmdline,
    imagenet,
    loadavg,
    measure,
    median_rows,
    process_name,
    process_tree,
    role,
    rotated,
    rss_tree,
    run_rate,
)
from .common import SUMMARY_MARKER, machine, markdown_table, save_json
from .loadgen import run_load

try:
    import litserve as ls
except ImportError:  # the bench extra is not installed: only --help works
    ls = None

MAX_BATCH_SIZE = 8  # the service's CPU defaults: EFFNET_MAX_BATCH_SIZE, EFFNET_MAX_BATCH_DELAY_MS
BATCH_TIMEOUT_S = 0.005


if ls is not None:

    class Lite0API(ls.LitAPI):
        """Lite0 in LitServe, with the project's own preprocessing, engine and answer."""

        def __init__(self, threads: int, stats: str, **kwargs) -> None:
            super().__init__(**kwargs)
            self.threads = threads
            self.stats = stats

        def setup(self, device) -> None:
            from service.core.imaging import Preprocessor
            from service.core.loading import load_model
            from service.core.settings import ModelSettings, ServerSettings

            self.loaded = load_model(ModelSettings(model="efficientnet-lite0", backend="onnxruntime",
                                                   num_threads=self.threads))
            self.pre = Preprocessor(self.loaded.preprocess, max_pixels=ServerSettings().max_image_pixels)
            self.loaded.engine.run(np.zeros((MAX_BATCH_SIZE, *self.pre.shape), np.uint8))  # warm up
            self.images = self.batches = 0
            self.stats_fd = os.open(f"{self.stats}.{os.getpid()}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)

        def decode_request(self, request):
            upload = request["file"]  # the multipart form, as LitServe's API server parsed it
            return self.pre(upload.file.read())

        def batch(self, inputs):
            return np.stack(inputs)

        def predict(self, x):
            _, logits = self.loaded.engine.run(x)
            self.images += len(x)
            self.batches += 1
            os.pwrite(self.stats_fd, f"{self.images} {self.batches}\n".ljust(32).encode(), 0)
            return logits

        def unbatch(self, output):
            return list(output)

        def encode_response(self, output):
            from service.core.outputs import top_classes

            labels = self.loaded.labels
            return {"model": "efficientnet-lite0", "results": [{"filename": "image0.jpg", "top_k": [
                {"index": c.index, "label": c.label, "score": c.score} for c in top_classes(output, labels, 5)]}]}


def serve_litserve(port: int, workers_per_device: int, api_servers: int, threads: int, stats: str) -> None:
    api = Lite0API(threads, stats, max_batch_size=MAX_BATCH_SIZE, batch_timeout=BATCH_TIMEOUT_S)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=workers_per_device, timeout=60)
    server.run(host="127.0.0.1", port=port, num_api_servers=api_servers, log_level="warning",
               generate_client_file=False, api_server_worker_type="process")


class LitServeProcess:
    """LitServe in a subprocess of this module (``--serve-litserve``), with its batch counts in files."""

    def __init__(self, workers_per_device: int, api_servers: int, threads: int) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.stats = tempfile.mkdtemp(prefix="bench-litserve-") + "/batches"
        self.log = tempfile.NamedTemporaryFile(prefix="litserve-", suffix=".log", delete=False)
        env = {k: v for k, v in os.environ.items() if not k.startswith("EFFNET_")}
        env["PYTHONPATH"] = str(REPO)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.bench_peers_workers", "--serve-litserve", str(self.port),
             "--workers-per-device", str(workers_per_device), "--api-servers", str(api_servers),
             "--threads", str(threads), "--stats", self.stats], cwd=REPO, env=env, stdout=self.log,
            stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"LitServe exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"LitServe not ready after {timeout} s:\n{self.logs()}")

    def logs(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def batches(self) -> tuple[float, float]:
        images = batches = 0
        folder = Path(self.stats).parent
        for path in folder.glob("batches.*"):
            fields = path.read_text().split()
            if len(fields) >= 2:
                images += int(fields[0])
                batches += int(fields[1])
        return float(images), float(batches)

    def stop(self) -> None:
        """SIGINT (LitServe's graceful shutdown), then SIGKILL to each of its processes still there."""
        tree = process_tree(self.proc.pid)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                pass
        for pid in tree:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.proc.wait(timeout=10)
        self.log.close()
        os.unlink(self.log.name)
        shutil.rmtree(Path(self.stats).parent, ignore_errors=True)


def litserve_role(comm: str, pid: int, root: int) -> str:
    """LitServe's processes by how they were started: the main process, inference workers (spawned), the
    API servers and the queue manager (forked from the main process), multiprocessing's resource tracker."""
    if pid == root:
        return "root"
    line = cmdline(pid)
    if "resource_tracker" in line:
        return "other"
    if "multiprocessing.spawn" in line:
        return "engine"  # an inference worker
    return "worker"  # an API server, or the Manager (its queues)


def litserve_name(comm: str, pid: int, root: int) -> str:
    return {"root": "main", "other": "resource tracker", "engine": "inference worker",
            "worker": "API server or queue manager"}[litserve_role(comm, pid, root)]


def top1(url: str, bodies: list[bytes]) -> list[int]:
    """The top-1 class of each of ``bodies``, posted one by one as multipart uploads."""
    return [httpx.post(f"{url}/predict", files={"file": ("image0.jpg", b, "image/jpeg")}, timeout=60)
            .json()["results"][0]["top_k"][0]["index"] for b in bodies]


KEYS = ("requests_per_s", "p50_ms", "p99_ms", "server_cpu_ms", "worker_cpu_ms", "engine_cpu_ms", "root_cpu_ms",
        "other_proc_cpu_ms", "client_cpu_ms", "server_cores", "rest_of_machine_cores", "mean_batch", "errors",
        "offered_per_s", "idle_cores")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=16, help="loadgen keep-alive connections (saturation)")
    parser.add_argument("--rate-fraction", type=float, default=0.6)
    parser.add_argument("--idle-seconds", type=float, default=4.0, help="idle CPU measured after each start")
    parser.add_argument("--photos", type=Path, default=Path("/tmp/imagenet-sample"))
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="inference threads in all")
    parser.add_argument("--name", default="peers_workers")
    parser.add_argument("--serve-litserve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--workers-per-device", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--api-servers", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--stats", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_litserve:
        serve_litserve(args.serve_litserve, args.workers_per_device, args.api_servers, args.threads, args.stats)
        return 0
    if ls is None:
        raise SystemExit("litserve is not installed: pip install -c constraints.txt -e '.[bench]'")

    _, served = imagenet(args.photos)
    bodies = [p.read_bytes() for p in served]
    result: dict = {"machine": machine(), "loadavg_before": loadavg(), "litserve": ls.__version__,
                    "seconds": args.seconds, "rounds": args.rounds, "clients": args.clients, "threads": args.threads,
                    "photos": len(bodies), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(f"load average before: {result['loadavg_before']}", flush=True)
    env = {"EFFNET_BACKEND": "onnxruntime", "EFFNET_MAX_QUEUE": "256"}
    plans = [
        ("effnet-serve, EFFNET_WORKERS=2", lambda: ServiceProcess({**env, "EFFNET_WORKERS": "2"},
                                                                  threads=args.threads, ready_timeout=600)),
        ("effnet-serve, EFFNET_WORKERS=1", lambda: ServiceProcess({**env, "EFFNET_WORKERS": "1"},
                                                                  threads=args.threads, ready_timeout=600)),
        (f"LitServe, 2 API servers, 1 inference worker ({args.threads} threads)",
         lambda: LitServeProcess(1, 2, args.threads)),
        ("LitServe, 2 API servers, 2 inference workers (1 thread each)",
         lambda: LitServeProcess(2, 2, max(1, args.threads // 2))),
    ]
    makers = dict(plans)
    rows, memory, starts, idle, tops = [], {}, {}, {}, {}

    def options(server) -> dict:
        if isinstance(server, LitServeProcess):
            return {"batches": True, "batch_reader": server.batches, "classify": litserve_role}
        return {"batches": True}

    def alone(label: str, r: int, load: str, step) -> dict:
        """Start ``label`` (no other server is up: LitServe's idle processes poll and would take CPU from the
        one measured), settle it, measure its idle CPU, run ``step(server)``, record its memory, stop it."""
        t = time.perf_counter()
        server = makers[label]()
        try:
            server.wait_ready()
            starts.setdefault(label, []).append(time.perf_counter() - t)
            if label not in tops:
                tops[label] = top1(server.url, bodies[:20])
            time.sleep(1.0)
            window = CpuWindow(server.pid, classify=litserve_role if isinstance(server, LitServeProcess) else role)
            time.sleep(args.idle_seconds)
            cpu = window.close()
            idle.setdefault(label, []).append(cpu["server_cpu_s"] / cpu["elapsed_s"])
            run_load(server.url, bodies, seconds=2.0, connections=args.clients)  # settle
            row = step(server)
            memory[label] = rss_tree(server.pid, litserve_name if isinstance(server, LitServeProcess) else
                                     process_name)
        finally:
            server.stop()
        row.update(round=r, server=label, load=load, idle_cores=idle[label][-1])
        rows.append(row)
        _print(row)
        return row

    for r in range(args.rounds):
        saturated = {}
        for label in rotated(list(makers), r):
            row = alone(label, r, f"{args.clients} connections", lambda s: measure(s, lambda: run_load(
                s.url, bodies, seconds=args.seconds, connections=args.clients), **options(s)))
            saturated[label] = row["requests_per_s"]
        rate = args.rate_fraction * min(saturated.values())
        for label in rotated(list(makers), r):
            alone(label, r, "fixed rate", lambda s, q=rate, seed=r: measure(s, lambda: run_rate(
                s.url, bodies, rate=q, raw=False, seconds=args.seconds, seed=seed), **options(s)))
    first = next(iter(tops.values()))
    result["agreement"] = {label: float(np.mean(np.array(t) == np.array(first))) for label, t in tops.items()}
    result["loadavg_after"] = loadavg()
    ours = plans[0][0]
    ratios = []
    for r in range(args.rounds):
        for load in (f"{args.clients} connections", "fixed rate"):
            got = {row["server"]: row for row in rows if row["round"] == r and row["load"] == load}
            for label in got:
                if label != ours:
                    ratios.append({"round": r, "load": load, "peer": label,
                                   "images_ratio": got[ours]["requests_per_s"] / got[label]["requests_per_s"],
                                   "cpu_ratio": got[ours]["server_cpu_ms"] / got[label]["server_cpu_ms"]})
    result.update(rows=rows, summary=median_rows(rows, KEYS, ("server", "load")), ratios=ratios, memory=memory,
                  starts=starts, idle_cores=idle)

    print(SUMMARY_MARKER)
    print(f"Machine: {result['machine']}; LitServe {result['litserve']}; load average before: "
          f"{result['loadavg_before']}; after: {result['loadavg_after']}")
    print(f"Lite0 float32 (onnxruntime), {len(bodies)} ImageNet photos as multipart uploads, loadgen on the same "
          f"CPUs; median of {args.rounds} rounds of {args.seconds:g} s. Top-1 agreement with "
          f"{ours} on 20 photos: " + ", ".join(f"{v:.2f}" for v in result["agreement"].values()))
    print(markdown_table(result["summary"], [
        ("server", "server", ""), ("load", "load", ""), ("requests_per_s", "images/s", ".1f"),
        ("p50_ms", "p50 ms", ".1f"), ("p99_ms", "p99 ms", ".1f"), ("mean_batch", "mean batch", ".2f"),
        ("server_cpu_ms", "server CPU ms/img", ".2f"), ("worker_cpu_ms", "front-ends", ".2f"),
        ("engine_cpu_ms", "engine / inference workers", ".2f"), ("root_cpu_ms", "main process", ".2f"),
        ("client_cpu_ms", "loadgen CPU ms/img", ".2f"), ("rest_of_machine_cores", "rest of machine cores", ".2f"),
        ("idle_cores", "idle server cores", ".3f"), ("errors", "errors", ".0f")]))
    print(f"\n{ours} / each other server, same round (images/s; server CPU per image):")
    for peer in [label for label, _ in plans[1:]]:
        for load in (f"{args.clients} connections", "fixed rate"):
            mine = [x for x in ratios if x["peer"] == peer and x["load"] == load]
            images = [x["images_ratio"] for x in mine]
            cpu = [x["cpu_ratio"] for x in mine]
            print(f"- {peer}, {load}: images/s {', '.join(f'{v:.2f}' for v in images)} (median "
                  f"{statistics.median(images):.2f}); CPU/img {', '.join(f'{v:.2f}' for v in cpu)} (median "
                  f"{statistics.median(cpu):.2f})")
    print("\nMemory once warm (VmRSS, MiB):")
    print(markdown_table([{"server": k, "processes": ", ".join(f"{n} {v:.0f}" for n, v in m.items()),
                           "total": sum(m.values())} for k, m in memory.items()],
                         [("server", "server", ""), ("processes", "each process", ""), ("total", "sum", ".0f")]))
    print("Starts (to ready, median): " + "; ".join(f"{k} {statistics.median(v):.1f} s" for k, v in starts.items()))
    print(f"\nsaved {save_json(args.name, result)}")
    return 0


def _print(row: dict) -> None:
    print(f"round {row['round']} {row['server']:60s} {row['load']:15s}: {row['requests_per_s']:6.1f} img/s  "
          f"p50 {row['p50_ms']:7.1f}  p99 {row['p99_ms']:7.1f} ms  batch {row['mean_batch']:.2f}  server "
          f"{row['server_cpu_ms']:.2f} CPU-ms/img  rest of machine {row['rest_of_machine_cores']:.2f} cores  "
          f"codes {row['codes']}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
