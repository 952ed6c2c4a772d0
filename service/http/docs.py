"""Swagger UI at /docs, served from local files (an air-gapped cluster cannot reach a CDN).

The assets come from the ``swagger-ui-bundle-v2`` package (Swagger UI 5, which renders OpenAPI 3.1).
Without that package /docs is simply not served; /openapi.json always is.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

log = logging.getLogger("service.http.docs")

ASSETS = "/docs/assets"


def swagger_ui_dir() -> str | None:
    try:
        from swagger_ui_bundle import swagger_ui_path  # type: ignore[import-not-found]
    except ImportError:
        return None
    path = str(swagger_ui_path)
    return path


def install_docs(app: FastAPI) -> bool:
    """Serve Swagger UI at /docs from local assets; False (and no /docs) when they are not installed."""
    directory = swagger_ui_dir()
    if directory is None:
        log.info(
            "swagger-ui-bundle-v2 not installed: /docs disabled (the OpenAPI document is at /openapi.json)"
        )
        return False
    app.mount(ASSETS, StaticFiles(directory=directory), name="swagger-ui-assets")

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS}/favicon-32x32.png",
        )

    return True
