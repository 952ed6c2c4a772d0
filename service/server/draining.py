"""uvicorn's server with the shutdown a server behind a load balancer needs (``DrainingServer``): the one
every process that serves HTTP runs, a one-process server and each front-end worker alike.

Shutdown (SIGTERM or SIGINT), as servers behind load balancers do it:

1. lame duck, ``EFFNET_SHUTDOWN_DELAY_S``: ``/readyz`` answers 503 at once, so the load balancer's health
   checks take the replica out, while new requests are still admitted and answered (the balancer keeps
   sending some until its checks notice); every response carries ``Connection: close`` so kept-alive
   connections move to other replicas. Skipped if the service was not ready (it got no traffic).
2. drain, ``EFFNET_SHUTDOWN_DRAIN_S``: new requests get 503 ``shutting_down``; admitted ones are answered.
3. uvicorn closes the connections (at most ``GRACEFUL_TAIL_S``), the models stop, exit 0.

A second signal during the lame duck skips the rest of it; one during the drain skips the drain; a SIGINT
after that stops at once. Without a load balancer the process exits within delay + drain + 1 s.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from types import FrameType

import uvicorn
from fastapi import FastAPI

from service.core.lifecycle import State

log = logging.getLogger("service")

# After the drain, how long uvicorn may still take to send the last responses and close connections.
# Every admitted request has been answered (or the drain ran out of time) by then, so this is short: it
# keeps the exit within delay + drain + 1 s.
GRACEFUL_TAIL_S = 0.3


class DrainingServer(uvicorn.Server):
    """uvicorn's server with a lame-duck period and a drain before its own shutdown, and a plain exit code.

    uvicorn re-raises a captured SIGTERM once it has shut down, which would end the process "killed by
    SIGTERM" (143) instead of 0; this class handles the signals itself and does not.

    Where the shutdown stands is the server's lifecycle (lame duck, draining, stopped), not a state
    of this class; it only counts the signals, since a second one arrives before the event loop has
    acted on the first.
    """

    def __init__(
        self, config: uvicorn.Config, app: FastAPI, drain_timeout_s: float, delay_s: float = 0.0,
        *, follow_sigint: bool = True,
    ) -> None:
        """``follow_sigint``: False in a front-end worker, whose supervisor turns the terminal's Ctrl-C
        (which reaches every process of the group) into one SIGTERM each."""
        super().__init__(config)
        self.follow_sigint = follow_sigint
        self.early_signals: list[int] = []
        self.app = app
        self.drain_timeout_s = drain_timeout_s
        self.delay_s = delay_s
        self.exit_code = 0
        self.signals = 0  # shutdown signals received so far
        self._loop: asyncio.AbstractEventLoop | None = None
        self._shutdown_task: asyncio.Task[None] | None = None
        self._skip_delay: asyncio.Event | None = None

    @property
    def service(self):  # noqa: ANN201 - the app's registry (in-process or a worker's), or None before start
        """The served models and the server's lifecycle over them."""
        return getattr(self.app.state, "models", None)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        self._skip_delay = asyncio.Event()
        await super().startup(sockets=sockets)
        # Signals that came before uvicorn's handlers were in place (a front-end worker records them
        # from its first instant): acted on now, as if they had come now.
        for sig in self.early_signals:
            self.handle_exit(sig, None)
        self.early_signals.clear()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # A signal handler: it runs between two bytecodes of the main (event loop) thread, so it only
        # records what to do and hands the work to the loop.
        if sig == signal.SIGINT and not self.follow_sigint:
            return
        name = signal.Signals(sig).name
        if not self.started or self._loop is None or self.should_exit:
            # Before the server is up, or already closing: plain uvicorn behaviour.
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True
            return
        self.signals += 1
        service = self.service
        if self.signals == 1:
            self._loop.call_soon_threadsafe(self._begin_shutdown, f"received {name}")
        elif service is not None and service.state is State.DRAINING:
            log.info("received %s: drain skipped", name)
            self.should_exit = True
        else:  # lame duck, or the first signal not acted on yet: the lame duck is cut short
            log.info("received %s: lame duck cut short", name)
            assert self._skip_delay is not None
            self._loop.call_soon_threadsafe(self._skip_delay.set)

    def _begin_shutdown(self, reason: str) -> None:
        if self._shutdown_task is None:
            self._shutdown_task = asyncio.get_running_loop().create_task(self._shutdown(reason))

    async def on_tick(self, counter: int) -> bool:
        service = self.service
        if service is not None and not service.state.live and self.exit_code == 0:
            # A failure after start-up (warm-up): the service cannot serve, so the process exits 1.
            log.error("exiting: %s", service.failure)
            self.exit_code = 1
            self._begin_shutdown("failed after start-up")
        return await super().on_tick(counter)

    async def _shutdown(self, reason: str) -> None:
        service = self.service
        assert self._skip_delay is not None
        if service is not None and self.delay_s > 0 and not self._skip_delay.is_set() and service.enter_lame_duck():
            log.info(
                "%s: lame duck for %.1f s (readiness 503, requests still served; signal again to skip)",
                reason,
                self.delay_s,
            )
            try:
                await asyncio.wait_for(self._skip_delay.wait(), self.delay_s)
            except asyncio.TimeoutError:
                pass
            log.info("lame duck over: draining")
        else:
            log.info("%s: draining", reason)
        if service is not None:
            drained = await service.drain(self.drain_timeout_s)
            log.info("drain %s", "complete" if drained else "timed out")
        self.should_exit = True
