"""A real service process for tests and benchmarks: ``python -m service`` on a free loopback port.

    with ServiceProcess({"EFFNET_MODEL": "efficientnet-lite0"}) as service:   # started, then ready
        httpx.get(f"{service.url}/info")
    service.stopped.exit_code   # stopped on exit (SIGTERM): exit code, shutdown time and log

Without ``with``: ``wait_ready()``, then ``stop()`` (never raises on a hung shutdown: SIGKILL, exit code
None) or ``close()`` (raises subprocess.TimeoutExpired then).

No pytest here: ``benchmarks/`` imports this module too.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent.parent


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (peak so far) of a process, in KiB, from /proc/<pid>/status."""
    values = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key = line.split(":", 1)[0]
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(line.split()[1])
    return values


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc/<pid>/status (VmRSS, in kB)."""
    rss = memory_kib(pid).get("VmRSS")
    if rss is None:
        raise RuntimeError("no VmRSS")
    return rss * 1024


@dataclass(frozen=True)
class Stopped:
    """How a stopped server ended: exit code (None: it ignored SIGTERM and was killed), seconds from
    SIGTERM to exit, and everything it wrote to stdout and stderr."""

    exit_code: int | None
    shutdown_s: float
    log: str


class ServiceProcess:
    """``python -m service`` in a subprocess on a free loopback port, started at construction.

    The environment is this process's, without any EFFNET_* variable, plus ``env``. ``threads``:
    EFFNET_NUM_THREADS unless ``env`` sets it (None: the service's own default, all CPUs). No load balancer
    watches these servers, so EFFNET_SHUTDOWN_DELAY_S is 0 (SIGTERM drains at once) unless ``env`` sets
    it. ``port``: listen there (a replacement for a stopped server behind a load balancer) instead of on a
    free port. ``repo``: run that checkout of the project instead of this one. ``args``: more command-line
    arguments (``--log-level warning``...). stdout and stderr go to
    a temporary log file (``logs()``), removed by ``stop()`` / ``close()``.

    ``readiness_seen`` records every /readyz status observed while waiting for the server to get ready.
    As a context manager: ``__enter__`` waits until ready (``ready_timeout``), ``__exit__`` calls ``stop()``
    (its result stays in ``stopped``).
    """

    def __init__(
        self,
        env: dict[str, str] | None = None,
        *,
        args: list[str] | None = None,
        threads: int | None = 2,
        ready_timeout: float = 120.0,
        port: int | None = None,
        repo: Path | None = None,
    ) -> None:
        repo = repo or REPO  # another checkout of the project (a benchmark's "before"), else this one
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ready_timeout = ready_timeout
        self.readiness_seen: list[int] = []
        self.stopped: Stopped | None = None
        self._log = tempfile.NamedTemporaryFile(prefix="effnet-serve-", suffix=".log", delete=False)
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("EFFNET_")}
        full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo), full_env.get("PYTHONPATH")]))
        if threads is not None:
            full_env["EFFNET_NUM_THREADS"] = str(threads)
        # No gRPC server unless a test asks for one (EFFNET_GRPC_PORT in ``env``): the default port 8001
        # would collide between servers running side by side.
        full_env["EFFNET_GRPC_PORT"] = "0"
        full_env["EFFNET_SHUTDOWN_DELAY_S"] = "0"
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(self.port), *(args or [])],
            cwd=repo,
            env=full_env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def logs(self) -> str:
        """Everything the server has written to stdout and stderr so far (after ``stop()``: all of it)."""
        if self.stopped is not None:
            return self.stopped.log
        try:
            return Path(self._log.name).read_text(errors="replace")
        except FileNotFoundError:  # closed without stop()
            return ""

    def serving_workers(self) -> dict[int, int]:
        """With EFFNET_WORKERS > 1: worker number -> pid of each worker the supervisor has seen serve (its
        event loop's first heartbeat; the latest pid of a restarted one)."""
        return {int(n): int(pid) for n, pid in re.findall(r"worker (\d+) \(pid (\d+)\) is serving", self.logs())}

    def wait_workers_serving(self, count: int, timeout: float = 60.0) -> dict[int, int]:
        """Wait until workers 0..count-1 all serve (/readyz is 200 once the first one does)."""
        deadline = time.monotonic() + timeout
        while len(serving := self.serving_workers()) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"only workers {sorted(serving)} of {count} serve after {timeout:.0f} s")
            time.sleep(0.05)
        return serving

    def rss_bytes(self) -> int:
        """The server's resident set size now."""
        return rss_bytes(self.proc.pid)

    def memory_kib(self) -> dict[str, int]:
        """The server's VmRSS (now) and VmHWM (peak so far), in KiB."""
        return memory_kib(self.proc.pid)

    def wait_ready(self, timeout: float | None = None, *, poll_s: float = 0.01) -> None:
        """Poll /readyz every ``poll_s`` from the moment the port opens until it answers 200.

        RuntimeError (with the log) if the server exits first, TimeoutError (with the log) after ``timeout``
        seconds (default: ``ready_timeout``); the process is left running then, for ``close()``.
        """
        timeout = self.ready_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=self.url, timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.logs()}")
                try:
                    status = client.get("/readyz").status_code
                except httpx.TransportError:
                    time.sleep(poll_s)
                    continue
                self.readiness_seen.append(status)
                if status == 200:
                    return
                time.sleep(poll_s)
        raise TimeoutError(f"server not ready after {timeout} s:\n{self.logs()}")

    def wait_exit(self, timeout: float = 60.0) -> int:
        return self.proc.wait(timeout=timeout)

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM, then wait for the exit code (SIGKILL, then subprocess.TimeoutExpired, if it does not come)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise
        return self.proc.returncode

    def stop(self, timeout: float = 60.0) -> Stopped:
        """SIGTERM and wait up to ``timeout`` s (then SIGKILL: exit code None); collect the log and remove
        its file. Calling it again returns the same result."""
        if self.stopped is None:
            started = time.monotonic()
            try:
                code: int | None = self.terminate(timeout)
            except subprocess.TimeoutExpired:
                code = None
            shutdown_s = time.monotonic() - started
            log = self.logs()
            self._remove_log()
            self.stopped = Stopped(exit_code=code, shutdown_s=shutdown_s, log=log)
        return self.stopped

    def close(self) -> None:
        """Stop the server if it still runs (SIGTERM; subprocess.TimeoutExpired after SIGKILL if it ignores
        it) and remove the log file."""
        try:
            if self.proc.poll() is None:
                self.terminate()
        finally:
            self._remove_log()

    def _remove_log(self) -> None:
        if not self._log.closed:
            self._log.close()
            os.unlink(self._log.name)

    def __enter__(self) -> ServiceProcess:
        try:
            if 200 not in self.readiness_seen:
                self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class ThreadedServers:
    """Apps built in this process (around stand-in engines the test holds), each served by uvicorn on a
    free loopback port from a thread of its own: for tests that need a real socket (a client that hangs
    up, a gRPC deadline) while reaching into the app. ``start(app)`` waits until it serves and its
    models are ready and returns its URL; ``close()`` stops them all (``on_close`` runs first, e.g. to
    open an engine's gate)."""

    def __init__(self) -> None:
        self._running: list[tuple[object, object]] = []
        self.on_close: list = []

    def start(self, app, port: int | None = None) -> str:
        import threading

        import uvicorn

        from tests.helpers.waiting import wait_until

        port = port or free_port()
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on"))
        thread = threading.Thread(target=server.run, name="uvicorn-under-test", daemon=True)
        thread.start()
        self._running.append((server, thread))
        wait_until(lambda: server.started and getattr(app.state, "models", None) is not None
                   and app.state.models.ready, "the threaded server never became ready", timeout=30)
        return f"http://127.0.0.1:{port}"

    def close(self) -> None:
        for action in self.on_close:
            action()
        for server, thread in self._running:
            server.should_exit = True
            thread.join(30)
        self._running.clear()


def children(pid: int) -> dict[str, int]:
    """The child processes of ``pid`` by name (``/proc/<child>/comm``: ``effnet-engine``,
    ``effnet-worker-0``, ...), from /proc."""
    found: dict[str, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            comm = (entry / "comm").read_text().strip()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid:
            found[comm] = int(entry.name)
    return found


def shm_entries() -> set[str]:
    """What /dev/shm holds now (the server's pixels never appear there: they are anonymous memfds)."""
    try:
        return {p.name for p in Path("/dev/shm").iterdir()}
    except FileNotFoundError:  # pragma: no cover
        return set()
