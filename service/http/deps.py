"""Dependencies shared by the routers: the served models, the settings, the API key check."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.core.auth import check_api_key
from service.core.errors import NotReady
from service.core.registry import ModelRegistry
from service.core.runtime import InferenceService
from service.core.settings import Settings

_bearer = HTTPBearer(auto_error=False, description="Required only when EFFNET_API_KEY is set.")


def get_models(request: Request) -> ModelRegistry:
    models = getattr(request.app.state, "models", None)
    if models is None:
        raise NotReady("model is not loaded yet")
    return models


def get_service(
    models: Annotated[ModelRegistry, Depends(get_models)],
    model: Annotated[str | None, Query(
        description="The model to use, by name (see /info's `models`); default: EFFNET_DEFAULT_MODEL or the "
                    "only one. An unknown name is a 404 listing the served ones.",
        max_length=64,
    )] = None,
) -> InferenceService:
    return models.get(model)


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def require_api_key(
    settings: Annotated[Settings, Depends(get_settings)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    check_api_key(settings, credentials.credentials if credentials is not None else None)


ModelsDep = Annotated[ModelRegistry, Depends(get_models)]
ServiceDep = Annotated[InferenceService, Depends(get_service)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
