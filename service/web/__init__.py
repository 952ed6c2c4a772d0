"""The web page at ``/``: try the model from a browser (choose or drop images, see labels or features).

Three fixed files from this package (``static/``), read once when the router is built: no CDN, no file
looked up from a request path, no template. The page talks to ``/predict``, ``/features`` and ``/info``
of the same origin with relative URLs, so it also works behind a proxy that serves the service under a
path prefix. Its Content-Security-Policy forbids every load from elsewhere.
"""

from __future__ import annotations

from service.web.page import ASSETS, CONTENT_SECURITY_POLICY, web_router

__all__ = ["ASSETS", "CONTENT_SECURITY_POLICY", "web_router"]
