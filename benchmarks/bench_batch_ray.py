"""efficientnet-batch --ray against the local, in-process run, on one machine.

Every run is a real ``efficientnet-batch predict PHOTOS`` process writing a .jsonl; this script watches the
file grow and takes, per run: the start-up (launch to the first row: interpreter, model load, and with
--ray the cluster and the actors), the throughput (rows after the first over the time from the first row
to the last) and the wall time of the whole command. Configurations, alternating, ``--rounds`` times:

- local: in-process, the default settings (onnxruntime, all CPUs), and with one inference thread (as
  many as an actor of 1 CPU runs: on a busy machine two threads can lose more to waiting than they gain);
- ``--ray``: a Ray cluster of this machine started by the command for the run (all CPUs);
- ``--ray ADDRESS`` on clusters of ``ray start`` processes (tests/helpers/ray_cluster.py), a head with no
  CPUs (it only coordinates) and: 1 worker node of ``--node-cpus`` CPUs; 2 such nodes; 2 nodes of half as
  many. The nodes share this machine's cores, so a second node adds Ray's overhead, not speed: 2 nodes of
  2 CPUs on 2 cores is oversubscribed (twice the actors and decoding tasks for the same cores), and 2 nodes
  of 1 CPU hold the same work as 1 node of 2 (one actor, one decoding task) on two nodes' processes.

The rows of every run are checked against the local run's (same paths, same top-5 indices).

    python -m benchmarks.bench_batch_ray --photos /tmp/imagenet-sample [--rounds 2] [--node-cpus 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.helpers.ray_cluster import RayNodes, ray_env
from tests.helpers.server import REPO

from .common import SUMMARY_MARKER, machine, markdown_table, save_json


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def count_lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(1 for line in f if line.endswith(b"\n"))
    except FileNotFoundError:
        return 0


def timed_run(photos: Path, output: Path, extra: list[str], total: int, **env: str) -> dict[str, float]:
    """One command, watched: seconds to the first row, rows/s from the first row to the last, wall."""
    output.unlink(missing_ok=True)
    args = [sys.executable, "-m", "service.cli", "predict", str(photos), "-o", str(output), "--top-k", "5",
            "--progress-every", "3600", *extra]
    started = time.perf_counter()
    process = subprocess.Popen(args, cwd=REPO, env=ray_env(**env), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    first_at = first_rows = None
    while process.poll() is None:
        rows = count_lines(output)
        if rows and first_at is None:
            first_at, first_rows = time.perf_counter(), rows
        if rows >= total:
            last_at = time.perf_counter()
            break
        time.sleep(0.01)
    else:
        last_at = time.perf_counter()
    _, stderr = process.communicate(timeout=600)
    wall = time.perf_counter() - started
    if process.returncode != 0 or count_lines(output) != total or first_at is None:
        raise RuntimeError(f"{' '.join(extra) or 'local'} failed ({process.returncode}):\n{stderr[-3000:]}")
    return {"startup_s": first_at - started, "images_per_s": (total - first_rows) / (last_at - first_at),
            "wall_s": wall, "summary": stderr.strip().splitlines()[-1]}


def top5(path: Path) -> dict[str, list[int]]:
    return {row["path"]: [c["index"] for c in row["top_k"]] for row in map(json.loads, path.read_text().splitlines())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=Path, required=True, help="folder of photos (the ImageNet sample: 1000)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--node-cpus", type=int, default=2, help="CPUs of each worker node of the ray start cluster")
    args = parser.parse_args()
    total = sum(1 for p in args.photos.iterdir() if p.suffix.lower() in (".jpeg", ".jpg"))
    load_before = load_average()
    runs: dict[str, list[dict[str, float]]] = {}

    def record(name: str, result: dict[str, float]) -> None:
        runs.setdefault(name, []).append(result)
        print(f"{name:40s} start-up {result['startup_s']:5.1f} s, {result['images_per_s']:6.1f} images/s, "
              f"wall {result['wall_s']:5.1f} s | {result['summary']}", flush=True)

    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
        out = Path(tmp)
        for _ in range(args.rounds):
            record("local (in-process)", timed_run(args.photos, out / "local.jsonl", [], total))
            record("local, EFFNET_NUM_THREADS=1", timed_run(args.photos, out / "local1.jsonl", [], total,
                                                            EFFNET_NUM_THREADS="1"))
            record("--ray (local cluster, started)", timed_run(args.photos, out / "ray.jsonl", ["--ray"], total))
        reference = top5(out / "local.jsonl")
        assert top5(out / "ray.jsonl") == reference, "--ray rows differ from the local run's"

        cpus = args.node_cpus
        one, two = f"1 worker node of {cpus} CPUs", f"2 worker nodes of {cpus} CPUs"
        split = f"2 worker nodes of {cpus // 2} CPU{'s' * (cpus // 2 != 1)}"
        for name, layout in ((one, [cpus]), (two, [cpus, cpus]), (split, [cpus // 2, cpus // 2])):
            with RayNodes() as nodes:
                nodes.start(head_cpus=0)  # the head only coordinates: the work goes to the worker nodes
                for node_cpus in layout:
                    nodes.add(cpus=node_cpus)
                for _ in range(args.rounds):
                    record(f"--ray ADDRESS, {name}", timed_run(args.photos, out / "cluster.jsonl",
                                                               ["--ray", nodes.address], total))
                assert top5(out / "cluster.jsonl") == reference

    rows = [{"run": name, "startup": statistics.median(r["startup_s"] for r in results),
             "best": max(r["images_per_s"] for r in results),
             "median": statistics.median(r["images_per_s"] for r in results),
             "wall": statistics.median(r["wall_s"] for r in results), "n": len(results)}
            for name, results in runs.items()]
    best = {row["run"]: row["best"] for row in rows}
    local = best["local (in-process)"]
    print(SUMMARY_MARKER)
    print(f"Machine: {machine()}; efficientnet-lite0, default settings (onnxruntime); {total} photos "
          f"({args.photos.name}); {args.rounds} rounds; load average before {load_before}, after {load_average()}")
    print(markdown_table(rows, [("run", "run", ""), ("startup", "start-up to first row (s, median)", ".1f"),
                                ("best", "best images/s", ".1f"), ("median", "median images/s", ".1f"),
                                ("wall", "wall (s, median)", ".1f"), ("n", "runs", "d")]))
    print()
    ratio = best["--ray (local cluster, started)"] / local
    print(f"--ray / local, throughput (best of {args.rounds}): {best['--ray (local cluster, started)']:.1f} / "
          f"{local:.1f} = {ratio:.2f}")
    base = best[f"--ray ADDRESS, {one}"]
    for name in (two, split):
        rate = best[f"--ray ADDRESS, {name}"]
        print(f"{name} / {one} (same host, best of {args.rounds}): {rate:.1f} / {base:.1f} = {rate / base:.2f}")
    save_json("batch_ray", {"machine": machine(), "photos": total, "runs": runs, "load_before": load_before,
                            "load_after": load_average()})
    return 0


if __name__ == "__main__":
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    sys.exit(main())
