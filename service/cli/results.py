"""One image's outcome, as every runner produces it and every output format writes it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Result:
    """``top_k`` (predict) or ``embedding`` (features) on success, ``error`` otherwise.

    ``top_k`` is the list of ``{"index", "label", "score"}`` objects exactly as ``/predict`` gives it;
    ``embedding`` is float64 as ``/features`` gives it; ``error`` is ``{"code", "message"}`` as in the
    service's error bodies (plus codes of the command's own: ``unreadable``, ``body_too_large``).
    ``cam`` (``--cam``): the explained class and the files drawn for it (``index``, ``label``, ``png``,
    ``npy``), in .jsonl rows.
    """

    path: str
    top_k: list[dict[str, Any]] | None = None
    embedding: np.ndarray | None = None
    error: dict[str, str] | None = None
    cam: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def as_json(self) -> dict[str, Any]:
        row: dict[str, Any] = {"path": self.path}
        if self.error is not None:
            row["error"] = self.error
        elif self.top_k is not None:
            row["top_k"] = self.top_k
            if self.cam is not None:
                row["cam"] = self.cam
        else:
            assert self.embedding is not None
            row["embedding"] = self.embedding.tolist()
        return row


def failure(path: str, code: str, message: str) -> Result:
    return Result(path=path, error={"code": code, "message": message})


class FatalError(Exception):
    """Stops the whole run (the server refuses the key, cannot be reached, ...); the output stays valid."""
