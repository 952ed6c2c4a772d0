"""Inference engines and model loading.

An ``Engine`` turns one float32 NCHW batch into pooled features and logits, both from the same forward
pass, so /predict and /features share batches. ``TorchEngine`` is the PyTorch implementation; the
``EFFNET_BACKEND`` setting chooses the engine (``auto`` is torch until an onnxruntime engine exists).

``load_model`` does everything that can make a start fail (unknown variant, missing or bad weights,
absent GPU, bad labels file, an unsupported dtype on the device) and raises ``StartupError`` with one
clear sentence; the service never runs half-alive.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from service.errors import StartupError
from service.settings import Settings

log = logging.getLogger("service.engine")

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@runtime_checkable
class Engine(Protocol):
    """What the batcher needs from an inference backend."""

    backend: str
    device: str
    dtype: str

    def run(self, batch: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """float32 NCHW batch -> (pooled features [N, num_features], logits [N, num_classes]), float32."""
        ...


class TorchEngine:
    """PyTorch eager inference: BatchNorm folded into the convolutions, channels-last memory format.

    ``run`` is called from one dedicated thread only (the batcher's); it is not re-entrant.
    """

    backend = "torch"

    def __init__(
        self, net: torch.nn.Module, device: torch.device, dtype: torch.dtype, *, fuse: bool = True
    ) -> None:
        net = net.eval()
        if fuse:
            try:
                from model import fold_batchnorm

                net = fold_batchnorm(net)
            except ImportError:  # pragma: no cover - older model package
                pass
        self._torch_device = device
        self._torch_dtype = dtype
        self.net = net.to(device=device, dtype=dtype, memory_format=torch.channels_last).eval()
        self.device = str(device)
        self.dtype = str(dtype).removeprefix("torch.")

    def run(self, batch: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        with torch.inference_mode():
            if isinstance(batch, torch.Tensor):
                x = batch
            else:
                x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
            x = x.to(device=self._torch_device, dtype=self._torch_dtype, non_blocking=True)
            x = x.contiguous(memory_format=torch.channels_last)
            pooled, logits = self.net.forward_features_and_logits(x)
            return (
                pooled.float().cpu().numpy(),
                logits.float().cpu().numpy(),
            )


@dataclass(frozen=True)
class LoadedModel:
    """A ready engine plus the facts /info reports."""

    engine: Engine
    variant: Any  # model.VariantConfig
    labels: list[str]
    num_features: int
    num_parameters: int
    weights_source: str  # "package" | "file" | "random"
    weights_file: str | None
    weights_sha256: str | None

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def preprocess(self) -> Any:  # model.PreprocessConfig
        return self.variant.preprocess


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        build = "this PyTorch build has no CUDA" if torch.version.cuda is None else "no GPU is visible"
        raise StartupError(f"EFFNET_DEVICE={spec} but CUDA is not available ({build}); use cpu or auto")
    device = torch.device(spec)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise StartupError(f"EFFNET_DEVICE={spec} but only {torch.cuda.device_count()} GPU(s) are visible")
    return device


def resolve_backend(name: str) -> str:
    if name in ("auto", "torch"):
        return "torch"
    raise StartupError(f"EFFNET_BACKEND={name} is not available in this version; use torch or auto")


def load_labels(path: str | None, num_classes: int) -> list[str]:
    """Class names from a JSON list or a one-name-per-line text file; default: ImageNet's 1000 names."""
    if path is None:
        from model import imagenet_classes

        names = list(imagenet_classes())
        source = "the packaged ImageNet names"
    else:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise StartupError(f"cannot read EFFNET_LABELS file {path}: {exc}") from None
        source = path
        if text.lstrip().startswith("["):
            try:
                names = json.loads(text)
            except json.JSONDecodeError as exc:
                raise StartupError(f"EFFNET_LABELS file {path} is not valid JSON: {exc}") from None
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise StartupError(f"EFFNET_LABELS file {path} must hold a JSON list of strings")
        else:
            names = [line.strip() for line in text.splitlines() if line.strip()]
    if len(names) != num_classes:
        raise StartupError(f"{source} has {len(names)} class names but the model has {num_classes} classes")
    return names


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_model(settings: Settings) -> LoadedModel:
    """Build, load, move and probe the model; ``StartupError`` with one clear sentence if impossible."""
    from model import EfficientNet, WeightsError, default_weights_path, get_efficientnet_config

    try:
        variant = get_efficientnet_config(settings.model)
    except (ValueError, KeyError) as exc:
        raise StartupError(f"unknown EFFNET_MODEL {settings.model!r}: {exc}") from None
    backend = resolve_backend(settings.backend)
    device = resolve_device(settings.device)
    dtype = _DTYPES[settings.dtype]
    torch.set_num_threads(settings.effective_num_threads)

    weights_file: str | None = None
    weights_sha256: str | None = None
    if settings.random_weights:
        net = EfficientNet.from_name(variant.name)
        source = "random"
        log.warning(
            "serving %s with RANDOM weights (EFFNET_WEIGHTS=random): predictions are meaningless",
            variant.name,
        )
    else:
        path = settings.weights or default_weights_path(variant.name)
        if path is None:
            raise StartupError(
                f"no weights for {variant.name}: set EFFNET_WEIGHTS to a checkpoint file "
                "(or EFFNET_WEIGHTS=random to serve random weights on purpose)"
            )
        source = "file" if settings.weights else "package"
        try:
            net = EfficientNet.from_pretrained(variant.name, path)
        except FileNotFoundError:
            raise StartupError(f"weights file not found: {path}") from None
        except WeightsError as exc:
            raise StartupError(f"bad weights for {variant.name}: {exc}") from None
        except Exception as exc:  # a reader error the model package did not classify
            raise StartupError(
                f"bad weights for {variant.name}: cannot load {path} "
                f"({type(exc).__name__}: {_first_line(exc)})"
            ) from None
        weights_file = os.path.basename(path)
        weights_sha256 = _sha256(path)

    num_parameters = sum(p.numel() for p in net.parameters())
    num_features = int(net.num_features)
    labels = load_labels(settings.labels, variant.global_config.num_classes)

    assert backend == "torch"
    try:
        engine = TorchEngine(net, device, dtype)
        size = variant.preprocess.input_size
        features, logits = engine.run(np.zeros((1, 3, size, size), dtype=np.float32))
    except StartupError:
        raise
    except Exception as exc:
        raise StartupError(
            f"cannot run {variant.name} on {device} in {settings.dtype}: {_first_line(exc)}"
        ) from None
    if features.shape != (1, num_features) or logits.shape != (1, len(labels)):
        raise StartupError(
            f"engine returned shapes {features.shape}, {logits.shape}; expected "
            f"(1, {num_features}), (1, {len(labels)})"
        )
    return LoadedModel(
        engine=engine,
        variant=variant,
        labels=labels,
        num_features=num_features,
        num_parameters=num_parameters,
        weights_source=source,
        weights_file=weights_file,
        weights_sha256=weights_sha256,
    )


def variant_config_dict(variant: Any) -> dict[str, Any]:
    """The variant's global configuration as plain data (for /info)."""
    config = getattr(variant, "global_config", None)
    if config is None or not dataclasses.is_dataclass(config):
        return {}
    return {k: v for k, v in dataclasses.asdict(config).items() if isinstance(v, (int, float, str, bool))}


__all__ = [
    "Engine",
    "LoadedModel",
    "TorchEngine",
    "load_labels",
    "load_model",
    "resolve_backend",
    "resolve_device",
    "variant_config_dict",
]
