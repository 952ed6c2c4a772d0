"""The API key check every front-end shares (HTTP bearer header, V2 REST, gRPC ``authorization`` metadata)."""

from __future__ import annotations

import hmac

from service.core.errors import Unauthorized
from service.core.settings import ServerSettings


def check_api_key(settings: ServerSettings, supplied: str | None) -> None:
    """Raise ``Unauthorized`` unless ``supplied`` is the configured key (or none is configured); the
    comparison takes the same time wherever the strings differ."""
    key = settings.api_key
    if key is None:
        return
    if not hmac.compare_digest((supplied or "").encode("utf-8"), key.get_secret_value().encode("utf-8")):
        raise Unauthorized()


def check_bearer(settings: ServerSettings, authorization: str | None) -> None:
    """``check_api_key`` on the value of an ``Authorization: Bearer <key>`` header (or gRPC metadata)."""
    scheme, _, supplied = (authorization or "").partition(" ")
    check_api_key(settings, supplied.strip() if scheme.lower() == "bearer" else None)
