"""One configurable stand-in engine, and the service app built around it (no weights needed)."""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np

from service.core.engines.base import Engine

ESPRESSO = 967  # the class the fake engine's logits favour by default


class FakeEngine(Engine):
    """Lite0's output shapes without a network.

    Logits peak at ``top_class`` (or are random when ``random_outputs``), features are ones. Every batch
    is recorded in ``batches`` (the array as the engine received it). While ``gate`` is clear, batches
    wait for it (``hold=True`` starts with it clear); ``batch_running`` is set once a batch has begun.
    With ``fail`` set, or when ``fail_if(batch)`` is true, a batch raises ``RuntimeError(error)``. Like
    the real engines it takes uint8 NCHW pixels only (``TypeError`` otherwise).
    """

    backend, device, dtype, image_size = "fake", "cpu", "float32", 224

    def __init__(
        self,
        *,
        num_classes: int = 1000,
        num_features: int = 1280,
        top_class: int = ESPRESSO,
        random_outputs: bool = False,
        hold: bool = False,
        fail_if: Callable[[np.ndarray], bool] | None = None,
        error: str = "engine failed",
    ) -> None:
        self.num_classes = num_classes
        self.num_features = num_features
        self.top_class = top_class
        self.random_outputs = random_outputs
        self.fail = False
        self.fail_if = fail_if
        self.error = error
        self.batches: list[np.ndarray] = []
        self.gate = threading.Event()
        if not hold:
            self.gate.set()
        self.batch_running = threading.Event()

    def run(self, batch: np.ndarray, slot: int = 0) -> tuple[np.ndarray, np.ndarray]:
        batch = np.asarray(batch)
        if batch.dtype != np.uint8 or batch.ndim != 4:
            raise TypeError(f"expected a uint8 NCHW batch, got {batch.dtype} with shape {batch.shape}")
        self.batches.append(batch.copy())
        self.batch_running.set()
        assert self.gate.wait(30), "the test never opened the engine's gate"
        if self.fail or (self.fail_if is not None and self.fail_if(batch)):
            raise RuntimeError(self.error)
        n = len(batch)
        if self.random_outputs:
            rng = np.random.default_rng(n)
            features = rng.random((n, self.num_features), dtype=np.float32)
            return features, rng.normal(size=(n, self.num_classes)).astype(np.float32)
        logits = np.zeros((n, self.num_classes), dtype=np.float32)
        logits[:, self.top_class] = 10.0
        return np.ones((n, self.num_features), dtype=np.float32), logits


def app_with_engine(engine, *, labels: list[str] | None = None, **settings):
    """The HTTP app, in-process, around a stand-in ``engine``: Lite0's config and labels, no weights."""
    from model import get_efficientnet_config, imagenet_classes
    from service.core.loading import LoadedModel
    from service.core.settings import Settings
    from service.http.app import create_app

    model = LoadedModel(
        engine=engine,
        variant=get_efficientnet_config("efficientnet-lite0"),
        labels=labels if labels is not None else list(imagenet_classes()),
        num_features=1280,
        num_parameters=1,
        weights_source="random",
        weights_file=None,
        weights_sha256=None,
    )
    return create_app(Settings(**settings), model=model)
