"""What a served model is, as plain data: ``LoadedModel`` (an engine and the facts ``/info`` reports) and
what of it crosses from the engine process to a front-end worker.

Nothing here imports torch or an engine: a front-end worker (``EFFNET_WORKERS`` > 1) holds the same
``LoadedModel`` as the engine process, with ``EngineFacts`` (what the engine is: backend, device, dtype)
in place of the engine itself, so every door reads a model the same way in either process.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from model.config import BlockConfig, GlobalConfig, PreprocessConfig, VariantConfig
from service.core.settings import ModelSettings, ModelSpec

if TYPE_CHECKING:
    from service.core.engines.base import Engine


@dataclass
class Int8Info:
    """How the served int8 model was obtained (reported by /info)."""

    source: str  # "file" (EFFNET_INT8_MODEL) or "calibrated" (EFFNET_CALIBRATION_DIR)
    recipe: str | None
    calibration_count: int | None
    calibration_sha256: str | None
    held_out_agreement: float | None
    cache_hit: bool | None
    cache_file: str | None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class EngineFacts:
    """What an engine is, without the engine: a front-end worker's view of the engine process's."""

    backend: str
    device: str
    dtype: str


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to serve: its engine, the facts /info reports, and the spec it was loaded from, with
    its settings resolved (``settings``: what every later step reads; nothing resolves them again)."""

    engine: Engine | EngineFacts
    variant: VariantConfig  # its preprocess is the one served (the source's, with the settings' overrides)
    labels: list[str]  # empty: the checkpoint has no classifier (features only)
    num_features: int
    num_parameters: int
    weights_source: str  # "package" | "file" | "random"
    weights_file: str | None
    weights_sha256: str | None
    quantization: Int8Info | None = None  # how the int8 model was obtained (EFFNET_DTYPE=int8 only)
    source_format: str = "efficientnet_pytorch"  # the checkpoint's library (model.sources.SOURCE_FORMATS)
    weights_container: str | None = None  # the key the weights were under in the file, if any
    labels_source: str = "imagenet"  # "imagenet" | "file" | "generic" | "none"
    spec: ModelSpec = dataclasses.field(default_factory=lambda: ModelSpec(None, "built in code", ModelSettings()))
    # The classifier's weights (num_classes x num_features, float32): class activation maps are made of them
    # and the engine's feature map, where the engine runs. Not sent to front-end workers (None there).
    classifier: Any = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def name(self) -> str:
        """What requests call it: the spec's name (a repository's folder), else the variant's."""
        return self.spec.name or self.variant.name

    @property
    def settings(self) -> ModelSettings:
        """The model's settings, resolved at load (a model built in code resolves its spec's on first use)."""
        settings = self.spec.settings
        return settings if settings.is_resolved else settings.resolved()

    def describe(self) -> str:
        """One line for the logs: variant, head, engine, device and dtype."""
        engine = self.engine
        head = f"{self.num_classes} classes" if self.has_classifier else "features only"
        return f"{self.variant.name}, {head}, {engine.backend} on {engine.device} ({engine.dtype})"

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def has_classifier(self) -> bool:
        return bool(self.labels)

    @property
    def preprocess(self) -> PreprocessConfig:
        return self.variant.preprocess

    @property
    def feature_grid(self) -> tuple[int, int]:
        """The (h, w) of the head's feature map, hence of a class activation map: the input size over the
        network's total stride of 32, rounded up ("SAME" and symmetric padding alike)."""
        side = -(-int(self.preprocess.input_size) // 32)
        return side, side


def variant_config_dict(variant: VariantConfig) -> dict[str, Any]:
    """The variant's global configuration as plain data (for /info)."""
    config = dataclasses.asdict(variant.global_config)
    return {k: v for k, v in config.items() if isinstance(v, (int, float, str, bool))}


# -- across the process boundary ---------------------------------------------------------------------------------
def describe_for_wire(model: LoadedModel) -> dict[str, Any]:
    """A loaded model's facts and settings as plain JSON-able data (``loaded_from_wire`` reads them)."""
    engine = model.engine
    return {
        "spec": {"name": model.spec.name, "source": model.spec.source,
                 "settings": model.settings.model_dump(mode="json")},
        "engine": {"backend": engine.backend, "device": str(engine.device), "dtype": str(engine.dtype)},
        "variant": dataclasses.asdict(model.variant),
        "labels": list(model.labels),
        "num_features": model.num_features,
        "num_parameters": model.num_parameters,
        "weights_source": model.weights_source,
        "weights_file": model.weights_file,
        "weights_sha256": model.weights_sha256,
        "quantization": model.quantization.as_dict() if model.quantization else None,
        "source_format": model.source_format,
        "weights_container": model.weights_container,
        "labels_source": model.labels_source,
    }


def loaded_from_wire(data: dict[str, Any]) -> LoadedModel:
    """The ``LoadedModel`` a worker holds for a model of the engine process (``describe_for_wire``)."""
    variant = data["variant"]
    config = VariantConfig(
        name=variant["name"],
        global_config=GlobalConfig(**variant["global_config"]),
        blocks=tuple(BlockConfig(**block) for block in variant["blocks"]),
        preprocess=PreprocessConfig(**{k: tuple(v) if isinstance(v, list) else v
                                       for k, v in variant["preprocess"].items()}),
    )
    spec = data["spec"]
    settings = ModelSettings.model_construct(**spec["settings"])
    object.__setattr__(settings, "_resolved", True)  # resolved by the engine process, at its load
    quantization = data["quantization"]
    return LoadedModel(
        engine=EngineFacts(**data["engine"]),
        variant=config,
        labels=list(data["labels"]),
        num_features=int(data["num_features"]),
        num_parameters=int(data["num_parameters"]),
        weights_source=data["weights_source"],
        weights_file=data["weights_file"],
        weights_sha256=data["weights_sha256"],
        quantization=Int8Info(**quantization) if quantization else None,
        source_format=data["source_format"],
        weights_container=data["weights_container"],
        labels_source=data["labels_source"],
        spec=ModelSpec(spec["name"], spec["source"], settings),
    )


__all__ = ["EngineFacts", "Int8Info", "LoadedModel", "describe_for_wire", "loaded_from_wire", "variant_config_dict"]
