"""Throughput of the three doors of one server: ``/predict`` (multipart), V2 REST (binary-data extension)
and V2 gRPC (BYTES in ``raw_input_contents``), each with N concurrent clients sending one real JPEG per
request.

One Lite0 server process serves all three, so they are measured in one run against the same engine. The
doors take turns in short rounds (A B C A B C ...) so that drift in the machine's load hits all of them
alike; each door's figure is the sum over its rounds. The load generators are asyncio clients in this
process (httpx for HTTP, grpc.aio for gRPC), on the same cores as the server, so their cost is included.

    python -m benchmarks.bench_protocols [--clients 16] [--seconds 8] [--rounds 3]

Run it under ``flock /tmp/bench.lock`` on a shared machine.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import httpx
import numpy as np
import tritonclient.grpc as tgrpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from tests.helpers.images import load_photos
from tests.helpers.server import ServiceProcess, free_port

from .common import SUMMARY_MARKER, machine, markdown_table, save_json

MODEL = "efficientnet-lite0"
HEADER_LENGTH = "Inference-Header-Content-Length"


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) a process has used so far, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def drive(clients: int, seconds: float, send: Callable[[int], Awaitable[bool]], server_pid: int) -> dict:
    """``clients`` loops calling ``send(i)`` for ``seconds``; latencies of the successful calls, and the CPU
    seconds the server and this (client) process used meanwhile."""
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds
    counter = itertools.count()

    async def loop() -> None:
        nonlocal errors
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            ok = await send(next(counter))
            if ok:
                latencies.append(time.perf_counter() - t0)
            else:
                errors += 1

    started = time.perf_counter()
    server_cpu, client_cpu = cpu_seconds(server_pid), time.process_time()
    await asyncio.gather(*(loop() for _ in range(clients)))
    return {
        "seconds": time.perf_counter() - started,
        "latencies": latencies,
        "errors": errors,
        "server_cpu_s": cpu_seconds(server_pid) - server_cpu,
        "client_cpu_s": time.process_time() - client_cpu,
    }


def v2_binary_body(photo: bytes) -> tuple[bytes, int]:
    element = len(photo).to_bytes(4, "little") + photo
    head = json.dumps({
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                    "parameters": {"binary_data_size": len(element)}}],
        "outputs": [{"name": "probabilities", "parameters": {"classification": 5}}],
    }).encode()
    return head + element, len(head)


async def run(args: argparse.Namespace) -> dict:
    photos = list(load_photos().values())
    grpc_port = free_port()
    env = {"EFFNET_MODEL": MODEL, "EFFNET_GRPC_PORT": str(grpc_port), "EFFNET_MAX_QUEUE": "256"}
    totals: dict[str, dict] = {}
    with ServiceProcess(env, threads=None) as server:
        limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
        async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as http, \
                grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            grpc_requests = []
            for photo in photos:
                request = service_pb2.ModelInferRequest(model_name=MODEL)
                request.inputs.add(name="image", datatype="BYTES", shape=[1])
                request.outputs.add(name="probabilities").parameters["classification"].int64_param = 5
                request.raw_input_contents.append(tgrpc.serialize_byte_tensor(np.array([photo], dtype=object)).item())
                grpc_requests.append(request)
            v2_bodies = [v2_binary_body(p) for p in photos]

            async def predict_multipart(i: int) -> bool:
                files = {"file": ("photo.jpg", photos[i % len(photos)], "image/jpeg")}
                r = await http.post("/predict", files=files, params={"top_k": 5})
                return r.status_code == 200

            async def v2_rest_binary(i: int) -> bool:
                body, size = v2_bodies[i % len(v2_bodies)]
                r = await http.post(f"/v2/models/{MODEL}/infer", content=body,
                                    headers={HEADER_LENGTH: str(size), "Content-Type": "application/octet-stream"})
                return r.status_code == 200

            async def v2_grpc_binary(i: int) -> bool:
                try:
                    await stub.ModelInfer(grpc_requests[i % len(grpc_requests)], timeout=60)
                    return True
                except grpc.aio.AioRpcError:
                    return False

            doors = {
                "/predict (multipart)": predict_multipart,
                "V2 REST (binary BYTES)": v2_rest_binary,
                "V2 gRPC (raw BYTES)": v2_grpc_binary,
            }
            for send in doors.values():  # warm the connections and the engine
                await drive(args.clients, 1.5, send, server.pid)
            for _ in range(args.rounds):
                for name, send in doors.items():
                    result = await drive(args.clients, args.seconds, send, server.pid)
                    total = totals.setdefault(name, {"seconds": 0.0, "latencies": [], "errors": 0,
                                                     "server_cpu_s": 0.0, "client_cpu_s": 0.0})
                    for key in ("seconds", "errors", "server_cpu_s", "client_cpu_s"):
                        total[key] += result[key]
                    total["latencies"] += result["latencies"]
    rows = []
    for name, total in totals.items():
        ordered = sorted(total["latencies"])
        rows.append({
            "door": name,
            "images_per_s": len(ordered) / total["seconds"],
            "p50_ms": statistics.median(ordered) * 1e3,
            "p99_ms": ordered[int(0.99 * (len(ordered) - 1))] * 1e3,
            "server_cpu_ms": total["server_cpu_s"] / max(1, len(ordered)) * 1e3,
            "client_cpu_ms": total["client_cpu_s"] / max(1, len(ordered)) * 1e3,
            "requests": len(ordered),
            "errors": total["errors"],
        })
    return {"clients": args.clients, "seconds_per_round": args.seconds, "rounds": args.rounds,
            "machine": machine(), "rows": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=8.0, help="length of one round of one door")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    result = asyncio.run(run(args))
    path = save_json("protocols", result)
    print(f"raw results: {path}")
    print(SUMMARY_MARKER)
    print(summary(result))
    return 0


def summary(result: dict) -> str:
    """The Markdown that docs/benchmarks.md shows (``make bench`` copies it there)."""
    rows = {r["door"]: r for r in result["rows"]}
    grpc_rate = rows["V2 gRPC (raw BYTES)"]["images_per_s"]
    predict_rate = rows["/predict (multipart)"]["images_per_s"]
    return "\n".join([
        f"Machine: {result['machine']}; model {MODEL}; one server process, all CPUs; {result['clients']} "
        f"concurrent clients per door, one JPEG per request; {result['rounds']} interleaved rounds of "
        f"{result['seconds_per_round']:g} s per door.",
        "",
        markdown_table(result["rows"], [
            ("door", "door", ""), ("images_per_s", "images/s", ".1f"), ("p50_ms", "p50 ms", ".0f"),
            ("p99_ms", "p99 ms", ".0f"), ("server_cpu_ms", "server CPU ms/image", ".2f"),
            ("client_cpu_ms", "client CPU ms/image", ".2f"), ("requests", "requests", "d"),
            ("errors", "errors", "d"),
        ]),
        "",
        f"gRPC (binary BYTES) / /predict (multipart): {grpc_rate:.1f} / {predict_rate:.1f} = "
        f"{grpc_rate / predict_rate:.2f}; server CPU per image "
        f"{rows['V2 gRPC (raw BYTES)']['server_cpu_ms']:.2f} / {rows['/predict (multipart)']['server_cpu_ms']:.2f} ms",
    ])


if __name__ == "__main__":
    raise SystemExit(main())
