"""What serving several models costs: start-up time and memory per model, and the throughput of one model
when another is loaded beside it (and idle), against a server of that model alone.

Servers (onnxruntime on CPU, all CPUs, one at a time while starting):
- ``lite0 alone``: EFFNET_MODEL=efficientnet-lite0 (the packaged weights);
- ``lite2 alone``: EFFNET_MODEL=efficientnet-lite2 (the packaged weights, from the dev extra);
- ``repository``: a model repository of both (``lite0/model.toml``, ``lite2/model.toml``).

Start-up is from spawning the process to the first 200 from /readyz; memory is the RSS once ready. Then
``lite0 alone`` and ``repository`` (only its lite0 used, ``?model=lite0``) take turns under the same raw
``/predict`` load (``bench_service``'s), alternating rounds so drift hits both alike.

    python -m benchmarks.bench_models [--seconds 6] [--rounds 3] [--clients 1 16]

Run it alone (``flock /tmp/bench.lock``): the clients share the 2 cores with the servers.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from tests.helpers.images import load_photos
from tests.helpers.server import ServiceProcess

from .bench_service import load
from .common import SUMMARY_MARKER, machine, markdown_table, save_json

ENV = {"EFFNET_BACKEND": "onnxruntime", "EFFNET_MAX_QUEUE": "256"}


def repository() -> Path:
    root = Path(tempfile.mkdtemp(prefix="effnet-models-"))
    for name in ("lite0", "lite2"):
        (root / name).mkdir()
        (root / name / "model.toml").write_text(f'variant = "efficientnet-{name}"\n')
    return root


def start(label: str, env: dict[str, str]) -> tuple[ServiceProcess, dict]:
    started = time.perf_counter()
    server = ServiceProcess({**ENV, **env}, threads=None, ready_timeout=300)
    server.wait_ready(300)
    ready_s = time.perf_counter() - started
    return server, {"server": label, "startup_s": ready_s, "rss_mib": server.rss_bytes() / 2**20}


async def compare(servers: dict[str, tuple[ServiceProcess, str]], args: argparse.Namespace) -> list[dict]:
    photos = list(load_photos().values())
    totals: dict[tuple[int, str], dict[str, float]] = {}
    order = list(servers)
    for clients in args.clients:
        for label in order:  # settle each server at this concurrency
            server, path = servers[label]
            await load(server.url, clients, 1.0, photos, path)
        for r in range(args.rounds):
            for label in (order if r % 2 == 0 else order[::-1]):
                server, path = servers[label]
                result = await load(server.url, clients, args.seconds, photos, path)
                total = totals.setdefault((clients, label), {"ok": 0, "seconds": 0.0, "p50": []})
                total["ok"] += result["ok"]
                total["seconds"] += result["ok"] / max(result["images_per_s"], 1e-9)
                total["p50"].append(result["p50_ms"])
    rows = []
    for clients in args.clients:
        rate = {label: totals[(clients, label)]["ok"] / totals[(clients, label)]["seconds"] for label in order}
        p50 = {label: sorted(totals[(clients, label)]["p50"])[len(totals[(clients, label)]["p50"]) // 2]
               for label in order}
        rows.append({"clients": clients, "alone": rate[order[0]], "beside": rate[order[1]],
                     "ratio": rate[order[1]] / rate[order[0]], "alone_p50_ms": p50[order[0]],
                     "beside_p50_ms": p50[order[1]]})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--seconds", type=float, default=6.0, help="length of one round of one server")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    starts = []
    lite2, facts = start("lite2 alone", {"EFFNET_MODEL": "efficientnet-lite2"})
    lite2.close()
    starts.append(facts)
    alone, facts = start("lite0 alone", {"EFFNET_MODEL": "efficientnet-lite0"})
    starts.append(facts)
    try:
        both, facts = start("repository: lite0 + lite2", {"EFFNET_MODEL_REPOSITORY": str(repository())})
        starts.append(facts)
        try:
            rows = asyncio.run(compare({"lite0 alone": (alone, "/predict"),
                                        "lite0 beside lite2": (both, "/predict?model=lite0")}, args))
        finally:
            both.close()
    finally:
        alone.close()
    path = save_json("bench_models", {"machine": machine(), "startup": starts, "throughput": rows,
                                      "seconds_per_round": args.seconds, "rounds": args.rounds})
    print(f"raw results: {path}")
    print(SUMMARY_MARKER)
    print(f"Machine: {machine()}; onnxruntime on CPU, all CPUs.\n")
    print(markdown_table(starts, [("server", "server", ""), ("startup_s", "spawn to ready (s)", ".1f"),
                                  ("rss_mib", "RSS when ready (MiB)", ".0f")]))
    print()
    print(f"Lite0's raw /predict, {args.rounds} alternating rounds of {args.seconds:g} s per server:\n")
    print(markdown_table(rows, [("clients", "clients", "d"), ("alone", "lite0 alone (images/s)", ".1f"),
                                ("beside", "lite0 beside lite2 (images/s)", ".1f"), ("ratio", "ratio", ".2f"),
                                ("alone_p50_ms", "alone p50 (ms)", ".1f"),
                                ("beside_p50_ms", "beside p50 (ms)", ".1f")]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
