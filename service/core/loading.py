"""Start-up loading: settings -> a ready engine plus the facts ``/info`` reports.

``EFFNET_BACKEND`` chooses the engine (see ``service.core.engines``); ``auto`` is onnxruntime on CPU
when it is installed (2-3x faster there, see docs/benchmarks.md) and torch on a GPU.

``load_model`` does everything that can make a start fail (unknown variant, missing or bad weights,
absent GPU, bad labels file, an unsupported dtype on the device) and raises ``StartupError`` with one
clear sentence; the service never runs half-alive.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model import (
    EfficientNet,
    PreprocessConfig,
    WeightsError,
    default_weights_path,
    imagenet_classes,
)
from model.export import ExportError
from model.sources import load_source_checkpoint, resolve_model_name, source_preprocess
from service.core.engines import Engine, build_engine
from service.core.engines.int8 import Int8Engine
from service.core.errors import ConfigurationError, StartupError
from service.core.imaging import Preprocessor
from service.core.models import Int8Info, LoadedModel, variant_config_dict
from service.core.quantized import int8_engine
from service.core.settings import ModelSettings, ModelSpec, ServerSettings

log = logging.getLogger("service.core.loading")

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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


def _installed(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


# What each optional backend needs installed, and how to get it.
_BACKEND_MODULES = {"onnxruntime": ("onnxruntime", "pip install onnx onnxruntime"),
                    "openvino": ("openvino", "pip install 'effnet-serve[openvino]'")}


def resolve_backend(name: str, device: torch.device, dtype: str = "float32") -> str:
    """The engine to build: ``auto`` is onnxruntime for float32 on CPU when installed, else torch."""
    if name == "null":
        log.warning("EFFNET_BACKEND=null: answering zeros without computing (for measuring the front-ends; "
                    "no answer is about an image)")
        return name
    if dtype == "int8":
        return _resolve_int8_backend(name, device)
    if name == "openvino" and dtype == "bfloat16" and device.type == "cpu" and _installed("openvino"):
        return name  # bf16 on CPU through OpenVINO; the engine refuses a CPU without bf16
    if name == "auto":
        if device.type == "cpu" and dtype == "float32" and _installed("onnxruntime"):
            return "onnxruntime"
        return "torch"
    if name in _BACKEND_MODULES:
        module, how = _BACKEND_MODULES[name]
        if not _installed(module):
            raise StartupError(f"EFFNET_BACKEND={name} but {module} is not installed ({how}), or use torch or auto")
        if dtype != "float32":
            raise StartupError(f"EFFNET_BACKEND={name} serves float32 only, not {dtype}; "
                               "use EFFNET_BACKEND=torch for float16/bfloat16")
    return name


def _resolve_int8_backend(name: str, device: torch.device) -> str:
    if device.type != "cpu":
        raise StartupError(f"EFFNET_DTYPE=int8 runs on cpu (onnxruntime or openvino), not {device}; "
                           "use float16 or bfloat16 on a GPU")
    if name in ("auto", "onnxruntime"):
        name = "onnxruntime"
    elif name != "openvino":
        raise StartupError(f"EFFNET_DTYPE=int8 runs with EFFNET_BACKEND=onnxruntime or openvino, not {name}")
    module, how = _BACKEND_MODULES[name]
    if not _installed(module):
        raise StartupError(f"EFFNET_DTYPE=int8 with {name} needs {module} installed ({how})")
    return name


def load_labels(path: str | None, num_classes: int) -> list[str]:
    """Class names from a JSON list or a one-name-per-line text file, exactly ``num_classes`` of them.

    Without a file: ImageNet's 1000 names for a 1000-class head, else ``class_0 .. class_{N-1}`` (never
    ImageNet names for another head); none for a model without a classifier.
    """
    return _labels(path, num_classes)[0]


def _labels(path: str | None, num_classes: int) -> tuple[list[str], str]:
    if path is None:
        if num_classes == 0:
            return [], "none"
        if num_classes == 1000:
            return list(imagenet_classes()), "imagenet"
        return [f"class_{i}" for i in range(num_classes)], "generic"
    if num_classes == 0:
        raise StartupError(f"EFFNET_LABELS is set ({path}) but the checkpoint has no classifier: it serves "
                           "features only; unset EFFNET_LABELS or use a checkpoint with its classifier")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise StartupError(f"cannot read EFFNET_LABELS file {path}: {exc}") from None
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
        raise StartupError(f"{path} has {len(names)} class names but the checkpoint's classifier has "
                           f"{num_classes} classes")
    return names, "file"


def served_preprocess(base: PreprocessConfig, settings: ModelSettings) -> PreprocessConfig:
    """The source's preprocessing with the settings' overrides (a model fine-tuned at another size or
    normalisation). A new input size keeps the source's crop fraction unless a resize is given."""
    changes: dict[str, Any] = {}
    if settings.input_size is not None:
        changes["input_size"] = settings.input_size
        changes["resize"] = None if settings.resize_size is None else settings.resize_size
        changes["crop_fraction"] = base.input_size / base.resize_size
    if settings.resize_size is not None:
        changes["resize"] = settings.resize_size
    if settings.crop_fraction is not None:
        changes["crop_fraction"] = settings.crop_fraction
        changes["resize"] = None
    if settings.interpolation is not None:
        changes["interpolation"] = settings.interpolation
    if settings.mean is not None:
        changes["mean"] = tuple(float(v) for v in settings.mean.split(","))
    if settings.std is not None:
        changes["std"] = tuple(float(v) for v in settings.std.split(","))
    if not changes:
        return base
    if "resize" in changes and changes["resize"] is not None:
        size = changes.get("input_size", base.input_size)
        changes["crop_fraction"] = min(1.0, size / changes["resize"])
    try:
        return dataclasses.replace(base, **changes)
    except ValueError as exc:
        raise StartupError(f"invalid preprocessing settings: {exc}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_model(spec: ModelSpec | ModelSettings) -> LoadedModel:
    """Build, load, move and probe the model; ``StartupError`` with one clear sentence if impossible.

    ``spec``: what to load (a bare ``ModelSettings`` is the model of those settings, named after its
    variant). Its settings are resolved here, once; the loaded model carries them."""
    if isinstance(spec, ModelSettings):
        spec = ModelSpec(None, "EFFNET_* settings", spec)
    try:
        settings = spec.settings.resolved()
    except ValueError as exc:
        raise ConfigurationError(f"invalid configuration: {exc}") from None
    spec = dataclasses.replace(spec, settings=settings)
    log.info("%ssettings resolved: %s", f"model '{spec.name}': " if spec.name else "", settings.describe_resolved())
    try:
        name = resolve_model_name(settings.model)
    except ValueError as exc:
        raise StartupError(f"unknown EFFNET_MODEL {settings.model!r}: {exc}") from None
    device = resolve_device(settings.device)
    backend = resolve_backend(settings.backend, device, settings.effective_dtype)
    # int8 is not a torch dtype: see service.core.quantized. ``auto`` is resolved by the settings.
    dtype = _DTYPES.get(settings.effective_dtype, torch.float32)
    torch.set_num_threads(settings.effective_num_threads)

    weights_file: str | None = None
    weights_sha256: str | None = None
    container: str | None = None
    if settings.random_weights:
        source_format = name.source_format or "efficientnet_pytorch"
        net = EfficientNet.from_name(name.variant)
        net.variant = dataclasses.replace(net.variant, preprocess=source_preprocess(source_format, name.variant))
        source = "random"
        log.warning(
            "serving %s with RANDOM weights (EFFNET_WEIGHTS=random): predictions are meaningless",
            name.variant,
        )
    else:
        path = settings.weights or default_weights_path(name.variant)
        if path is None:
            raise StartupError(
                f"no weights for {name.variant}: set EFFNET_WEIGHTS to a checkpoint file "
                "(or EFFNET_WEIGHTS=random to serve random weights on purpose)"
            )
        source = "file" if settings.weights else "package"
        try:
            checkpoint = load_source_checkpoint(path, settings.model, settings.weights_format)
        except FileNotFoundError:
            raise StartupError(f"weights file not found: {path}") from None
        except WeightsError as exc:
            raise StartupError(f"bad weights for {name.variant}: {exc}") from None
        except Exception as exc:  # a reader error the model package did not classify
            raise StartupError(
                f"bad weights for {name.variant}: cannot load {path} "
                f"({type(exc).__name__}: {_first_line(exc)})"
            ) from None
        net, source_format, container = checkpoint.net, checkpoint.source_format, checkpoint.container
        weights_file = os.path.basename(path)
        weights_sha256 = _sha256(path)
        log.info("weights %s: %s checkpoint%s, %s", weights_file, source_format,
                 f" (under '{container}')" if container else "",
                 f"{checkpoint.num_classes} classes" if checkpoint.num_classes else "no classifier (features only)")

    net.variant = dataclasses.replace(net.variant, preprocess=served_preprocess(net.variant.preprocess, settings))
    variant = net.variant
    num_parameters = sum(p.numel() for p in net.parameters())
    num_features = int(net.num_features)
    num_classes = int(net._fc.out_features) if net.include_top else 0
    labels, labels_source = _labels(settings.labels, num_classes)
    if labels_source == "generic":
        log.warning("the checkpoint's classifier has %d classes and EFFNET_LABELS is not set: answering with "
                    "class_0 .. class_%d; set EFFNET_LABELS to a file of %d class names", num_classes,
                    num_classes - 1, num_classes)
    elif labels_source == "none":
        log.warning("the checkpoint has no classifier: serving features only "
                    "(/predict and the logits output answer 422 no_classifier)")

    size = variant.preprocess.input_size
    try:
        quantization = None
        if settings.effective_dtype == "int8" and backend != "null":
            engine, quantization = _int8_engine(settings, backend, net, variant, weights_sha256)
        else:
            engine = build_engine(backend, net, device, dtype, num_threads=settings.effective_num_threads,
                                  image_size=size, cuda_graphs=settings.cuda_graphs)
        # One probe pass with the feature map too: class activation maps need its shape to be the grid.
        features, logits, feature_map = engine.run(np.zeros((1, 3, size, size), dtype=np.uint8), feature_map=True)
    except StartupError:
        raise
    except Exception as exc:
        remedy = ""
        if isinstance(exc, ExportError):  # refused, never swapped for another engine: say what would serve
            also = " and EFFNET_DTYPE=float32" if settings.effective_dtype == "int8" else ""
            remedy = f"; serve it with EFFNET_BACKEND=torch{also}, or report the model"
        raise StartupError(
            f"cannot run {variant.name} on {device} in {settings.effective_dtype}: {_first_line(exc)}{remedy}"
        ) from None
    grid = -(-size // 32)
    if (features.shape != (1, num_features) or logits.shape != (1, len(labels))
            or feature_map.shape != (1, num_features, grid, grid)):
        raise StartupError(
            f"engine returned shapes {features.shape}, {logits.shape}, {feature_map.shape}; expected "
            f"(1, {num_features}), (1, {len(labels)}), (1, {num_features}, {grid}, {grid})"
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
        quantization=quantization,
        source_format=source_format,
        weights_container=container,
        labels_source=labels_source,
        spec=spec,
        classifier=net._fc.weight.detach().float().numpy().copy() if net.include_top else None,
    )


def _int8_engine(settings: ModelSettings, backend: str, net: EfficientNet, variant: Any,
                 weights_sha256: str | None) -> tuple[Engine, Int8Info]:
    """The int8 engine from EFFNET_INT8_MODEL, the cache, or a quantisation on EFFNET_CALIBRATION_DIR."""
    size = variant.preprocess.input_size
    if variant.global_config.activation == "swish":
        # Measured (docs/benchmarks.md): B0 int8 ran 0.8-1.2x float32 with onnxruntime: the Sigmoid, Mul
        # and ReduceMean of Swish and squeeze-excitation around every convolution eat what int8 saves.
        log.warning("int8 barely speeds up %s (Swish and squeeze-excitation are not int8 work); "
                    "EFFNET_DTYPE=bfloat16 with EFFNET_BACKEND=openvino is faster where the CPU has bf16",
                    variant.name)
    # Calibration photos go through the service's own preprocessing (draft decoding included).
    preprocessor = Preprocessor(variant.preprocess, max_pixels=ServerSettings.model_fields["max_image_pixels"].default)
    if weights_sha256 is not None:
        # The int8 cache is keyed by the weights' digest: fold in what else changes the quantised graph
        # (padding and epsilon of the checkpoint's source, the normalisation inside the graph), so a
        # changed EFFNET_WEIGHTS_FORMAT / EFFNET_MEAN / EFFNET_STD never serves a stale cache entry.
        pre = variant.preprocess
        served = json.dumps([weights_sha256, variant.global_config.padding, variant.global_config.batch_norm_epsilon,
                             list(pre.mean), list(pre.std)])
        weights_sha256 = hashlib.sha256(served.encode()).hexdigest()
    return int8_engine(
        net=net, variant=variant.name, image_size=size, weights_sha256=weights_sha256,
        calibration_dir=settings.calibration_dir, int8_model=settings.int8_model, cache_dir=settings.cache_dir,
        read=preprocessor,
        build=lambda model: Int8Engine(model, backend, settings.effective_num_threads, image_size=size),
    )


__all__ = [
    "LoadedModel",
    "load_labels",
    "load_model",
    "served_preprocess",
    "resolve_backend",
    "resolve_device",
    "variant_config_dict",
]
