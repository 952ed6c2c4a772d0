"""A real HAProxy in front of service replicas, and a steady load through it, for the rolling-restart tests.

    cluster = Cluster()                       # two replicas (compose's shutdown settings) behind HAProxy
    with Load(cluster.lb.url, photo, clients=6) as load:
        ...                                   # SIGTERM / SIGKILL replicas, cluster.replace(name)
    load.outcomes                             # one Outcome per request: status, error code, timings, id
    cluster.close()

HAProxy runs ``deploy/haproxy/haproxy.cfg`` itself, the file docker-compose.yml uses, with the addresses
given through the environment variables that file reads. No pytest here: benchmarks/rolling_restart.py
uses it too.
"""

from __future__ import annotations

import asyncio
import csv
import io
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml

from tests.helpers.server import REPO, ServiceProcess, free_port

HAPROXY_CFG = REPO / "deploy" / "haproxy" / "haproxy.cfg"
BACKEND = "effnet-replicas"


def haproxy_binary() -> str | None:
    return shutil.which("haproxy")


class HAProxy:
    """``haproxy -db -f deploy/haproxy/haproxy.cfg`` on free loopback ports; ``servers`` maps the config's
    server names (effnet-1, effnet-2) to replica URLs (http://127.0.0.1:PORT)."""

    def __init__(self, servers: dict[str, str]) -> None:
        binary = haproxy_binary()
        if binary is None:
            raise RuntimeError("haproxy is not installed (Debian package 'haproxy')")
        self.port = free_port()
        self.stats_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.stats_url = f"http://127.0.0.1:{self.stats_port}/stats;csv"
        env = dict(os.environ)
        env["HAPROXY_BIND"] = f"127.0.0.1:{self.port}"
        env["HAPROXY_STATS_BIND"] = f"127.0.0.1:{self.stats_port}"
        for name, url in servers.items():
            env[f"{name.upper().replace('-', '_')}_ADDR"] = url.removeprefix("http://")
        self._log = tempfile.NamedTemporaryFile(prefix="haproxy-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(
            [binary, "-db", "-f", str(HAPROXY_CFG)], env=env, stdout=self._log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 10
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"haproxy exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                self.stats()
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"haproxy did not start:\n{self.logs()}") from None
                time.sleep(0.05)

    def logs(self) -> str:
        return Path(self._log.name).read_text(errors="replace")

    def stats(self) -> dict[str, dict[str, str]]:
        """The backend's rows of the stats CSV by server name (and "BACKEND"): status, wretr, wredis..."""
        text = httpx.get(self.stats_url, timeout=5).text.lstrip("# ")
        return {row["svname"]: row for row in csv.DictReader(io.StringIO(text)) if row["pxname"] == BACKEND}

    def counters(self) -> dict[str, int]:
        """The backend's retries (wretr), redispatches (wredis), responses 5xx, and connection errors."""
        row = self.stats()["BACKEND"]
        return {key: int(row[key] or 0) for key in ("wretr", "wredis", "hrsp_5xx", "econ", "eresp")}

    def wait_state(self, server: str, state: str, timeout: float = 60.0) -> float:
        """Wait until HAProxy reports ``server`` as ``state`` (UP, DOWN...); seconds waited."""
        started = time.monotonic()
        while True:
            status = self.stats()[server]["status"]
            if status.split()[0] == state:  # "UP", "DOWN", "UP 1/2" (going down), "DOWN 1/2" (going up)
                return time.monotonic() - started
            if time.monotonic() - started > timeout:
                raise TimeoutError(f"{server} is {status!r}, not {state} after {timeout} s:\n{self.logs()[-3000:]}")
            time.sleep(0.02)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not self._log.closed:
            self._log.close()
            os.unlink(self._log.name)

    def __enter__(self) -> HAProxy:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@dataclass
class Outcome:
    """One request through the load balancer."""

    request_id: str
    started: float  # time.monotonic()
    ended: float
    status: int | None = None  # None: failed at the transport level
    code: str | None = None  # the service's error code for a non-200 JSON answer
    retry_after: str | None = None
    error: str | None = None


class Load:
    """``clients`` concurrent clients posting ``photo`` to /predict back to back through ``url``, each on its
    own kept-alive connection, in a background thread, until ``stop()``. Request ids are
    ``<prefix>-<client>-<n>``; every outcome is kept in ``outcomes``."""

    def __init__(self, url: str, photo: bytes, *, clients: int, prefix: str = "load", timeout: float = 30.0):
        self.url, self.photo, self.clients, self.prefix, self.timeout = url, photo, clients, prefix, timeout
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), name="load", daemon=True)

    def start(self) -> Load:
        self._thread.start()
        return self

    def stop(self, timeout: float = 60.0) -> list[Outcome]:
        self._stop.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError("the load clients did not stop")
        return self.outcomes

    def ok_count(self) -> int:
        return sum(1 for o in self.outcomes if o.status == 200)

    async def _client(self, index: int) -> None:
        async with httpx.AsyncClient(base_url=self.url, timeout=self.timeout) as client:
            sequence = 0
            while not self._stop.is_set():
                request_id = f"{self.prefix}-{index}-{sequence}"
                sequence += 1
                started = time.monotonic()
                outcome = Outcome(request_id, started, started)
                try:
                    response = await client.post(
                        "/predict", files={"file": ("photo.jpg", self.photo)}, headers={"X-Request-ID": request_id}
                    )
                    outcome.status = response.status_code
                    outcome.retry_after = response.headers.get("retry-after")
                    if response.status_code != 200:
                        try:
                            outcome.code = response.json()["error"]["code"]
                        except Exception:  # noqa: BLE001 - HAProxy's own error pages are HTML
                            outcome.code = "not-json"
                except httpx.HTTPError as exc:
                    outcome.error = repr(exc)
                outcome.ended = time.monotonic()
                self.outcomes.append(outcome)
                if outcome.status == 503:
                    await asyncio.sleep(0.05)  # a client honouring Retry-After, briefly

    async def _run(self) -> None:
        await asyncio.gather(*(self._client(i) for i in range(self.clients)))

    def __enter__(self) -> Load:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        if self._thread.is_alive():
            self.stop()


SERVERS = ("effnet-1", "effnet-2")


def compose_replica_env() -> dict[str, str]:
    """The replicas' shutdown timing as docker-compose.yml sets it (the pair the HAProxy config is tuned
    for), on a small CPU budget: Lite0, one inference and one decoding thread each."""
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]["effnet-1"]["environment"]
    return {
        "EFFNET_MODEL": "efficientnet-lite0",
        "EFFNET_NUM_THREADS": "1",
        "EFFNET_DECODE_THREADS": "1",
        "EFFNET_MAX_BATCH_SIZE": "4",
        "EFFNET_MAX_QUEUE": "8",
        "EFFNET_REQUEST_TIMEOUT_S": compose["EFFNET_REQUEST_TIMEOUT_S"],
        "EFFNET_SHUTDOWN_DELAY_S": compose["EFFNET_SHUTDOWN_DELAY_S"],
        "EFFNET_SHUTDOWN_DRAIN_S": compose["EFFNET_SHUTDOWN_DRAIN_S"],
    }


def compose_workers() -> str:
    """EFFNET_WORKERS as docker-compose.yml gives each replica (front-end processes feeding one engine)."""
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]["effnet-1"]["environment"]
    return str(compose.get("EFFNET_WORKERS", "1"))


def wait_workers(replica: ServiceProcess, workers: int, timeout: float = 120.0) -> None:
    """With several workers /readyz is 200 once one of them serves: wait until every one of ``workers`` has
    said so in the log ("worker N serving"), so that a signal finds none of them still starting."""
    deadline = time.monotonic() + timeout
    while workers > 1 and len(set(re.findall(r'"worker (\d+) serving', replica.logs()))) < workers:
        if replica.proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"not all {workers} workers serving:\n{replica.logs()[-3000:]}")
        time.sleep(0.1)


class Cluster:
    """Two replicas behind HAProxy (``env``: settings over ``compose_replica_env()``); ``replace(name)``
    starts a new replica on the port of one that has exited. With EFFNET_WORKERS > 1 a replica counts as
    started once every worker serves."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        self.env = {**compose_replica_env(), **(env or {})}
        self.workers = int(self.env.get("EFFNET_WORKERS", "1"))
        self.replicas = {name: ServiceProcess(self.env, threads=None) for name in SERVERS}
        for replica in self.replicas.values():
            replica.wait_ready()
            wait_workers(replica, self.workers)
        self.lb = HAProxy({name: r.url for name, r in self.replicas.items()})
        for name in SERVERS:
            self.lb.wait_state(name, "UP", timeout=30)

    def replace(self, name: str) -> dict[str, float]:
        """Start a new replica where ``name`` was (the old one has exited) and wait until HAProxy sends it
        traffic again: seconds to ready and to UP."""
        started = time.monotonic()
        replica = ServiceProcess(self.env, threads=None, port=self.replicas[name].port)
        self.replicas[name] = replica
        replica.wait_ready()
        wait_workers(replica, self.workers)
        ready = time.monotonic() - started
        self.lb.wait_state(name, "UP", timeout=30)
        return {"ready_s": round(ready, 2), "back_in_lb_s": round(time.monotonic() - started, 2)}

    def heal(self) -> None:
        """Both replicas running and UP (after a test that killed one and failed before replacing it)."""
        for name, replica in self.replicas.items():
            if replica.proc.poll() is not None:
                self.replace(name)
        for name in SERVERS:
            self.lb.wait_state(name, "UP", timeout=30)

    def close(self) -> None:
        self.lb.close()
        # No load balancer any more: a second SIGTERM cuts each lame duck short.
        running = [r for r in self.replicas.values() if r.proc.poll() is None]
        for replica in running:
            replica.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        for replica in running:
            replica.proc.send_signal(signal.SIGTERM)
        for replica in self.replicas.values():
            replica.stop(timeout=30)
