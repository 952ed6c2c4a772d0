"""The native API's error body, one JSON shape for every failure under its routes:

``{"error": {"code": str, "message": str, "request_id": str | null}}``; 422s add ``details``; an error about
one image of the request adds ``image_index``, 0-based, and ``reason``, the message without its
"image N: " prefix. Stack traces go to the log, never to the client.
"""

from __future__ import annotations

from typing import Any

from service.asgi import ErrorEnvelope


def error_body(code: str, message: str, request_id: str | None, **extra: Any) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "request_id": request_id, **extra}}


# The native API owns every path no other door claims ("" prefix): /predict, /info, the page, unknown paths.
ENVELOPE = ErrorEnvelope("", error_body)
