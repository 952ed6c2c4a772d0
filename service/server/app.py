"""The HTTP application, assembled once: ``create_app(server)`` puts the doors (the native API, V2 REST,
the page, the docs), the error handlers and the middleware together, and its lifespan starts and stops
the models and the gRPC door.

The lifespan loads the models (unless the caller already did, as ``efficientnet-serve`` does so that a
bad start fails before the port opens), starts the registry and its warm-up and, when asked, the gRPC
server on the same models; on shutdown it stops the gRPC server, drains the admitted work and flushes
the last spans. Nothing here handles a request: the doors do.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from service.core import tracing
from service.core.about import service_version
from service.core.metrics import Metrics
from service.core.settings import ServerSettings, available_cpus
from service.http import errors as native_errors
from service.http import inference, operations
from service.http.docs import install_docs
from service.server.errors import install_error_handlers
from service.server.middleware import BodyLimitMiddleware, RequestContextMiddleware
from service.v2 import rest as v2_rest
from service.web import web_router

if TYPE_CHECKING:
    from service.core.engine_client import EngineAddress
    from service.core.registry import Startup

log = logging.getLogger("service.server.app")


def worker_decode_threads(server: ServerSettings) -> int:
    """Decode threads of one front-end worker: EFFNET_DECODE_THREADS, else the host's CPUs shared among
    the workers (at least one each): the workers together decode on every CPU, as one process would."""
    if server.decode_threads:
        return server.decode_threads
    return max(1, available_cpus() // server.effective_workers)


def create_app(
    server: ServerSettings | None = None,
    *,
    startup: Startup | None = None,
    grpc_address: str | None = None,
    engine: EngineAddress | None = None,
) -> FastAPI:
    """Build the app. ``startup``: the models already loaded (``load_startup``, as ``efficientnet-serve``
    does so that a bad start fails before the port opens); None: the lifespan loads them from the
    environment. ``grpc_address`` (host:port): also serve the Open Inference Protocol over gRPC there, on
    the same models (``efficientnet-serve`` passes it unless EFFNET_GRPC_PORT is 0). ``engine``: this is a
    front-end worker of a server of several processes: its models are the engine process's there
    (``RemoteRegistry``), and this process loads none (and imports no torch)."""
    server = server or ServerSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if engine is not None:
            from service.core.engine_client import RemoteRegistry

            registry = RemoteRegistry(server, engine, decode_threads=worker_decode_threads(server))
            app.state.metrics = registry.metrics
        else:
            from service.core.registry import ModelRegistry, load_startup

            loaded = startup if startup is not None else await asyncio.to_thread(load_startup, server)
            metrics = Metrics(max(m.settings.max_batch_size for m in loaded.models))
            registry = ModelRegistry(server, metrics, loaded)
            app.state.metrics = metrics
        app.state.models = registry
        await registry.start()
        grpc_server = None
        if grpc_address:
            from service.v2.grpc_server import GrpcServer

            grpc_server = GrpcServer(registry, server, grpc_address, shared=engine is not None)
            try:
                await grpc_server.start()
            except BaseException:
                await registry.close()
                raise
        for name in registry.names:
            model = registry.models[name].model
            log.info("serving %s as '%s' on %s (%s, %s weights)", model.variant.name, name,
                     model.engine.device, model.engine.dtype, model.weights_source)
        if engine is not None:
            log.info("worker %d serving (models in the engine process)", engine.worker)
        try:
            yield
        finally:
            if grpc_server is not None:
                # By now the drain has answered every admitted call; the grace covers any still finishing.
                await grpc_server.stop(grace=min(5.0, server.shutdown_drain_s))
            await registry.close()
            # The spans of the last requests, before the process exits (bounded: an exporter that is down
            # costs the shutdown at most this long, off the event loop).
            await asyncio.to_thread(tracing.flush, 2.0)

    app = FastAPI(
        title="EfficientNet inference service",
        version=service_version(),
        description="Image classification and embeddings with EfficientNet, dynamically batched.",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    app.state.server = server
    app.state.models = None  # until the lifespan has loaded them (the probes answer 503 meanwhile)
    # Each door's error body, by the paths it owns.
    app.state.envelopes = (native_errors.ENVELOPE, v2_rest.ENVELOPE)
    install_error_handlers(app)
    # The doors: the native API, V2 REST, the docs, the page at / (outside the OpenAPI document, open
    # even with an API key).
    app.include_router(operations.router)
    app.include_router(inference.inference_router(require_auth=server.api_key is not None))
    install_docs(app)
    app.include_router(v2_rest.v2_router())
    app.include_router(web_router())

    # Added innermost first: the request-context middleware must wrap everything, including the 413
    # that the body limit answers without calling the app.
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=server.max_body_bytes)
    origins = server.cors_origin_list
    if origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "X-Request-ID", "traceparent", "tracestate"],
            expose_headers=["X-Request-ID", "Retry-After", "traceresponse"],
        )
    app.add_middleware(RequestContextMiddleware,
                       untraced=frozenset(operations.PROBE_PATHS) | frozenset(v2_rest.PROBE_PATHS))
    return app
