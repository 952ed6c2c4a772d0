"""``efficientnet-serve`` / ``python -m service``: run the server (the app of ``service.server.app``, its
doors and models) with uvicorn, one process.

The model is loaded before the port opens, so a start that cannot succeed logs one line and exits 1 (an
invalid setting exits 2).

Shutdown (SIGTERM or SIGINT), as servers behind load balancers do it:

1. lame duck, ``EFFNET_SHUTDOWN_DELAY_S``: ``/readyz`` answers 503 at once, so the load balancer's health
   checks take the replica out, while new requests are still admitted and answered (the balancer keeps
   sending some until its checks notice); every response carries ``Connection: close`` so kept-alive
   connections move to other replicas. Skipped if the service was not ready (it got no traffic).
2. drain, ``EFFNET_SHUTDOWN_DRAIN_S``: new requests get 503 ``shutting_down``; admitted ones are answered.
3. uvicorn closes the connections (at most ``GRACEFUL_TAIL_S``), the core service stops, exit 0.

A second signal during the lame duck skips the rest of it; one during the drain skips the drain; a SIGINT
after that stops at once. Without a load balancer the process exits within delay + drain + 1 s.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
from types import FrameType

import uvicorn
from fastapi import FastAPI
from pydantic import ValidationError

from service.core.errors import ConfigurationError, StartupError
from service.core.lifecycle import State
from service.core.logconfig import configure_logging
from service.core.registry import ModelRegistry, load_startup
from service.core.settings import ModelSettings, ServerSettings, settings_problems, unknown_settings
from service.server.app import create_app

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
        self, config: uvicorn.Config, app: FastAPI, drain_timeout_s: float, delay_s: float = 0.0
    ) -> None:
        super().__init__(config)
        self.app = app
        self.drain_timeout_s = drain_timeout_s
        self.delay_s = delay_s
        self.exit_code = 0
        self.signals = 0  # shutdown signals received so far
        self._loop: asyncio.AbstractEventLoop | None = None
        self._shutdown_task: asyncio.Task[None] | None = None
        self._skip_delay: asyncio.Event | None = None

    @property
    def service(self) -> ModelRegistry | None:
        """The served models and the server's lifecycle over them."""
        return getattr(self.app.state, "models", None)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        self._skip_delay = asyncio.Event()
        await super().startup(sockets=sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # A signal handler: it runs between two bytecodes of the main (event loop) thread, so it only
        # records what to do and hands the work to the loop.
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="efficientnet-serve",
        description="EfficientNet inference service. Every other setting comes from EFFNET_* variables.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to bind (default 8000)")
    parser.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
    return parser.parse_args(argv)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(args.log_level)
    for name in unknown_settings():
        log.warning("%s is set but no setting reads it (a typo, or a setting of another release?)", name)
    try:
        settings = ServerSettings()
        model_settings = ModelSettings()
    except ValidationError as exc:
        log.error("invalid configuration: %s", settings_problems(exc))
        return 2
    if settings.grpc_port:
        # A taken gRPC port fails the start in one line, before the model load, like a taken HTTP port.
        from service.v2.grpc_server import port_problem

        if problem := port_problem(args.host, settings.grpc_port):
            log.error("startup failed: %s", problem)
            return 1
    try:
        # Tracing first (OTEL_* asking for an exporter that is not installed fails here, in one line),
        # then the models, resolving their settings.
        startup = load_startup(settings, model_settings)
    except ConfigurationError as exc:  # a combination only the machine decides (resolved())
        log.error("%s", exc)
        return 2
    except StartupError as exc:
        log.error("startup failed: %s", exc)
        return 1
    except Exception as exc:  # anything unforeseen still gets one line, not a traceback
        log.error("startup failed: %s: %s", type(exc).__name__, _one_line(exc))
        return 1

    grpc_address = None
    if settings.grpc_port:
        from service.v2.grpc_server import grpc_address as address

        grpc_address = address(args.host, settings.grpc_port)
    app = create_app(settings, startup=startup, grpc_address=grpc_address)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        workers=1,
        lifespan="on",
        log_config=None,
        log_level=args.log_level,
        access_log=False,  # the service writes its own structured access log
        server_header=False,
        timeout_graceful_shutdown=GRACEFUL_TAIL_S,
        timeout_keep_alive=int(settings.keep_alive_s),
    )
    server = DrainingServer(config, app, settings.shutdown_drain_s, delay_s=settings.shutdown_delay_s)
    server.run()
    if not server.started:
        return 1
    # Everything is closed now: connections, batcher, thread pools. The interpreter's own teardown (torch's
    # modules) would take about 1 s more, which only delays the exit an orchestrator or a rolling restart
    # waits for, so the process ends here, after flushing the logs.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(server.exit_code)
