"""The native API's own dependency: the model a request names (``?model=``), looked up in the registry."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Query

from service.asgi import ModelsDep
from service.core.runtime import ServedModel


def get_model(
    models: ModelsDep,
    model: Annotated[str | None, Query(
        description="The model to use, by name (see /info's `models`); default: EFFNET_DEFAULT_MODEL or the "
                    "only one. An unknown name is a 404 listing the served ones.",
        max_length=64,
    )] = None,
) -> ServedModel:
    return models.get(model)


ModelDep = Annotated[ServedModel, Depends(get_model)]
