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

    def run(self, batch: np.ndarray, slot: int = 0, *, feature_map: bool = False) -> tuple[np.ndarray, ...]:
        outputs = self._run(batch)
        if feature_map:  # a map lit in its top-left cell only (with fake_model's classifier of ones)
            maps = np.zeros((len(batch), self.num_features, 7, 7), dtype=np.float32)
            maps[:, :, 0, 0] = 1.0
            outputs += (maps,)
        return outputs

    def _run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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


# -- a coloured stand-in: which images share a batch, and which fail it, decided by colour ----------------
SECRET = "engine exploded at /srv/secret/model.onnx"  # an engine error that must never reach a client


def colours(batch: np.ndarray) -> list[str]:
    """Each image of a batch as "red" (channel 0 brighter than channel 2) or "blue"."""
    return ["red" if item[0].mean() > item[2].mean() else "blue" for item in batch]


def gated_engine() -> FakeEngine:
    """Holds its first batch until ``gate`` opens; raises (``SECRET``) for any batch holding a red image."""
    return FakeEngine(hold=True, fail_if=lambda batch: "red" in colours(batch), error=SECRET)


def _coloured(colour: tuple[int, int, int]) -> bytes:
    from tests.helpers.images import solid_png

    return solid_png(colour)


RED, BLUE = _coloured((255, 0, 0)), _coloured((0, 0, 255))


def split_settings(**values):
    """Settings given as one set of keyword arguments (as the environment gives them), as the two types:
    (ServerSettings, ModelSettings)."""
    from service.core.settings import ModelSettings, ServerSettings

    unknown = set(values) - set(ServerSettings.model_fields) - set(ModelSettings.model_fields)
    assert not unknown, f"no such setting: {sorted(unknown)}"
    server = ServerSettings(**{k: v for k, v in values.items() if k in ServerSettings.model_fields})
    model = ModelSettings(**{k: v for k, v in values.items() if k in ModelSettings.model_fields})
    return server, model


def fake_model(engine, *, labels: list[str] | None = None, name: str | None = None,
               variant: str = "efficientnet-lite0", num_parameters: int = 1, **settings):
    """A ``LoadedModel`` around a stand-in ``engine``: the variant's config and ImageNet's labels (or
    ``labels``), no weights; ``name``: its served name (default: the variant's); ``settings``: its
    ``ModelSettings``."""
    from model import get_efficientnet_config, imagenet_classes
    from service.core.loading import LoadedModel
    from service.core.settings import ModelSettings, ModelSpec

    config = get_efficientnet_config(variant)
    return LoadedModel(
        engine=engine,
        variant=config,
        labels=labels if labels is not None else list(imagenet_classes()),
        num_features=getattr(engine, "num_features", 1280),
        num_parameters=num_parameters,
        weights_source="random",
        weights_file=None,
        weights_sha256=None,
        spec=ModelSpec(name, "a test's stand-in", ModelSettings(model=variant, **settings)),
        classifier=np.ones((len(labels) if labels is not None else 1000, getattr(engine, "num_features", 1280)),
                           dtype=np.float32),
    )


def app_with_engine(engine, *, labels: list[str] | None = None, **settings):
    """The HTTP app, in-process, around a stand-in ``engine``: Lite0's config and labels, no weights;
    ``settings``: server and model settings together, as the environment would give them."""
    from service.core.registry import Startup
    from service.server.app import create_app

    server, model_settings = split_settings(**settings)
    values = model_settings.model_dump(include=model_settings.model_fields_set)
    model = fake_model(engine, labels=labels, variant=values.pop("model", "efficientnet-lite0"), **values)
    return create_app(server, startup=Startup(None, [model]))


def app_from_settings(**settings):
    """The HTTP app with the real model these settings (server and model together, as the environment
    gives them) describe, loaded now as ``efficientnet-serve`` loads it before opening its port."""
    from service.core.registry import load_startup
    from service.server.app import create_app

    server, model_settings = split_settings(**settings)
    return create_app(server, startup=load_startup(server, model_settings))
