"""``efficientnet-serve`` / ``python -m service``: run the HTTP front-end with uvicorn, one worker.

The model is loaded before the port opens, so a start that cannot succeed logs one line and exits 1 (an
invalid setting exits 2). SIGTERM or SIGINT starts a drain: readiness turns 503 and new requests get 503
while every admitted request is answered (up to EFFNET_SHUTDOWN_DRAIN_S); then uvicorn closes and the
process exits 0. A second signal skips the drain.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from types import FrameType

import uvicorn
from fastapi import FastAPI
from pydantic import ValidationError

from service.core.errors import StartupError
from service.core.loading import load_model
from service.core.logconfig import configure_logging
from service.core.runtime import Lifecycle
from service.core.settings import Settings
from service.http.app import create_app

log = logging.getLogger("service")

# After the drain, how long uvicorn may still take to finish open connections.
GRACEFUL_TAIL_S = 5


class DrainingServer(uvicorn.Server):
    """uvicorn's server with a drain phase before its own shutdown, and a plain exit code afterwards.

    uvicorn re-raises a captured SIGTERM once it has shut down, which would end the process "killed by
    SIGTERM" (143) instead of 0; this class handles the signals itself and does not.
    """

    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_timeout_s: float) -> None:
        super().__init__(config)
        self.app = app
        self.drain_timeout_s = drain_timeout_s
        self.exit_code = 0
        self._drain_requested = False
        self._drain_task: asyncio.Task[None] | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain_requested or not self.started:
            # A second signal, or one before the server is up: no drain.
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True
            return
        log.info("received %s: draining", signal.Signals(sig).name)
        self._drain_requested = True

    async def on_tick(self, counter: int) -> bool:
        service = getattr(self.app.state, "service", None)
        if service is not None and service.state is Lifecycle.FAILED and self.exit_code == 0:
            # A failure after start-up (warm-up): the service cannot serve, so the process exits 1.
            log.error("exiting: %s", service.failure)
            self.exit_code = 1
            self._drain_requested = True
        if self._drain_requested and self._drain_task is None:
            self._drain_task = asyncio.get_running_loop().create_task(self._drain())
        return await super().on_tick(counter)

    async def _drain(self) -> None:
        service = getattr(self.app.state, "service", None)
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
    try:
        settings = Settings()
    except ValidationError as exc:
        problems = "; ".join(
            (f"EFFNET_{'_'.join(str(p) for p in e['loc']).upper()}: " if e["loc"] else "") + e["msg"]
            for e in exc.errors()
        )
        log.error("invalid configuration: %s", problems)
        return 2
    try:
        model = load_model(settings)
    except StartupError as exc:
        log.error("startup failed: %s", exc)
        return 1
    except Exception as exc:  # anything unforeseen still gets one line, not a traceback
        log.error("startup failed: %s: %s", type(exc).__name__, _one_line(exc))
        return 1

    app = create_app(settings, model=model)
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
    server = DrainingServer(config, app, settings.shutdown_drain_s)
    server.run()
    if not server.started:
        return 1
    return server.exit_code
