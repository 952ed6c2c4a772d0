"""Evaluation preprocessing of a decoded RGB image, as each variant's :class:`PreprocessConfig` defines it.

Resize the shorter side to ``resize_size``, centre-crop ``input_size``, scale to 0..1 and normalise.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .config import PreprocessConfig

_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}


def pillow_resample(name: str) -> Image.Resampling:
    """The Pillow resampling filter for an interpolation name of :class:`PreprocessConfig`."""
    try:
        return _RESAMPLE[name]
    except KeyError:
        raise ValueError(f"unknown interpolation {name!r}; expected one of: {', '.join(_RESAMPLE)}") from None


def resize_and_crop(image: Image.Image, config: PreprocessConfig) -> Image.Image:
    """Shorter side to ``config.resize_size`` (aspect kept), then the central ``input_size`` square.

    Resizing and cropping happen in one Pillow call (``box`` selects the source region), so no
    intermediate full-size image is made.
    """
    if image.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {image.mode}")
    w, h = image.size
    scale = config.resize_size / min(w, h)
    size = config.input_size
    # The crop window in source pixels: the part of the image that maps onto the central square.
    crop_w, crop_h = min(w, size / scale), min(h, size / scale)
    left, top = (w - crop_w) / 2, (h - crop_h) / 2
    return image.resize((size, size), pillow_resample(config.interpolation),
                        box=(left, top, left + crop_w, top + crop_h))


def normalize(image: Image.Image, config: PreprocessConfig) -> np.ndarray:
    """An RGB image as float32 CHW, ``(x / 255 - mean) / std``."""
    array = np.asarray(image, dtype=np.float32)  # HWC, 0..255
    scale = np.asarray([1.0 / (255.0 * s) for s in config.std], dtype=np.float32)
    shift = np.asarray([m / s for m, s in zip(config.mean, config.std, strict=True)], dtype=np.float32)
    array = array * scale - shift
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def preprocess_image(image: Image.Image, config: PreprocessConfig) -> torch.Tensor:
    """A decoded RGB image as the (3, input_size, input_size) float32 tensor the network expects."""
    return torch.from_numpy(normalize(resize_and_crop(image, config), config))
