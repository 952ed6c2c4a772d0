"""The server as several processes (``EFFNET_WORKERS`` > 1): this process supervises one engine process
and N front-end workers.

- The **engine process** loads the models and owns their batchers and engines (``ModelRegistry``), and
  answers the workers over abstract Unix sockets (``service.core.engine_host``). It is the one exporter
  of the metrics.
- Each **worker** serves every door (HTTP and V2 REST, gRPC on its port, the page: each worker listens on
  the ports with ``SO_REUSEPORT``, so the kernel spreads new connections over the workers) and decodes;
  its models are the engine process's (``service.core.engine_client``). A worker imports no torch.
- This **supervisor** starts them with ``spawn`` (never forked: CUDA and threads cannot be forked), restarts
  a worker that dies (only its requests in flight fail) or hangs (its event loop's heartbeat stops for
  ``EFFNET_WORKER_TIMEOUT_S``: killed, then restarted) and the engine process if it dies (every worker
  answers 503 ``engine_unavailable`` meanwhile and reconnects by itself), and stops the server, saying
  why, when the engine cannot load its models, fails after start-up, or a process keeps dying.

Shutdown: SIGTERM (or SIGINT) here is passed to every worker as SIGTERM: each runs the lame duck and the
drain of a one-process server, and a second signal cuts them short, as it would there. Once the last
worker has exited, the engine process is stopped, then this one. Every child asks the kernel to kill it
when this process dies (``PR_SET_PDEATHSIG``), so a ``kill -9`` here leaves no child behind; the pixels'
shared memory is anonymous (``memfd``) and the sockets abstract, so nothing is left in ``/dev/shm`` or on
disk either.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import logging
import multiprocessing
import multiprocessing.connection
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from service.core.settings import ServerSettings

log = logging.getLogger("service.server.supervisor")

PR_SET_NAME = 15
PR_SET_PDEATHSIG = 1
# A process that dies this often within RESTART_WINDOW_S is not restarted again: the server stops.
MAX_RESTARTS = 5
RESTART_WINDOW_S = 60.0
# Exit status of an engine process whose models failed after start-up (a warm-up): not worth a restart.
FAILED_AFTER_START = 3
# A serving worker's event loop tells the supervisor it is alive every HEARTBEAT_S; one silent for
# EFFNET_WORKER_TIMEOUT_S (a loop blocked, a deadlock: the probes would reach another worker and never see
# it) is killed and started again.
HEARTBEAT_S = 1.0
# A worker whose loop has not ticked once this long after its start (or EFFNET_WORKER_TIMEOUT_S, if longer)
# hung while starting: killed and started again too. Starting takes 1-5 s here, more on a crowded host.
WORKER_START_S = 120.0
# Each worker's HTTP socket's queue of connections not yet accepted (uvicorn's default).
LISTEN_BACKLOG = 2048
# Blocked while a child is started (the mask is inherited through spawn's exec), so a SIGTERM passed on
# while the child still imports its modules waits for the child's own handler instead of killing it.
STARTING_SIGNALS = {signal.SIGTERM, signal.SIGINT}


@contextlib.contextmanager
def _signals_blocked() -> Iterator[None]:
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STARTING_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def die_with_parent(parent: int, name: str) -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux), and leave now if it already
    has: no child of the server outlives it, ``kill -9`` of the supervisor included. ``name``: what ``ps``
    and ``top`` show for it (``effnet-engine``, ``effnet-worker-0``)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        libc.prctl(PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]))
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass
    if os.getppid() != parent:
        os._exit(1)


@dataclass(frozen=True)
class ListenSpec:
    """Where the workers listen for HTTP (``socket.getaddrinfo``'s answer for the host and port)."""

    family: int
    kind: int
    proto: int
    address: tuple


@dataclass(frozen=True)
class Addresses:
    control: str
    segments: str
    token: str


# -- the engine process -------------------------------------------------------------------------------------------
def engine_main(addresses: Addresses, status: multiprocessing.connection.Connection, log_level: str,
                parent: int) -> None:
    die_with_parent(parent, "effnet-engine")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides; Ctrl-C reaches every process
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STARTING_SIGNALS)  # blocked by the supervisor until here
    from service.core.errors import ConfigurationError, StartupError
    from service.core.logconfig import configure_logging
    from service.core.registry import load_startup
    from service.core.settings import ModelSettings

    configure_logging(log_level)
    log.info("engine process %d: loading the models", os.getpid())
    try:
        server = ServerSettings()
        startup = load_startup(server, ModelSettings())
    except ConfigurationError as exc:
        status.send(("configuration", str(exc)))
        os._exit(2)
    except StartupError as exc:
        status.send(("failed", str(exc)))
        os._exit(1)
    except Exception as exc:  # anything unforeseen still gets one line
        first = (str(exc).strip().splitlines() or [""])[0]
        status.send(("failed", f"{type(exc).__name__}: {first}"))
        os._exit(1)
    code = asyncio.run(_serve_engine(server, startup, addresses, status))
    logging.shutdown()
    os._exit(code)


async def _serve_engine(server: ServerSettings, startup: Any, addresses: Addresses,
                        status: multiprocessing.connection.Connection) -> int:
    from service.core import tracing
    from service.core.engine_host import EngineHost
    from service.core.lifecycle import State
    from service.core.metrics import Metrics
    from service.core.registry import ModelRegistry

    metrics = Metrics(max(m.settings.max_batch_size for m in startup.models))
    registry = ModelRegistry(server, metrics, startup)
    host = EngineHost(registry, metrics, addresses.token, addresses.control, addresses.segments)
    await host.start()  # before the warm-up: workers connect and see it warming
    status.send(("loaded", None))
    await registry.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    registry.lifecycle.add_listener(lambda state: stop.set() if state is State.FAILED else None)
    if registry.state is State.FAILED:
        stop.set()
    await stop.wait()
    code = 0
    if registry.state is State.FAILED:
        log.error("engine process: %s", registry.failure)
        code = FAILED_AFTER_START
    await host.close()
    await registry.close()
    await asyncio.to_thread(tracing.flush, 2.0)
    return code


# -- a front-end worker ---------------------------------------------------------------------------------------------
def worker_main(number: int, listen: ListenSpec, addresses: Addresses, args: argparse.Namespace,
                grpc_address: str | None, heartbeat: multiprocessing.connection.Connection, parent: int) -> None:
    die_with_parent(parent, f"effnet-worker-{number}")
    # The supervisor passes SIGTERM on at any moment, also while this worker still imports its modules:
    # recorded until uvicorn's handlers take over, never the default death.
    early: list[int] = []
    signal.signal(signal.SIGTERM, lambda sig, _frame: early.append(sig))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor turns Ctrl-C into one SIGTERM each
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STARTING_SIGNALS)  # blocked by the supervisor until here
    import uvicorn

    from service.core import access
    from service.core.engine_client import EngineAddress
    from service.core.logconfig import configure_logging
    from service.server.app import create_app
    from service.server.draining import GRACEFUL_TAIL_S

    _WorkerServer = _worker_server_class()  # noqa: N806 - a class

    configure_logging(args.log_level)
    access.set_worker(number)
    server = ServerSettings()
    engine = EngineAddress(addresses.control, addresses.segments, addresses.token, number)
    app = create_app(server, grpc_address=grpc_address, engine=engine)
    config = uvicorn.Config(
        app, host=args.host, port=args.port, lifespan="on", log_config=None, log_level=args.log_level,
        access_log=False, server_header=False, timeout_graceful_shutdown=GRACEFUL_TAIL_S,
        timeout_keep_alive=int(server.keep_alive_s),
    )
    worker = _WorkerServer(config, app, server.shutdown_drain_s, delay_s=server.shutdown_delay_s,
                           follow_sigint=False)
    worker.early_signals = early
    worker.heartbeat = heartbeat
    worker.run(sockets=[_listening_socket(listen)])
    logging.shutdown()
    os._exit(worker.exit_code if worker.started else 1)


def _listening_socket(spec: ListenSpec) -> socket.socket:
    """A worker's own listening socket on the server's HTTP port. With one socket shared by every worker,
    asyncio accepts every connection waiting each time the socket is readable, and on a busy host the
    first worker to run took a whole burst: the 16 kept-alive connections of a client pool landed on one
    worker while the other idled (measured: 4 bursts in 6). With ``SO_REUSEPORT`` the kernel gives each
    new connection to one of the workers' sockets by a hash of its addresses: spread evenly on average,
    and a worker that is not (or no longer) listening gets none."""
    sock = socket.socket(spec.family, spec.kind, spec.proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(spec.address)
    sock.listen(LISTEN_BACKLOG)
    return sock


def _worker_server_class():  # noqa: ANN202 - DrainingServer is imported in the worker only
    from service.server.draining import DrainingServer

    class WorkerServer(DrainingServer):
        """A worker's uvicorn server: its event loop's ticks are the supervisor's heartbeat."""

        heartbeat: multiprocessing.connection.Connection | None = None
        _last_beat = 0.0

        async def on_tick(self, counter: int) -> bool:
            now = time.monotonic()
            if self.heartbeat is not None and now - self._last_beat >= HEARTBEAT_S:
                self._last_beat = now
                try:
                    self.heartbeat.send_bytes(b"")
                except OSError:  # the supervisor is gone (this process is about to be killed)
                    self.heartbeat = None
            return await super().on_tick(counter)

    return WorkerServer


# -- the supervisor ---------------------------------------------------------------------------------------------
@dataclass
class _Child:
    process: multiprocessing.process.BaseProcess
    started: float = field(default_factory=time.monotonic)
    heartbeat: multiprocessing.connection.Connection | None = None
    last_beat: float | None = None  # None until it first serves
    killed: bool = False  # by the watchdog: its exit, seen through its sentinel, restarts it


class Supervisor:
    """Starts, watches and stops the engine process and the workers (see the module's docstring)."""

    def __init__(self, args: argparse.Namespace, server: ServerSettings, grpc_address: str | None) -> None:
        self.args = args
        self.server = server
        self.grpc_address = grpc_address
        self.workers_wanted = server.effective_workers
        self.context = multiprocessing.get_context("spawn")
        name = f"effnet-{os.getpid()}-{secrets.token_hex(6)}"
        from service.core.ipc import socket_address

        self.addresses = Addresses(socket_address(name + "-control"), socket_address(name + "-segments"),
                                   secrets.token_hex(16))
        self.engine: _Child | None = None
        self.engine_status: multiprocessing.connection.Connection | None = None
        self.workers: dict[int, _Child] = {}
        self.restarts: dict[str, list[float]] = {}
        self.listener: socket.socket | None = None  # holds the HTTP port (see _bind)
        self.listen: ListenSpec | None = None
        self.signals = 0
        self.exit_code = 0
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_write, False)

    # -- starting ---------------------------------------------------------------------------------------------
    def _start_engine(self) -> None:
        receive, send = self.context.Pipe(duplex=False)
        process = self.context.Process(target=engine_main, name="effnet-engine",
                                       args=(self.addresses, send, self.args.log_level, os.getpid()))
        with _signals_blocked():
            process.start()
        send.close()
        self.engine = _Child(process)
        self.engine_status = receive

    def _start_worker(self, number: int) -> None:
        assert self.listener is not None
        receive, send = self.context.Pipe(duplex=False)
        process = self.context.Process(target=worker_main, name=f"effnet-worker-{number}",
                                       args=(number, self.listen, self.addresses, self.args, self.grpc_address,
                                             send, os.getpid()))
        with _signals_blocked():
            process.start()
        send.close()
        self.workers[number] = _Child(process, heartbeat=receive)

    def _wait_loaded(self) -> tuple[str, str | None]:
        """The engine's first word: ("loaded", None), ("failed" | "configuration", why), or ("signal", ..)."""
        assert self.engine is not None and self.engine_status is not None
        while True:
            ready = multiprocessing.connection.wait([self.engine_status, self.engine.process.sentinel,
                                                     self._wake_read])
            if self.engine_status in ready:
                try:
                    return self.engine_status.recv()
                except EOFError:
                    pass
            if self.engine.process.sentinel in ready and not self.engine_status.poll():
                self.engine.process.join()
                return "failed", f"the engine process exited with {describe_exit(self.engine.process.exitcode)}"
            if self._wake_read in ready:
                os.read(self._wake_read, 64)
                return "signal", None

    def _bind(self) -> socket.socket | None:
        """The HTTP port, held for the server's life by a socket that never listens (so it is given no
        connection): each worker listens beside it with ``SO_REUSEPORT``. It is first bound without that
        option, which fails if anything holds the port, another server of this kind included (two servers
        sharing a port would split its connections silently)."""
        host, port = self.args.host, self.args.port
        try:
            infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
            family, kind, proto, _, address = infos[0]
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(address)
                address = probe.getsockname()  # port 0: the one the kernel chose
            sock = socket.socket(family, kind, proto)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(address)
        except OSError as exc:
            log.error("startup failed: cannot listen on %s:%s: %s", host, port, exc.strerror or exc)
            return None
        self.listen = ListenSpec(family, kind, proto, address)
        return sock

    # -- running ----------------------------------------------------------------------------------------------
    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.signals += 1
        try:
            os.write(self._wake_write, bytes([signum]))
        except BlockingIOError:  # pragma: no cover - the pipe is full of earlier wake-ups
            pass

    def run(self) -> int:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        log.info("starting the engine process and %d workers", self.workers_wanted)
        self._start_engine()
        word, why = self._wait_loaded()
        if word != "loaded":
            if word == "signal":
                log.info("stopped before the models were loaded")
                self._stop_engine()
                return 0
            log.error("startup failed: %s", why)
            self._stop_engine()
            return 2 if word == "configuration" else 1
        self.listener = self._bind()
        if self.listener is None:
            self._stop_engine()
            return 1
        for number in range(self.workers_wanted):
            self._start_worker(number)
        log.info("serving on %s:%s with %d workers and one engine process (pid %d)", self.args.host,
                 self.args.port, self.workers_wanted, self.engine.process.pid if self.engine else -1)
        self._watch()
        self._stop_engine()
        self.listener.close()
        log.info("stopped")
        return self.exit_code

    def _watch(self) -> None:
        shutting_down = False
        while self.workers or not shutting_down:
            waiting: dict[Any, tuple[str, int]] = {child.process.sentinel: ("worker", n)
                                                    for n, child in self.workers.items()}
            if self.engine is not None:
                waiting[self.engine.process.sentinel] = ("engine", 0)
            status = self.engine_status if self.engine_status is not None and not self.engine_status.closed else None
            beats = {child.heartbeat: n for n, child in self.workers.items() if child.heartbeat is not None}
            handles = [*waiting, self._wake_read, *beats] + ([status] if status is not None else [])
            ready = multiprocessing.connection.wait(handles, timeout=1.0)
            for handle in ready:
                if handle in beats:
                    self._beat(beats[handle])
            if not shutting_down:
                self._kill_hung()
            if self._wake_read in ready:
                signals = os.read(self._wake_read, 64)
                for signum in signals:
                    name = signal.Signals(signum).name
                    if not shutting_down:
                        log.info("received %s: %d workers go into lame duck, then drain; the engine process "
                                 "stops last", name, len(self.workers))
                        shutting_down = True
                    else:
                        log.info("received %s again: passed to the workers (cuts their lame duck or drain)", name)
                    for child in self.workers.values():
                        _signal(child.process, signal.SIGTERM)
            if status is not None and status in ready:
                self._engine_word(status)
            for handle in ready:
                if handle not in waiting:
                    continue
                kind, number = waiting[handle]
                if kind == "worker":
                    self._worker_exited(number, shutting_down)
                else:
                    if not self._engine_exited(shutting_down):
                        shutting_down = True
                        for child in self.workers.values():
                            _signal(child.process, signal.SIGTERM)
            if shutting_down and not self.workers:
                return

    def _beat(self, number: int) -> None:
        child = self.workers[number]
        try:
            while child.heartbeat is not None and child.heartbeat.poll():
                child.heartbeat.recv_bytes()
                if child.last_beat is None:
                    log.info("worker %d (pid %d) is serving", number, child.process.pid)
                child.last_beat = time.monotonic()
        except (EOFError, OSError):  # the worker is gone: its exit is seen through its sentinel
            if child.heartbeat is not None:
                child.heartbeat.close()
            child.heartbeat = None

    def _kill_hung(self) -> None:
        now = time.monotonic()
        timeout = self.server.worker_timeout_s
        for number, child in self.workers.items():
            if child.killed:
                continue
            if child.last_beat is not None and now - child.last_beat > timeout:
                log.error("worker %d (pid %d) has not answered its supervisor for %.0f s: killing it to start "
                          "it again", number, child.process.pid, now - child.last_beat)
            elif child.last_beat is None and now - child.started > max(WORKER_START_S, timeout):
                # Hung before its loop first ticked (an import that never returns, a stopped process).
                log.error("worker %d (pid %d) has not started serving in %.0f s: killing it to start it again",
                          number, child.process.pid, now - child.started)
            else:
                continue
            child.killed = True
            _signal(child.process, signal.SIGKILL)

    def _engine_word(self, status: multiprocessing.connection.Connection) -> None:
        try:
            word, why = status.recv()
        except (EOFError, OSError):
            status.close()
            return
        if word == "loaded":
            log.info("engine process %d is serving again", self.engine.process.pid if self.engine else -1)
        elif word in ("failed", "configuration"):
            log.error("the restarted engine process cannot load the models: %s", why)

    def _worker_exited(self, number: int, shutting_down: bool) -> None:
        child = self.workers.pop(number)
        child.process.join()
        if child.heartbeat is not None:
            child.heartbeat.close()
        code = child.process.exitcode
        if shutting_down:
            if code:
                log.warning("worker %d exited with %s", number, describe_exit(code))
            return
        if not self._may_restart(f"worker {number}"):
            log.error("worker %d keeps dying (%d times in %.0f s, last with %s): stopping the server", number,
                      MAX_RESTARTS, RESTART_WINDOW_S, describe_exit(code))
            self.exit_code = 1
            for other in self.workers.values():
                _signal(other.process, signal.SIGTERM)
            return
        log.error("worker %d (pid %d) died with %s: restarting it", number, child.process.pid, describe_exit(code))
        self._start_worker(number)

    def _engine_exited(self, shutting_down: bool) -> bool:
        """The engine process ended: False when the server must stop."""
        assert self.engine is not None
        self.engine.process.join()
        code = self.engine.process.exitcode
        self.engine = None
        if shutting_down:
            return True
        if code == FAILED_AFTER_START:
            log.error("the engine process failed after start-up (see above): stopping the server")
            self.exit_code = 1
            return False
        if code in (1, 2):
            log.error("the engine process could not load the models: stopping the server")
            self.exit_code = 1
            return False
        if not self._may_restart("engine"):
            log.error("the engine process keeps dying (%d times in %.0f s): stopping the server", MAX_RESTARTS,
                      RESTART_WINDOW_S)
            self.exit_code = 1
            return False
        log.error("the engine process died with %s: restarting it; the workers answer 503 until it is back",
                  describe_exit(code))
        self._start_engine()
        return True

    def _may_restart(self, what: str) -> bool:
        now = time.monotonic()
        recent = [t for t in self.restarts.get(what, []) if now - t < RESTART_WINDOW_S]
        recent.append(now)
        self.restarts[what] = recent
        return len(recent) <= MAX_RESTARTS

    def _stop_engine(self) -> None:
        if self.engine is None:
            return
        process = self.engine.process
        _signal(process, signal.SIGTERM)
        process.join(self.server.shutdown_drain_s + 10)
        if process.is_alive():
            log.error("the engine process did not stop: killing it")
            process.kill()
            process.join()
        self.engine = None


def _signal(process: multiprocessing.process.BaseProcess, signum: int) -> None:
    try:
        if process.pid is not None and process.is_alive():
            os.kill(process.pid, signum)
    except ProcessLookupError:
        pass


def describe_exit(code: int | None) -> str:
    if code is None:
        return "no exit status"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit status {code}"


def run(args: argparse.Namespace, server: ServerSettings, grpc_address: str | None) -> int:
    code = Supervisor(args, server, grpc_address).run()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    return code


__all__ = ["Supervisor", "die_with_parent", "engine_main", "run", "worker_main"]
