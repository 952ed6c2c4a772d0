"""The FastAPI application: ``create_app(settings)`` wires settings, model, core service, routers and
middleware.

The lifespan loads the model (unless the caller already did, as ``efficientnet-serve`` does so that a bad
start fails before the port opens), starts the core service and its warm-up, and on shutdown drains the
admitted work before stopping.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from service.core import tracing
from service.core.about import service_version
from service.core.loading import LoadedModel
from service.core.metrics import Metrics
from service.core.registry import ModelRegistry, StartupModel, load_startup_models
from service.core.repository import ModelRepository
from service.core.settings import Settings
from service.http import inference, operations
from service.http.docs import install_docs
from service.http.errors import install_error_handlers
from service.http.middleware import BodyLimitMiddleware, RequestContextMiddleware
from service.v2.rest import v2_router
from service.web import web_router

log = logging.getLogger("service.http.app")


def create_app(
    settings: Settings | None = None,
    *,
    model: LoadedModel | None = None,
    models: list[StartupModel] | None = None,
    grpc_address: str | None = None,
) -> FastAPI:
    """Build the app. ``models``: the models already loaded (``load_startup_models``, as
    ``efficientnet-serve`` does so that a bad start fails before the port opens); ``model``: one already
    loaded model; neither: the lifespan loads them from ``settings``. ``grpc_address`` (host:port): also
    serve the Open Inference Protocol over gRPC there, on the same models (``efficientnet-serve`` passes it
    unless EFFNET_GRPC_PORT is 0)."""
    settings = (settings or Settings()).resolved()
    metrics = Metrics(settings.max_batch_size)
    tracing.setup()  # from the OTEL_* variables, once per process; nothing while they ask for none

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if models is not None:
            startup = models
        elif model is not None:
            startup = [StartupModel(None, settings, model)]
        else:
            startup = await asyncio.to_thread(load_startup_models, settings)
        registry = ModelRegistry(settings, metrics, startup)
        if settings.model_repository:
            registry.use_repository(ModelRepository(settings.model_repository, settings))
        app.state.models = registry
        await registry.start()
        grpc_server = None
        if grpc_address:
            from service.v2.grpc_server import GrpcServer

            grpc_server = GrpcServer(registry, grpc_address)
            try:
                await grpc_server.start()
            except BaseException:
                await registry.close()
                raise
        for name in registry.names:
            loaded = registry.services[name].model
            log.info("serving %s as '%s' on %s (%s, %s weights)", loaded.variant.name, name,
                     loaded.engine.device, loaded.engine.dtype, loaded.weights_source)
        try:
            yield
        finally:
            if grpc_server is not None:
                # By now the drain has answered every admitted call; the grace covers any still finishing.
                await grpc_server.stop(grace=min(5.0, settings.shutdown_drain_s))
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
    app.state.settings = settings
    app.state.metrics = metrics
    install_error_handlers(app)
    app.include_router(operations.router)
    app.include_router(inference.inference_router(require_auth=settings.api_key is not None))
    install_docs(app)
    # The Open Inference Protocol (KServe V2) REST routes, on the same service and middleware.
    app.include_router(v2_router())
    # The page at / (a person trying the model); outside the OpenAPI document, open even with an API key.
    app.include_router(web_router())

    # Added innermost first: the request-context middleware must wrap everything, including the 413
    # that the body limit answers without calling the app.
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    origins = settings.cors_origin_list
    if origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "X-Request-ID", "traceparent", "tracestate"],
            expose_headers=["X-Request-ID", "Retry-After", "traceresponse"],
        )
    app.add_middleware(RequestContextMiddleware, metrics=metrics)
    return app
