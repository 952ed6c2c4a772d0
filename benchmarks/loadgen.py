"""A light HTTP/1.1 load generator for /predict: raw asyncio sockets, keep-alive, several processes.

httpx costs more CPU per request than the service's own parsing does, so on the same machine it would
measure the client. This one sends pre-encoded requests (multipart, as browsers and most clients send
them, or a raw ``image/jpeg`` body) over kept-alive connections and reads each response by its
Content-Length. ``processes`` x ``connections`` requests are outstanding at any time (closed loop).

    python -m benchmarks.loadgen --url http://127.0.0.1:8000 --seconds 10 --processes 2 --connections 32 \
        --images tests/data/*.jpg [--raw]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import re
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

_LENGTH = re.compile(rb"(?i)\r\ncontent-length:\s*(\d+)")
_CLOSE = re.compile(rb"(?i)\r\nconnection:\s*close")


def encode_request(host: str, path: str, image: bytes | list[bytes] | None, *, raw: bool = False) -> bytes:
    """One complete HTTP/1.1 POST carrying ``image`` (a list: one multipart part each), or a GET of ``path``
    when ``image`` is None."""
    if image is None:
        return f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: effnet-loadgen\r\nAccept: */*\r\n\r\n".encode()
    images = image if isinstance(image, list) else [image]
    if raw:
        if len(images) != 1:
            raise ValueError("a raw body carries one image")
        body, content_type = images[0], "image/jpeg"
    else:
        boundary = "effnetloadgenboundary7MA4YWxkTrZu0gW"
        body = b"".join(
            (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"image{i}.jpg\"\r\n"
             "Content-Type: image/jpeg\r\n\r\n").encode() + data + b"\r\n" for i, data in enumerate(images)
        ) + f"--{boundary}--\r\n".encode()
        content_type = f"multipart/form-data; boundary={boundary}"
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: effnet-loadgen\r\nAccept: */*\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


async def _connection(host: str, port: int, requests: list[bytes], offset: int, deadline: float,
                      latencies: list[float], codes: Counter) -> None:
    reader = writer = None
    i = offset
    while time.perf_counter() < deadline:
        if writer is None:
            try:
                reader, writer = await asyncio.open_connection(host, port)
            except OSError:
                codes["connect_error"] += 1
                await asyncio.sleep(0.05)
                continue
        request = requests[i % len(requests)]
        i += 1
        started = time.perf_counter()
        try:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            match = _LENGTH.search(head)
            if match:
                await reader.readexactly(int(match.group(1)))
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            codes["connection_error"] += 1
            writer.close()
            writer = None
            continue
        status = head[9:12].decode("ascii", "replace")
        codes[status] += 1
        if status == "200":
            latencies.append(time.perf_counter() - started)
        if _CLOSE.search(head) or not match:
            writer.close()
            writer = None
    if writer is not None:
        writer.close()


def _process(url: str, path: str, images: list[bytes | None], raw: bool, connections: int, start_at: float,
             seconds: float, seed: int, queue: mp.Queue, per_request: int = 1) -> None:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    if per_request > 1:
        bodies: list = [[images[(i + k) % len(images)] for k in range(per_request)] for i in range(len(images))]
    else:
        bodies = list(images)
    requests = [encode_request(f"{host}:{port}", path, body, raw=raw) for body in bodies]
    latencies: list[float] = []
    codes: Counter = Counter()

    async def main() -> None:
        await asyncio.sleep(max(0.0, start_at - time.time()))
        deadline = time.perf_counter() + seconds
        await asyncio.gather(*(_connection(host, port, requests, seed * 7919 + c * 31, deadline, latencies, codes)
                               for c in range(connections)))

    cpu0 = time.process_time()
    try:
        import uvloop  # optional: a cheaper event loop for the client

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())
    queue.put({"latencies": latencies, "codes": dict(codes), "cpu_s": time.process_time() - cpu0})


def run_load(url: str, images: list[bytes | None], *, seconds: float, processes: int = 1, connections: int = 16,
             raw: bool = False, path: str = "/predict", per_request: int = 1) -> dict:
    """Closed-loop load for ``seconds``; returns requests/s, latency percentiles and status counts.
    ``images``: the bodies to post in turn, or ``[None]`` for GET requests of ``path``; ``per_request``
    images per multipart request."""
    ctx = mp.get_context("fork")
    queue: mp.Queue = ctx.Queue()
    start_at = time.time() + 0.5  # every process starts sending at the same moment
    workers = [ctx.Process(target=_process,
                           args=(url, path, images, raw, connections, start_at, seconds, p, queue, per_request))
               for p in range(processes)]
    for w in workers:
        w.start()
    results = [queue.get(timeout=seconds + 120) for _ in workers]
    for w in workers:
        w.join(timeout=10)
    latencies = sorted(x for r in results for x in r["latencies"])
    codes: Counter = Counter()
    for r in results:
        codes.update(r["codes"])
    q = statistics.quantiles(latencies, n=100) if len(latencies) >= 2 else [float("nan")] * 99
    return {
        "seconds": seconds, "processes": processes, "connections": processes * connections,
        "encoding": "raw" if raw else "multipart", "images_per_request": per_request,
        "requests_per_s": len(latencies) / seconds, "images_per_s_sent": len(latencies) * per_request / seconds,
        "p50_ms": q[49] * 1e3, "p90_ms": q[89] * 1e3, "p99_ms": q[98] * 1e3,
        "ok": len(latencies), "codes": dict(codes),
        "client_cpu_s": sum(r["cpu_s"] for r in results),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--path", default="/predict")
    parser.add_argument("--images", nargs="+", required=True)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--connections", type=int, default=16, help="per process")
    parser.add_argument("--raw", action="store_true", help="raw image/jpeg bodies instead of multipart")
    parser.add_argument("--per-request", type=int, default=1, help="images per multipart request")
    args = parser.parse_args()
    images = [Path(p).read_bytes() for p in args.images]
    result = run_load(args.url, images, seconds=args.seconds, processes=args.processes,
                      connections=args.connections, raw=args.raw, path=args.path, per_request=args.per_request)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
