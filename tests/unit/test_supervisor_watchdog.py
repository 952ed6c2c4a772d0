"""The supervisor's watchdog (service/server/processes.py): a worker whose event loop stops ticking is
killed to be started again, whether it stopped while serving or hung before it ever served."""

from __future__ import annotations

import signal
import types

import pytest

from service.server import processes
from service.server.processes import WORKER_START_S, Supervisor, _Child


def _supervisor(monkeypatch, timeout: float = 30.0) -> tuple[Supervisor, list[tuple[int, int]]]:
    killed: list[tuple[int, int]] = []
    monkeypatch.setattr(processes, "_signal", lambda process, signum: killed.append((process.pid, signum)))
    supervisor = Supervisor.__new__(Supervisor)  # only what the watchdog reads
    supervisor.server = types.SimpleNamespace(worker_timeout_s=timeout)
    supervisor.workers = {}
    return supervisor, killed


def _worker(pid: int, started: float, last_beat: float | None) -> _Child:
    return _Child(types.SimpleNamespace(pid=pid), started=started, last_beat=last_beat)


@pytest.mark.parametrize("timeout", [3.0, 30.0, 300.0])
def test_only_a_silent_worker_is_killed_and_only_once(monkeypatch, timeout):
    supervisor, killed = _supervisor(monkeypatch, timeout)
    now = 10_000.0
    monkeypatch.setattr(processes.time, "monotonic", lambda: now)
    start_limit = max(WORKER_START_S, timeout)
    supervisor.workers = {
        0: _worker(100, started=now - 1000, last_beat=now - 0.5),              # serving
        1: _worker(101, started=now - 1000, last_beat=now - timeout - 1),      # its loop stopped
        2: _worker(102, started=now - start_limit + 5, last_beat=None),        # still starting
        3: _worker(103, started=now - start_limit - 1, last_beat=None),        # hung while starting
    }
    supervisor._kill_hung()
    assert killed == [(101, signal.SIGKILL), (103, signal.SIGKILL)]
    supervisor._kill_hung()  # their exits are awaited: no second kill, no second log line
    assert killed == [(101, signal.SIGKILL), (103, signal.SIGKILL)]
