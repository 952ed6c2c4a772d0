"""Dependencies shared by the routers: the running service, the settings, the API key check."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.core.auth import check_api_key
from service.core.errors import NotReady
from service.core.runtime import InferenceService
from service.core.settings import Settings

_bearer = HTTPBearer(auto_error=False, description="Required only when EFFNET_API_KEY is set.")


def get_service(request: Request) -> InferenceService:
    service = getattr(request.app.state, "service", None)
    if service is None:
        raise NotReady("model is not loaded yet")
    return service


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def require_api_key(
    settings: Annotated[Settings, Depends(get_settings)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    check_api_key(settings, credentials.credentials if credentials is not None else None)


ServiceDep = Annotated[InferenceService, Depends(get_service)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
