"""``efficientnet-serve`` / ``python -m service``: run the server (the app of ``service.server.app``, its
doors and models) with uvicorn in one process, or, with ``EFFNET_WORKERS`` > 1, as a supervisor of
front-end workers and one engine process (``service.server.processes``).

The model is loaded before the port opens, so a start that cannot succeed logs one line and exits 1 (an
invalid setting exits 2). The shutdown (lame duck, drain) is ``service.server.draining``'s.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import uvicorn
from pydantic import ValidationError

from service.core.errors import ConfigurationError, StartupError
from service.core.logconfig import configure_logging
from service.core.registry import load_startup
from service.core.settings import ModelSettings, ServerSettings, settings_problems, unknown_settings
from service.server.app import create_app
from service.server.draining import GRACEFUL_TAIL_S, DrainingServer

log = logging.getLogger("service")


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
    parser.add_argument("--workers", metavar="N",
                        help="front-end processes (default: $EFFNET_WORKERS, else 1); auto: the CPUs less one")
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
        settings = ServerSettings(**({"workers": args.workers} if args.workers is not None else {}))
        model_settings = ModelSettings()
    except ValidationError as exc:
        log.error("invalid configuration: %s", settings_problems(exc))
        return 2
    if args.workers is not None:
        # The workers and the engine process read their settings from the environment: the same there.
        os.environ["EFFNET_WORKERS"] = str(settings.workers)
    if settings.grpc_port:
        # A taken gRPC port fails the start in one line, before the model load, like a taken HTTP port.
        from service.v2.grpc_server import port_problem

        if problem := port_problem(args.host, settings.grpc_port):
            log.error("startup failed: %s", problem)
            return 1
    grpc_address = None
    if settings.grpc_port:
        from service.v2.grpc_server import grpc_address as address

        grpc_address = address(args.host, settings.grpc_port)
    if settings.effective_workers > 1:
        # Several front-end processes and one engine process (service/server/processes.py).
        from service.server import processes

        return processes.run(args, settings, grpc_address)
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
