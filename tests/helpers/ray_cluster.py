"""A real multi-node Ray cluster on this machine: ``ray start --head`` and ``ray start --address=...``
processes, each node with CPUs of its own, on loopback, torn down with everything they started.

Each node runs in a session (process group) of its own, so ``kill(node)`` takes one node down hard (its
raylet, object store and workers) the way a lost machine goes, and ``stop()`` ends them all by group id,
never by name: no other Ray on the machine is touched. Ports are picked free; Ray's files go to a short
temporary folder (its socket paths must stay under 107 characters) that ``stop()`` removes.

Shared by tests/integration/test_batch_ray.py and benchmarks/bench_batch_ray.py.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tests.helpers.server import REPO

RAY = str(Path(sys.executable).with_name("ray"))
HOST = "127.0.0.2"  # not 127.0.0.1, which Ray swaps for the machine's outward address


# A lost node noticed after about 5 s of missed health checks (Ray's defaults: 3 s x 5, after a 3 s timeout
# each), so a test that kills one does not wait half a minute; lenient enough for a busy machine.
NODE_HEALTH = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "2000",
               "RAY_health_check_failure_threshold": "5"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def ray_env(**extra: str) -> dict[str, str]:
    """The environment of the nodes and of the commands that drive them: no EFFNET_* of the caller (the
    driver sends its settings), the repository importable, Ray kept off the network."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EFFNET_", "RAY_"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update({"RAY_USAGE_STATS_ENABLED": "0", **extra})
    return env


@dataclass
class Node:
    name: str
    process: subprocess.Popen
    log: Path
    cpus: int

    @property
    def alive(self) -> bool:
        return self.process.poll() is None


class RayNodes:
    """``start(head_cpus)``, then ``add(cpus)`` per worker node; ``address`` for ``--ray``; ``stop()``."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="rayt", dir="/tmp"))
        self.nodes: list[Node] = []
        self.address: str | None = None

    def _start(self, name: str, cpus: int, extra: list[str], timeout: float) -> Node:
        log = self.root / f"{name}.log"
        args = [RAY, "start", "--block", "--num-cpus", str(cpus), "--node-ip-address", HOST,
                "--object-store-memory", str(200 * 1024 * 1024), "--disable-usage-stats",
                "--min-worker-port", "0", "--max-worker-port", "0",
                "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
                "--runtime-env-agent-port", str(free_port()), "--metrics-export-port", str(free_port()), *extra]
        with open(log, "wb") as out:
            process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       env=ray_env(**NODE_HEALTH), cwd=REPO, start_new_session=True)
        node = Node(name, process, log, cpus)
        self.nodes.append(node)
        deadline = time.monotonic() + timeout
        while b"Ray runtime started" not in log.read_bytes():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray node {name} did not start:\n{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.2)
        return node

    def start(self, head_cpus: int, timeout: float = 120) -> RayNodes:
        port = free_port()
        self.address = f"{HOST}:{port}"
        self._start("head", head_cpus, ["--head", "--port", str(port), "--include-dashboard=false",
                                        "--dashboard-port", str(free_port()),
                                        "--ray-client-server-port", str(free_port()), "--temp-dir", str(self.root)],
                    timeout)
        return self

    def add(self, cpus: int, timeout: float = 120) -> Node:
        assert self.address, "start() the head first"
        return self._start(f"worker{len(self.nodes)}", cpus, ["--address", self.address], timeout)

    def kill(self, node: Node) -> None:
        """The node's machine lost: every process of its session killed at once, no draining."""
        _kill_group(node.process)

    def pids(self) -> list[int]:
        """Every living process of the cluster now: the nodes and all they started."""
        return [pid for node in self.nodes if node.alive for pid in (node.process.pid, *descendants(node.process.pid))]

    def stop(self) -> None:
        for node in reversed(self.nodes):
            _kill_group(node.process)
        self.nodes.clear()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> RayNodes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _kill_group(process: subprocess.Popen) -> None:
    """SIGKILL to a node's process and everything under it. Ray's workers start sessions of their own (so
    the group is not enough) and are children of the node's raylet: the tree is read before killing."""
    pids = [process.pid, *descendants(process.pid)]
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL is not refused
        pass


def _parents() -> dict[int, int]:
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if fields[0] != "Z":
                parents[int(entry.name)] = int(fields[1])
    return parents


def descendants(pid: int) -> list[int]:
    """Living processes under ``pid`` (children, their children, ...)."""
    children: dict[int, list[int]] = {}
    for child, parent in _parents().items():
        children.setdefault(parent, []).append(child)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def leftovers(nodes: RayNodes, pids: list[int]) -> list[int]:
    """Which of ``pids`` (the nodes' processes, listed while they ran) are still alive."""
    alive = _parents()
    return [pid for pid in pids if pid in alive]
