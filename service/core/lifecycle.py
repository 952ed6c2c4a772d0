"""Where a served model, or the whole server, stands: one ``Lifecycle`` object used by both.

A model's lifecycle is set by the model itself (warming, ready, failed, draining, stopped). The server's
(``ModelRegistry.lifecycle``) is composed: while the server runs, its state is derived from its models'
(warming while any start-up model warms, failed when one failed); the shutdown steps (lame duck, drain,
stopped) are set on it directly. Probes and every front-end read ``state``; the gRPC health service and
the readiness gauge subscribe to its changes. The lame duck and the drain are written here once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from enum import Enum

from service.core.errors import NotReady, ServiceError, ShuttingDown

log = logging.getLogger("service.core.lifecycle")


class State(str, Enum):
    """The states the probes report, in order.

    ``warming`` (loaded, warm-up passes running; readiness 503) -> ``ready`` -> ``lame_duck`` (SIGTERM
    came: readiness 503 so load balancers take the replica out, but requests are still admitted and
    answered; responses ask clients to close their connections) -> ``draining`` (new requests refused
    with 503 ``shutting_down``, admitted ones still answered) -> ``stopped``. A warm-up that fails moves
    to ``failed``: liveness turns 503 and the server exits non-zero with the failure.

    For a front-end: ``ready`` is readiness (``/readyz``, V2 ready, gRPC health "serving"), ``live`` is
    liveness; work is admitted while ``admits_requests``; ``shutting_down`` is true from ``lame_duck`` on.
    """

    STARTING = "starting"
    WARMING = "warming"
    READY = "ready"
    LAME_DUCK = "lame_duck"
    DRAINING = "draining"
    STOPPED = "stopped"
    FAILED = "failed"

    @property
    def shutting_down(self) -> bool:
        """On the way out (lame duck, draining, stopped): readiness 503, connections closed after use."""
        return self in (State.LAME_DUCK, State.DRAINING, State.STOPPED)

    @property
    def admits_requests(self) -> bool:
        """New inference requests are accepted (ready, or lame duck: still served while LBs catch up)."""
        return self in (State.READY, State.LAME_DUCK)

    @property
    def ready(self) -> bool:
        """Readiness: warmed up and not leaving. Load balancers send traffic only while this is true."""
        return self is State.READY

    @property
    def live(self) -> bool:
        """Liveness: false only after a fatal failure (the orchestrator should restart the process)."""
        return self is not State.FAILED

    def not_ready_error(self) -> ServiceError:
        """The 503 a readiness probe (or a request refused for the same reason) gets in this state."""
        if self.shutting_down:
            return ShuttingDown("server is shutting down; retry on another instance", headers={"Connection": "close"})
        if self is State.FAILED:
            return NotReady("service failed after start-up; see the server log")
        return NotReady(f"model is not ready yet ({self.value})")


Listener = Callable[[State], None]


class Lifecycle:
    """A state with listeners, the lame duck and the drain.

    ``phase`` is what the owner set. ``derive`` (the server's): while the phase is ``ready`` (running), the
    state is what it returns, so the server is warming or failed as its models are; ``refresh()``
    recomputes it when they change. ``label``: how the log line names the owner ("model 'x'"; the
    server's says plain "state: ...", which operators and the rolling-restart test read).
    """

    def __init__(self, label: str | None = None, derive: Callable[[], State] | None = None) -> None:
        self.label = label
        self._derive = derive
        self.phase = State.STARTING
        self.state = State.STARTING
        self.failure: str | None = None  # why it failed (state FAILED)
        self._listeners: list[Listener] = []
        self._drain_deadline: float | None = None  # monotonic; fixed by the first drain

    # -- state and listeners --------------------------------------------------------------------------------
    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(state)`` (on the event loop) at every change, e.g. to mirror readiness in a gRPC
        health service."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def set(self, phase: State) -> None:
        self.phase = phase
        self.refresh()

    def fail(self, failure: str) -> None:
        self.failure = failure
        self.set(State.FAILED)

    def refresh(self) -> None:
        """Recompute the state (the server's, after one of its models changed) and tell the listeners."""
        state = self._derive() if self._derive is not None and self.phase is State.READY else self.phase
        if state is self.state:
            return
        self.state = state
        log.info("%sstate: %s", f"{self.label} " if self.label else "", state.value)
        for listener in list(self._listeners):
            try:
                listener(state)
            except Exception:  # a front-end's hook must not break the lifecycle
                log.exception("state listener failed")

    # -- shutting down ----------------------------------------------------------------------------------------
    def enter_lame_duck(self) -> bool:
        """SIGTERM's first step: readiness 503 while requests are still admitted. True if it was ready
        (load balancers may still send traffic, so the caller waits before draining); False if it never
        was (warming, failed) or is already leaving, and there is nothing to wait for."""
        if self.state is not State.READY:
            return False
        self.set(State.LAME_DUCK)
        return True

    def begin_drain(self) -> None:
        """Refuse new work from now on (admitted work is still answered)."""
        if self.phase not in (State.DRAINING, State.STOPPED):
            self.set(State.DRAINING)

    async def drain(self, timeout: float, busy: Callable[[], bool]) -> bool:
        """Stop admitting work and wait (up to ``timeout``) while ``busy()``: True when it finished.

        The first call fixes the drain's deadline; later calls (a close after a signal's drain) wait at
        most until then."""
        self.begin_drain()
        if self._drain_deadline is None:
            self._drain_deadline = time.monotonic() + timeout
        deadline = min(self._drain_deadline, time.monotonic() + timeout)
        while busy():
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.01)
        return True


__all__ = ["Lifecycle", "State"]
