"""Turning an engine's raw outputs into answers: probabilities, top-k classes, embeddings.

Shared by every front-end so that /predict, the V2 classification extension and the batch command give
the same scores for the same image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from service.core.errors import InvalidParameter, NoClassifier

NO_CLASSIFIER = ("the served checkpoint has no classifier (it was saved without one, e.g. include_top=False or "
                 "num_classes=0): it answers features only (/features, the V2 'features' output)")


@dataclass(frozen=True)
class ClassScore:
    index: int
    label: str
    score: float


class HasClasses:
    """What the checks below read of a model (a ``LoadedModel``, or a description of one)."""

    num_classes: int


def require_classifier(model: HasClasses) -> None:
    """``NoClassifier`` (422) unless the served model has a classifier: the one check every front-end's
    classification path goes through."""
    if model.num_classes == 0:
        raise NoClassifier(NO_CLASSIFIER)


def check_top_k(model: HasClasses, k: int, parameter: str = "top_k") -> None:
    """The classification checks of every door (``/predict``'s ``top_k``, V2's ``classification``, the
    batch command's ``--top-k``): the model has a classifier, and ``k`` is between 1 and its classes.
    ``InvalidParameter`` (422) names ``parameter`` otherwise."""
    require_classifier(model)
    if k < 1 or k > model.num_classes:
        raise InvalidParameter(f"{parameter}: must be between 1 and the model's {model.num_classes} classes, "
                               f"not {k}", parameter=parameter)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities over the last axis, computed in float64 for stable small scores."""
    if logits.shape[-1] == 0:
        raise NoClassifier(NO_CLASSIFIER)
    shifted = logits.astype(np.float64) - np.max(logits, axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def top_classes(logits: np.ndarray, labels: Sequence[str], k: int) -> list[ClassScore]:
    """The ``k`` most probable classes of one image's logits, best first (ties keep class order)."""
    probs = softmax(logits)
    best = np.argsort(-probs, kind="stable")[:k]
    return [ClassScore(index=int(i), label=labels[i], score=float(probs[i])) for i in best]


def embedding(pooled: np.ndarray, *, normalize: bool = False) -> np.ndarray:
    """One image's pooled features as float64, optionally L2-normalised."""
    vector = pooled.astype(np.float64)
    if normalize:
        vector = vector / max(float(np.linalg.norm(vector)), 1e-12)
    return vector
