"""The service before and after a change, in one run: two servers up at once, taking turns.

A git worktree of ``--base`` (default: the commit before this round's refactor) and this checkout each
serve Lite0 (onnxruntime, all CPUs) on their own ports. For every door and client count the two take
turns in rounds (before, after, after, before, ...), so drift in the machine's load hits both alike; the
figure of a version is the sum over its rounds, and "after / before" is the ratio within the same run.

Doors: raw-body ``/predict`` at 1, 16 and 64 clients (``bench_service``'s load), and at 16 clients V2 REST
with the binary-data extension and V2 gRPC (``bench_protocols``' requests).

    python -m benchmarks.compare_versions [--base COMMIT] [--seconds 6] [--rounds 2]

Run it alone (``flock /tmp/bench.lock``): the clients share the 2 cores with the servers.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import tempfile
from pathlib import Path

import grpc
import httpx
import numpy as np
import tritonclient.grpc as tgrpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from tests.helpers.images import load_photos
from tests.helpers.server import REPO, ServiceProcess, free_port

from .bench_protocols import HEADER_LENGTH, MODEL, drive, v2_binary_body
from .bench_service import load
from .common import SUMMARY_MARKER, machine, markdown_table, save_json

BASE = "d813590"  # main before the one-request-path refactor (issue 17)


def _worktree(commit: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix="effnet-before-"))
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(path), commit], check=True,
                   capture_output=True)
    return path


def _remove_worktree(path: Path) -> None:
    subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(path)], check=False,
                   capture_output=True)


class Doors:
    """The V2 senders of one server (REST binary, gRPC raw BYTES), as ``bench_protocols`` builds them."""

    def __init__(self, url: str, grpc_port: int, clients: int, photos: list[bytes]) -> None:
        self.photos = photos
        self.http = httpx.AsyncClient(base_url=url, timeout=60,
                                      limits=httpx.Limits(max_connections=clients, max_keepalive_connections=clients))
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}")
        self.stub = service_pb2_grpc.GRPCInferenceServiceStub(self.channel)
        self.bodies = [v2_binary_body(p) for p in photos]
        self.requests = []
        for photo in photos:
            request = service_pb2.ModelInferRequest(model_name=MODEL)
            request.inputs.add(name="image", datatype="BYTES", shape=[1])
            request.outputs.add(name="probabilities").parameters["classification"].int64_param = 5
            request.raw_input_contents.append(tgrpc.serialize_byte_tensor(np.array([photo], dtype=object)).item())
            self.requests.append(request)

    async def rest(self, i: int) -> bool:
        body, size = self.bodies[i % len(self.bodies)]
        r = await self.http.post(f"/v2/models/{MODEL}/infer", content=body,
                                 headers={HEADER_LENGTH: str(size), "Content-Type": "application/octet-stream"})
        return r.status_code == 200

    async def grpc(self, i: int) -> bool:
        try:
            await self.stub.ModelInfer(self.requests[i % len(self.requests)], timeout=60)
            return True
        except grpc.aio.AioRpcError:
            return False

    async def close(self) -> None:
        await self.http.aclose()
        await self.channel.close()


async def compare(servers: dict[str, tuple[ServiceProcess, int]], args: argparse.Namespace) -> list[dict]:
    photos = list(load_photos().values())
    totals: dict[tuple[str, str], dict[str, float]] = {}

    def add(door: str, version: str, ok: int, seconds: float) -> None:
        total = totals.setdefault((door, version), {"ok": 0, "seconds": 0.0})
        total["ok"] += ok
        total["seconds"] += seconds

    order = list(servers)
    for clients in args.clients:
        door = f"/predict raw, {clients} clients"
        for version in order:  # settle each server at this concurrency
            await load(servers[version][0].url, clients, 1.0, photos)
        for r in range(args.rounds):
            for version in (order if r % 2 == 0 else order[::-1]):
                result = await load(servers[version][0].url, clients, args.seconds, photos)
                add(door, version, result["ok"], result["ok"] / max(result["images_per_s"], 1e-9))
    doors = {v: Doors(s.url, port, 16, photos) for v, (s, port) in servers.items()}
    try:
        for name in ("rest", "grpc"):
            door = f"V2 {'REST binary' if name == 'rest' else 'gRPC'}, 16 clients"
            for version in order:
                await drive(16, 1.0, getattr(doors[version], name), servers[version][0].pid)
            for r in range(args.rounds):
                for version in (order if r % 2 == 0 else order[::-1]):
                    result = await drive(16, args.seconds, getattr(doors[version], name), servers[version][0].pid)
                    add(door, version, len(result["latencies"]), result["seconds"])
    finally:
        for d in doors.values():
            await d.close()
    rows = []
    for door in dict.fromkeys(d for d, _ in totals):
        rate = {v: totals[(door, v)]["ok"] / totals[(door, v)]["seconds"] for v in order}
        rows.append({"door": door, "before": rate["before"], "after": rate["after"],
                     "ratio": rate["after"] / rate["before"]})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=BASE, help="the 'before' commit")
    parser.add_argument("--clients", nargs="+", type=int, default=[1, 16, 64])
    parser.add_argument("--seconds", type=float, default=6.0, help="length of one round of one version")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    before = _worktree(args.base)
    try:
        servers = {}
        for version, repo in (("before", before), ("after", REPO)):
            port = free_port()
            env = {"EFFNET_MODEL": MODEL, "EFFNET_GRPC_PORT": str(port), "EFFNET_MAX_QUEUE": "256"}
            servers[version] = (ServiceProcess(env, threads=None, repo=repo, ready_timeout=180), port)
        try:
            for server, _ in servers.values():
                server.wait_ready(180)
            rows = asyncio.run(compare(servers, args))
        finally:
            for server, _ in servers.values():
                server.close()
    finally:
        _remove_worktree(before)
    path = save_json("compare_versions", {"base": args.base, "machine": machine(), "rows": rows,
                                          "seconds_per_round": args.seconds, "rounds": args.rounds})
    print(f"raw results: {path}")
    print(SUMMARY_MARKER)
    print(f"Machine: {machine()}; before = {args.base}, after = this checkout; {args.rounds} alternating rounds "
          f"of {args.seconds:g} s per version and door.\n")
    print(markdown_table(rows, [("door", "door", ""), ("before", "before images/s", ".1f"),
                                ("after", "after images/s", ".1f"), ("ratio", "after / before", ".2f")]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
