"""Several processes (issue 28): N front-end workers feeding one engine process, against one process.

``EFFNET_WORKERS=N`` (N > 1) makes the server a supervisor of one engine process (``effnet-engine``: the
models, batchers and engines) and N workers (``effnet-worker-0``..: every door, decoding, pixels to the
engine in shared memory); ``EFFNET_WORKERS=1`` is the one process of before. Parts:

- ``frontend``: what the front-ends can feed, with 1, 2 and 3 workers. ``EFFNET_BACKEND=null`` (the engine
  answers zeros at once), a raw single-image ``/predict`` of a 224x224 JPEG made from each test photo,
  ``benchmarks.loadgen`` (keep-alive, closed loop) with 16 and 64 connections. Per row: requests/s, client
  p50/p99, the server's CPU per request summed over the supervisor and every process under it
  (``/proc/<pid>/stat`` utime+stime of each, before and after), split by process, the busiest thread of
  the engine process and of a worker (the event loops: a thread cannot use more than one core), the load
  generator's CPU, and the CPU the rest of the machine used meanwhile (``/proc/stat``; other work on a
  shared machine shows up there).
  From the CPU per request: the capacity of a 16- and a 64-core host (the assumption is printed with it).
- ``lite0``: the real Lite0 (onnxruntime, 2 inference threads) on ImageNet-sized photos, float32 and
  ``EFFNET_DTYPE=int8`` (calibrated on every tenth photo of ``--photos``, as ``bench_int8`` does; the first
  int8 server fills the quantisation cache and the others start from it), 1 worker against N. Served: the
  other 900 photos as raw ``/predict`` bodies. Two loads per round: ``loadgen`` with ``--clients``
  keep-alive connections (a fixed concurrency: saturation), and a fixed request rate (open loop, Poisson
  arrivals with the same seed for every server; the rate is 60% of the lower saturated rate of the two
  servers of that dtype in the same round), which is the equal offered load the mean batch size is read
  at (``effnet_batch_size_sum`` / ``_count`` from ``/metrics``, before and after). The float32 offline
  pipeline is ``bench_service.offline_pipeline`` (decode, preprocess, the same engine, one loop, no
  HTTP), run once per round in this process; its better of batch 1 and 8 is the denominator.
- Memory (with both parts): VmRSS of every process of each server once warm (after its loads).

Every server is started once (one at a time) and stays up; in each round every server takes its turn at
every load, the order turning from round to round, so each ratio (N workers / 1 in the same round) comes
from one run. The load average before and after is printed.

    python -m benchmarks.bench_workers [--parts frontend lite0] [--seconds 8] [--rounds 3]
        [--frontend-workers 1 2 3] [--workers 1 2] [--photos /tmp/imagenet-sample]

Run it alone on a quiet machine (``flock``): the load generator shares the cores with the servers.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import multiprocessing as mp
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from tests.helpers.images import load_photos
from tests.helpers.server import ServiceProcess

from .bench_service import batch_stats, offline_pipeline
from .common import SUMMARY_MARKER, machine, markdown_table, save_json
from .loadgen import _CLOSE, _LENGTH, encode_request, run_load

TICK = os.sysconf("SC_CLK_TCK")
CALIBRATE_EVERY = 10  # bench_int8's split: the first of every ten photos (by name) calibrates


# --- processes, CPU and memory from /proc ------------------------------------------------------------------------
def _stat_fields(path: str) -> list[str]:
    with open(path) as f:
        return f.read().rsplit(")", 1)[1].split()


def process_tree(root: int) -> dict[int, str]:
    """``root`` and every process under it (children, grandchildren...): pid -> ``/proc/<pid>/comm``."""
    parents: dict[int, int] = {}
    names: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parents[int(entry.name)] = int(_stat_fields(f"/proc/{entry.name}/stat")[1])
            names[int(entry.name)] = (entry / "comm").read_text().strip()
        except (OSError, IndexError, ValueError):
            continue
    tree = {root: names.get(root, "?")}
    grew = True
    while grew:
        grew = False
        for pid, ppid in parents.items():
            if ppid in tree and pid not in tree:
                tree[pid] = names[pid]
                grew = True
    return tree


def cpu_s(pid: int, tid: int | None = None) -> float:
    """utime + stime of a process (or of one of its threads), in seconds; 0 if it is gone."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    try:
        fields = _stat_fields(path)
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def threads_cpu_s(pid: int) -> dict[int, float]:
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return {}
    return {tid: cpu_s(pid, tid) for tid in tids}


def machine_busy_s() -> float:
    """CPU seconds the whole machine spent not idle (all CPUs), from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return (sum(values[:8]) - idle) / TICK


def role(comm: str, pid: int, root: int) -> str:
    """What a process of a server is: supervisor (or the one process), engine, worker, or other (the
    resource tracker of ``multiprocessing``, a peer's own helpers)."""
    if pid == root:
        return "root"
    if comm.startswith("effnet-engine"):
        return "engine"
    if comm.startswith("effnet-worker"):
        return "worker"
    return "other"


class CpuWindow:
    """CPU of a process tree (and of the machine) between ``__init__`` and ``close()``."""

    def __init__(self, root: int, thread_roles: tuple[str, ...] = ("engine", "worker", "root"),
                 classify=role) -> None:
        self.root = root
        self.tree = process_tree(root)
        self.classify = classify
        self.before = {pid: cpu_s(pid) for pid in self.tree}
        self.threads_before = {pid: threads_cpu_s(pid) for pid, comm in self.tree.items()
                               if classify(comm, pid, root) in thread_roles}
        self.busy_before = machine_busy_s()
        self.t0 = time.perf_counter()

    def close(self) -> dict:
        elapsed = time.perf_counter() - self.t0
        busy = machine_busy_s() - self.busy_before
        by_role: Counter = Counter()
        by_process: dict[str, float] = {}
        busiest: dict[str, float] = {}
        main_thread: dict[str, float] = {}
        for pid, comm in self.tree.items():
            used = cpu_s(pid) - self.before[pid]
            kind = self.classify(comm, pid, self.root)
            by_role[kind] += used
            by_process[f"{comm}:{pid}"] = used
            if pid in self.threads_before:
                after = threads_cpu_s(pid)
                top = max((after.get(t, 0.0) - b for t, b in self.threads_before[pid].items()), default=0.0)
                busiest[kind] = max(busiest.get(kind, 0.0), top)
                main = after.get(pid, 0.0) - self.threads_before[pid].get(pid, 0.0)  # the event loop's thread
                main_thread[kind] = max(main_thread.get(kind, 0.0), main)
        return {"elapsed_s": elapsed, "server_cpu_s": sum(by_role.values()), "by_role": dict(by_role),
                "by_process": by_process, "busiest_thread_s": busiest, "main_thread_s": main_thread,
                "machine_busy_s": busy}


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def process_name(comm: str, pid: int, root: int) -> str:
    """A server's process as the tables name it: ``comm`` (``effnet-engine``...), the root as ``supervisor``
    (or ``process`` when it is alone), multiprocessing's helper as ``resource tracker``."""
    if pid == root:
        return "supervisor" if len(process_tree(root)) > 2 else "process"
    if "resource_tracker" in cmdline(pid):
        return "resource tracker"
    return comm


def rss_tree(root: int, name_of=process_name) -> dict[str, float]:
    """VmRSS of every process of a server, in MiB, by ``name_of(comm, pid, root)`` (numbered when repeated)."""
    out: dict[str, float] = {}
    for pid, comm in sorted(process_tree(root).items()):
        try:
            with open(f"/proc/{pid}/status") as f:
                kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            continue
        name = base = name_of(comm, pid, root)
        n = 1
        while name in out:
            n += 1
            name = f"{base} {n}"
        out[name] = kib / 1024
    return out


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().strip()


# --- an open-loop load: a fixed request rate -------------------------------------------------------------------
def _rate_process(url: str, bodies: list[bytes], raw: bool, rate: float, seconds: float, seed: int,
                  start_at: float, queue: mp.Queue, path: str) -> None:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    requests = [encode_request(f"{host}:{port}", path, body, raw=raw) for body in bodies]
    rng = random.Random(seed)
    latencies: list[float] = []
    codes: Counter = Counter()
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    opened = 0

    async def one(request: bytes, due: float) -> None:
        nonlocal opened
        try:
            if idle:
                reader, writer = idle.pop()
            else:
                reader, writer = await asyncio.open_connection(host, port)
                opened += 1
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            match = _LENGTH.search(head)
            if match:
                await reader.readexactly(int(match.group(1)))
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            codes["connection_error"] += 1
            return
        status = head[9:12].decode("ascii", "replace")
        codes[status] += 1
        if status == "200":
            latencies.append(time.perf_counter() - due)  # from when it was due: no coordinated omission
        if match and not _CLOSE.search(head):
            idle.append((reader, writer))
        else:
            writer.close()

    async def main() -> None:
        await asyncio.sleep(max(0.0, start_at - time.time()))
        start = time.perf_counter()
        due, i = start, 0
        pending: set[asyncio.Task] = set()
        while True:
            due += rng.expovariate(rate)
            if due >= start + seconds:
                break
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            task = asyncio.get_running_loop().create_task(one(requests[i % len(requests)], due))
            i += 1
            pending.add(task)
            task.add_done_callback(pending.discard)
        if pending:
            await asyncio.wait(pending, timeout=120)
        for _, writer in idle:
            writer.close()

    cpu0 = time.process_time()
    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())
    queue.put({"latencies": latencies, "codes": dict(codes), "cpu_s": time.process_time() - cpu0,
               "connections": opened})


def run_rate(url: str, bodies: list[bytes], *, rate: float, seconds: float, raw: bool = True, seed: int = 0,
             path: str = "/predict") -> dict:
    """Poisson arrivals at ``rate`` requests/s for ``seconds`` (the same arrivals for the same ``seed``),
    each on an idle kept-alive connection or a new one; latency from when each request was due."""
    ctx = mp.get_context("fork")
    queue: mp.Queue = ctx.Queue()
    process = ctx.Process(target=_rate_process,
                          args=(url, bodies, raw, rate, seconds, seed, time.time() + 0.5, queue, path))
    process.start()
    r = queue.get(timeout=seconds + 180)
    process.join(timeout=10)
    latencies = sorted(r["latencies"])
    q = statistics.quantiles(latencies, n=100) if len(latencies) >= 2 else [float("nan")] * 99
    return {"requests_per_s": len(latencies) / seconds, "ok": len(latencies), "codes": r["codes"],
            "p50_ms": q[49] * 1e3, "p99_ms": q[98] * 1e3, "client_cpu_s": r["cpu_s"],
            "connections": r["connections"], "offered_per_s": rate}


# --- measuring one server under one load ------------------------------------------------------------------------
def measure(server, load, *, batches: bool = False, batch_reader=None, classify=role) -> dict:
    """Run ``load()`` (a loadgen or run_rate result) against ``server`` (``.pid``, ``.url``) and read its
    CPU and, with ``batches``, its batch sizes: ``batch_reader()`` -> (images, batches) so far, by default
    the server's effnet_batch_size histogram."""
    read = batch_reader or (lambda: batch_stats(server.url))
    b0 = read() if batches else (0.0, 0.0)
    window = CpuWindow(server.pid, classify=classify)
    r = load()
    cpu = window.close()
    b1 = read() if batches else (0.0, 0.0)
    n = max(r["ok"], 1)
    errors = sum(v for k, v in r["codes"].items() if k != "200")
    roles = cpu["by_role"]
    row = {
        "requests_per_s": r["requests_per_s"], "p50_ms": r["p50_ms"], "p99_ms": r["p99_ms"], "ok": r["ok"],
        "errors": errors, "codes": r["codes"],
        "server_cpu_ms": cpu["server_cpu_s"] / n * 1e3,
        "worker_cpu_ms": roles.get("worker", 0.0) / n * 1e3,
        "engine_cpu_ms": roles.get("engine", 0.0) / n * 1e3,
        "root_cpu_ms": roles.get("root", 0.0) / n * 1e3,
        "other_proc_cpu_ms": roles.get("other", 0.0) / n * 1e3,
        "engine_thread_ms": cpu["busiest_thread_s"].get("engine", 0.0) / n * 1e3,
        "engine_loop_ms": cpu["main_thread_s"].get("engine", 0.0) / n * 1e3,
        "worker_thread_ms": cpu["busiest_thread_s"].get("worker", cpu["busiest_thread_s"].get("root", 0.0))
        / n * 1e3,
        "client_cpu_ms": r["client_cpu_s"] / n * 1e3,
        "server_cores": cpu["server_cpu_s"] / cpu["elapsed_s"],
        "rest_of_machine_cores": max(0.0, cpu["machine_busy_s"] - cpu["server_cpu_s"] - r["client_cpu_s"])
        / cpu["elapsed_s"],
        "by_process_s": cpu["by_process"],
    }
    if batches:
        row["mean_batch"] = (b1[0] - b0[0]) / max(b1[1] - b0[1], 1)
    if "offered_per_s" in r:
        row["offered_per_s"] = r["offered_per_s"]
    return row


def start(label: str, env: dict[str, str], threads: int | None) -> tuple[ServiceProcess, dict]:
    t = time.perf_counter()
    server = ServiceProcess(env, threads=threads, ready_timeout=600)
    server.wait_ready()
    facts = {"server": label, "ready_s": time.perf_counter() - t}
    info = httpx.get(f"{server.url}/info", timeout=30).json()
    quantization = info.get("quantization") or {}
    facts.update(backend=info.get("backend"), precision=info.get("precision"),
                 cache_hit=quantization.get("cache_hit"), threads=info.get("threads"),
                 processes=sorted(process_tree(server.pid).values()))
    print(f"started {label}: {facts}", flush=True)
    return server, facts


def median_rows(rows: list[dict], keys: tuple[str, ...], group: tuple[str, ...]) -> list[dict]:
    """One row per ``group`` value: the median over rounds of each of ``keys``."""
    out: dict[tuple, dict] = {}
    for row in rows:
        out.setdefault(tuple(row[g] for g in group), {g: row[g] for g in group})
    for ident, merged in out.items():
        mine = [r for r in rows if tuple(r[g] for g in group) == ident]
        for k in keys:
            values = [r[k] for r in mine if k in r]
            if values:
                merged[k] = statistics.median(values)
        merged["rounds"] = len(mine)
    return list(out.values())


def rotated(items: list, r: int) -> list:
    k = r % len(items)
    return items[k:] + items[:k]


# --- part (a): front-end capacity with the null engine -----------------------------------------------------------
def small_jpegs(size: int = 224) -> list[bytes]:
    """A ``size`` x ``size`` JPEG (quality 90) from each test photo: resize the short side, crop the centre."""
    from PIL import Image

    out = []
    for data in load_photos().values():
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("RGB")
            scale = size / min(im.size)
            im = im.resize((max(size, round(im.width * scale)), max(size, round(im.height * scale))),
                           Image.Resampling.BICUBIC)
            left, top = (im.width - size) // 2, (im.height - size) // 2
            buffer = io.BytesIO()
            im.crop((left, top, left + size, top + size)).save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


FRONTEND_KEYS = ("requests_per_s", "p50_ms", "p99_ms", "server_cpu_ms", "worker_cpu_ms", "engine_cpu_ms",
                 "root_cpu_ms", "other_proc_cpu_ms", "engine_thread_ms", "engine_loop_ms", "worker_thread_ms",
                 "client_cpu_ms", "server_cores", "rest_of_machine_cores", "errors")


def frontend(args: argparse.Namespace, extra: dict[str, str]) -> dict:
    jpegs = small_jpegs()
    servers: dict[int, ServiceProcess] = {}
    facts, rows, memory = [], [], {}
    try:
        for w in args.frontend_workers:
            env = {"EFFNET_WORKERS": str(w), "EFFNET_BACKEND": "null", "EFFNET_MAX_QUEUE": "256", **extra}
            servers[w], fact = start(f"null, {w} worker(s)", env, threads=None)
            facts.append(fact)
        for server in servers.values():  # settle: connections, caches, the first batches
            run_load(server.url, jpegs, seconds=1.0, connections=max(args.connections), raw=True)
        for r in range(args.rounds):
            for connections in args.connections:
                for w in rotated(list(servers), r):
                    server = servers[w]
                    run_load(server.url, jpegs, seconds=1.0, connections=connections, raw=True)  # settle
                    row = measure(server, lambda s=server, c=connections: run_load(
                        s.url, jpegs, seconds=args.seconds, connections=c, raw=True))
                    row.update(round=r, workers=w, connections=connections)
                    rows.append(row)
                    print(f"round {r} null x{connections:3d} workers {w}: {row['requests_per_s']:7.0f} req/s  "
                          f"p50 {row['p50_ms']:6.1f}  p99 {row['p99_ms']:6.1f} ms  server "
                          f"{row['server_cpu_ms']:.3f} CPU-ms/req (workers {row['worker_cpu_ms']:.3f}, engine "
                          f"{row['engine_cpu_ms']:.3f}, root {row['root_cpu_ms']:.3f})  client "
                          f"{row['client_cpu_ms']:.3f}  rest of machine {row['rest_of_machine_cores']:.2f} cores  "
                          f"errors {row['errors']}", flush=True)
        for w, server in servers.items():
            memory[f"null, {w} worker(s)"] = rss_tree(server.pid)
    finally:
        for server in servers.values():
            server.stop()
    base = min(args.frontend_workers)
    ratios = []
    for r in range(args.rounds):
        for connections in args.connections:
            got = {row["workers"]: row for row in rows if row["round"] == r and row["connections"] == connections}
            for w in args.frontend_workers:
                if w != base:
                    ratios.append({"round": r, "connections": connections, "workers": w,
                                   "ratio": got[w]["requests_per_s"] / got[base]["requests_per_s"]})
    return {"facts": facts, "rows": rows, "summary": median_rows(rows, FRONTEND_KEYS, ("connections", "workers")),
            "ratios": ratios, "memory": memory, "images": [len(j) for j in jpegs]}


def projection(summary: list[dict], cores: tuple[int, ...] = (2, 16, 64)) -> list[dict]:
    """Requests/s a host of C cores could serve, from the several-worker row with the most requests/s: the
    CPU bound C / (server CPU per request) and the engine thread's bound 1 / (its CPU per request)."""
    multi = [s for s in summary if s["workers"] > 1]
    if not multi:
        return []
    top = max(multi, key=lambda s: s["requests_per_s"])  # where the fixed costs weigh least
    out = []
    for c in cores:
        cpu_bound = c * 1e3 / top["server_cpu_ms"]
        engine_bound = 1e3 / top["engine_thread_ms"] if top["engine_thread_ms"] > 0 else float("inf")
        out.append({"cores": c, "from": f"{top['workers']} workers, {top['connections']} connections",
                    "server_cpu_ms": top["server_cpu_ms"], "cpu_bound": cpu_bound,
                    "engine_thread_ms": top["engine_thread_ms"], "engine_bound": engine_bound,
                    "projection": min(cpu_bound, engine_bound)})
        rate = out[-1]["projection"]
        out[-1].update(engine_cores=top["engine_cpu_ms"] * rate / 1e3,
                       worker_cores=(top["worker_cpu_ms"] + top["root_cpu_ms"] + top["other_proc_cpu_ms"]) * rate / 1e3)
    return out


# --- part (b): the real Lite0, float32 and int8 ------------------------------------------------------------------
def imagenet(folder: Path) -> tuple[list[Path], list[Path]]:
    """(calibration photos, served photos): bench_int8's split of the labelled sample by name."""
    files = sorted(p for p in folder.iterdir() if p.name.startswith("n") and p.suffix.lower() in (".jpeg", ".jpg"))
    if len(files) < 200:
        raise SystemExit(f"{folder}: expected the ImageNet sample (1000 JPEGs), found {len(files)}")
    calibrate = [p for i, p in enumerate(files) if i % CALIBRATE_EVERY == 0]
    served = [p for i, p in enumerate(files) if i % CALIBRATE_EVERY != 0]
    return calibrate, served


def offline_photos(bodies: list[bytes], count: int = 64) -> list[bytes]:
    """For ``offline_pipeline``, which times batch 1 on the first photo and batch 8 on the first eight:
    the eight photos nearest the mean size first (so its figure is the served set's), then others."""
    mean = statistics.mean(len(b) for b in bodies)
    order = sorted(range(len(bodies)), key=lambda i: abs(len(bodies[i]) - mean))
    first = order[:8]
    rest = [i for i in range(len(bodies)) if i not in set(first)][: count - 8]
    return [bodies[i] for i in first + rest]


LITE0_KEYS = ("requests_per_s", "p50_ms", "p99_ms", "server_cpu_ms", "worker_cpu_ms", "engine_cpu_ms",
              "root_cpu_ms", "engine_thread_ms", "engine_loop_ms", "worker_thread_ms", "client_cpu_ms", "server_cores",
              "rest_of_machine_cores", "mean_batch", "errors", "offered_per_s", "x_offline")


def lite0(args: argparse.Namespace, extra: dict[str, str]) -> dict:
    calibrate, served = imagenet(args.photos)
    bodies = [p.read_bytes() for p in served]
    offline_set = offline_photos(bodies)
    work = Path(tempfile.mkdtemp(prefix="bench-workers-"))
    cal_dir = work / "calibration"
    cal_dir.mkdir()
    for p in calibrate:
        os.symlink(p, cal_dir / p.name)
    cache = str(args.cache_dir or work / "cache")
    int8 = {"EFFNET_DTYPE": "int8", "EFFNET_CALIBRATION_DIR": str(cal_dir), "EFFNET_CACHE_DIR": cache}
    servers: dict[tuple[str, int], ServiceProcess] = {}
    facts, rows, offline_runs, memory = [], [], [], {}
    try:
        for dtype in args.dtypes:
            for w in args.workers:
                env = {"EFFNET_WORKERS": str(w), "EFFNET_BACKEND": "onnxruntime", "EFFNET_MAX_QUEUE": "256",
                       **(int8 if dtype == "int8" else {}), **extra}
                servers[dtype, w], fact = start(f"{dtype}, {w} worker(s)", env, threads=args.threads)
                facts.append(fact)
        for server in servers.values():
            run_load(server.url, bodies[:64], seconds=1.0, connections=args.clients, raw=True)
        for r in range(args.rounds):
            t = time.perf_counter()
            offline = offline_pipeline("efficientnet-lite0", args.threads, offline_set, args.offline_seconds)
            offline["images_per_s"] = max(offline["pipeline_b1_images_per_s"], offline["pipeline_b8_images_per_s"])
            offline.update(round=r, took_s=time.perf_counter() - t)
            offline_runs.append(offline)
            print(f"round {r} offline float32 pipeline: {offline}", flush=True)
            saturated: dict[tuple[str, int], float] = {}
            for key in rotated(list(servers), r):
                server = servers[key]
                run_load(server.url, bodies, seconds=1.0, connections=args.clients, raw=True)  # settle
                row = measure(server, lambda s=server: run_load(s.url, bodies, seconds=args.seconds,
                                                                connections=args.clients, raw=True), batches=True)
                row.update(round=r, dtype=key[0], workers=key[1], load=f"{args.clients} connections",
                           x_offline=row["requests_per_s"] / offline["images_per_s"])
                saturated[key] = row["requests_per_s"]
                rows.append(row)
                _print_lite0(row)
            for dtype in args.dtypes:
                rate = args.rate_fraction * min(v for k, v in saturated.items() if k[0] == dtype)
                for w in rotated(list(args.workers), r):
                    server = servers[dtype, w]
                    row = measure(server, lambda s=server, q=rate, seed=r: run_rate(
                        s.url, bodies, rate=q, seconds=args.seconds, seed=seed), batches=True)
                    row.update(round=r, dtype=dtype, workers=w, load="fixed rate",
                               x_offline=row["requests_per_s"] / offline["images_per_s"])
                    rows.append(row)
                    _print_lite0(row)
        for key, server in servers.items():
            memory[f"{key[0]}, {key[1]} worker(s)"] = rss_tree(server.pid)
    finally:
        for server in servers.values():
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
    ratios = []
    base = min(args.workers)
    for r in range(args.rounds):
        for dtype in args.dtypes:
            for load in (f"{args.clients} connections", "fixed rate"):
                got = {row["workers"]: row for row in rows
                       if row["round"] == r and row["dtype"] == dtype and row["load"] == load}
                for w in args.workers:
                    if w != base:
                        ratios.append({"round": r, "dtype": dtype, "load": load, "workers": w,
                                       "ratio": got[w]["requests_per_s"] / got[base]["requests_per_s"],
                                       "batch_ratio": got[w]["mean_batch"] / max(got[base]["mean_batch"], 1e-9)})
    return {"facts": facts, "rows": rows, "summary": median_rows(rows, LITE0_KEYS, ("dtype", "workers", "load")),
            "ratios": ratios, "offline": offline_runs, "memory": memory, "photos": len(bodies),
            "calibration_photos": len(calibrate), "mean_photo_bytes": statistics.mean(len(b) for b in bodies)}


def _print_lite0(row: dict) -> None:
    print(f"round {row['round']} {row['dtype']:7s} workers {row['workers']} {row['load']:15s}: "
          f"{row['requests_per_s']:6.1f} img/s ({row['x_offline']:.2f}x offline)  p50 {row['p50_ms']:7.1f}  "
          f"p99 {row['p99_ms']:7.1f} ms  batch {row['mean_batch']:.2f}  server {row['server_cpu_ms']:.2f} "
          f"CPU-ms/img  rest of machine {row['rest_of_machine_cores']:.2f} cores  codes {row['codes']}", flush=True)


# --- report ------------------------------------------------------------------------------------------------------
def report(result: dict) -> None:
    print(SUMMARY_MARKER)
    print(f"Machine: {result['machine']}; load average before: {result['loadavg_before']}; after: "
          f"{result['loadavg_after']}")
    if "frontend" in result:
        f = result["frontend"]
        print(f"\nFront-end capacity: EFFNET_BACKEND=null, raw /predict of a 224x224 JPEG "
              f"({'/'.join(str(b) for b in f['images'])} bytes), loadgen keep-alive on the same CPUs; "
              f"median of {result['rounds']} rounds of {result['seconds']:g} s")
        print(markdown_table(f["summary"], [
            ("connections", "connections", "d"), ("workers", "workers", "d"),
            ("requests_per_s", "requests/s", ".0f"), ("p50_ms", "p50 ms", ".1f"), ("p99_ms", "p99 ms", ".1f"),
            ("server_cpu_ms", "server CPU ms/req", ".3f"), ("worker_cpu_ms", "workers", ".3f"),
            ("engine_cpu_ms", "engine", ".3f"), ("root_cpu_ms", "supervisor / one process", ".3f"),
            ("worker_thread_ms", "busiest worker thread", ".3f"), ("engine_thread_ms", "busiest engine thread", ".3f"),
            ("engine_loop_ms", "engine main thread", ".3f"),
            ("client_cpu_ms", "loadgen CPU ms/req", ".3f"), ("server_cores", "server cores", ".2f"),
            ("rest_of_machine_cores", "rest of machine cores", ".2f"), ("errors", "errors", ".0f")]))
        print("\nN workers / 1, same round (requests/s):")
        for c in result["connections"]:
            for w in result["frontend_workers"]:
                values = [x["ratio"] for x in f["ratios"] if x["connections"] == c and x["workers"] == w]
                if values:
                    print(f"- {c} connections, {w} workers: {', '.join(f'{v:.2f}' for v in values)} "
                          f"(median {statistics.median(values):.2f})")
        if f.get("projection"):
            print("\nProjection (assumption: the CPU per request measured here stays the same on a bigger host: "
                  "the load generator elsewhere, workers = cores less the engine's share, and the engine "
                  "process's busiest thread, which cannot use more than one core, the other bound):")
            print(markdown_table(f["projection"], [
                ("cores", "cores", "d"), ("from", "from the row", ""), ("server_cpu_ms", "server CPU ms/req", ".3f"),
                ("cpu_bound", "cores / CPU per req", ".0f"), ("engine_thread_ms", "engine thread ms/req", ".3f"),
                ("engine_bound", "engine thread bound", ".0f"), ("projection", "requests/s", ".0f"),
                ("engine_cores", "engine cores at that rate", ".1f"),
                ("worker_cores", "worker cores at that rate", ".1f")]))
    if "lite0" in result:
        lt = result["lite0"]
        offline = [o["images_per_s"] for o in lt["offline"]]
        print(f"\nLite0 (onnxruntime, {result['threads']} inference threads), {lt['photos']} ImageNet photos "
              f"(mean {lt['mean_photo_bytes'] / 1e3:.0f} kB) as raw /predict bodies; int8 calibrated on "
              f"{lt['calibration_photos']} others. Offline float32 pipeline (bench_service.offline_pipeline, "
              f"best of batch 1 and 8) per round: {', '.join(f'{v:.1f}' for v in offline)} images/s; each row's "
              f"'x offline' is against its own round's. Median of {result['rounds']} rounds of "
              f"{result['seconds']:g} s.")
        print(markdown_table(lt["summary"], [
            ("dtype", "dtype", ""), ("workers", "workers", "d"), ("load", "load", ""),
            ("requests_per_s", "images/s", ".1f"), ("x_offline", "x offline float32", ".2f"),
            ("p50_ms", "p50 ms", ".1f"), ("p99_ms", "p99 ms", ".1f"), ("mean_batch", "mean batch", ".2f"),
            ("server_cpu_ms", "server CPU ms/img", ".2f"), ("worker_cpu_ms", "workers", ".2f"),
            ("engine_cpu_ms", "engine", ".2f"), ("root_cpu_ms", "supervisor / one process", ".2f"),
            ("client_cpu_ms", "loadgen CPU ms/img", ".2f"), ("rest_of_machine_cores", "rest of machine cores", ".2f"),
            ("errors", "errors", ".0f")]))
        print("\nN workers / 1, same round (images/s; mean batch):")
        for x in lt["ratios"]:
            print(f"- round {x['round']}, {x['dtype']}, {x['load']}, {x['workers']} workers: {x['ratio']:.2f}; "
                  f"batch {x['batch_ratio']:.2f}")
        starts = "; ".join(f"{x['server']} ready in {x['ready_s']:.1f} s (cache hit {x['cache_hit']})"
                           for x in lt["facts"])
        print(f"\nStarts: {starts}")
    memory = {**result.get("frontend", {}).get("memory", {}), **result.get("lite0", {}).get("memory", {})}
    if memory:
        print("\nMemory once warm (VmRSS, MiB):")
        rows = [{"server": k, "processes": ", ".join(f"{n} {v:.0f}" for n, v in m.items()), "total": sum(m.values())}
                for k, m in memory.items()]
        print(markdown_table(rows, [("server", "server", ""), ("processes", "each process", ""),
                                    ("total", "sum", ".0f")]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", choices=["frontend", "lite0"], default=["frontend", "lite0"])
    parser.add_argument("--seconds", type=float, default=8.0, help="timed seconds per server and load")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2], help="lite0: EFFNET_WORKERS values")
    parser.add_argument("--frontend-workers", nargs="+", type=int, default=[1, 2, 3],
                        help="frontend: EFFNET_WORKERS values")
    parser.add_argument("--connections", nargs="+", type=int, default=[16, 64], help="frontend: loadgen connections")
    parser.add_argument("--clients", type=int, default=16, help="lite0: loadgen connections (saturating load)")
    parser.add_argument("--rate-fraction", type=float, default=0.6,
                        help="lite0: the fixed rate, as a fraction of the lower saturated rate of the round")
    parser.add_argument("--dtypes", nargs="+", choices=["float32", "int8"], default=["float32", "int8"])
    parser.add_argument("--photos", type=Path, default=Path("/tmp/imagenet-sample"))
    parser.add_argument("--cache-dir", type=Path, help="EFFNET_CACHE_DIR for int8 (default: a new folder)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="EFFNET_NUM_THREADS (lite0)")
    parser.add_argument("--offline-seconds", type=float, default=3.0)
    parser.add_argument("--env", nargs="*", default=[], metavar="EFFNET_X=VALUE", help="extra server settings")
    parser.add_argument("--name", default="workers", help="results file: benchmarks/results/<name>.json")
    args = parser.parse_args()
    extra = dict(kv.split("=", 1) for kv in args.env)
    result: dict = {"machine": machine(), "loadavg_before": loadavg(), "seconds": args.seconds,
                    "rounds": args.rounds, "workers": args.workers, "frontend_workers": args.frontend_workers,
                    "connections": args.connections,
                    "threads": args.threads, "settings": extra, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(f"load average before: {result['loadavg_before']}", flush=True)
    if "frontend" in args.parts:
        result["frontend"] = frontend(args, extra)
        result["frontend"]["projection"] = projection(result["frontend"]["summary"])
    if "lite0" in args.parts:
        result["lite0"] = lite0(args, extra)
    result["loadavg_after"] = loadavg()
    report(result)
    path = save_json(args.name, result)
    print(f"\nsaved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
