"""Evaluation preprocessing of a decoded RGB image, as each variant's :class:`PreprocessConfig` defines it:
the part that needs only Pillow and NumPy (a server's front-end processes import this and no torch).

Resize the shorter side to ``resize_size``, centre-crop ``input_size``, scale to 0..1 and normalise.
``to_uint8_chw`` stops before the normalisation (what a server sends to its engine: a quarter of the
bytes); ``Normalize`` is the same normalisation as a module, for a uint8 batch on any device or inside an
exported graph, with the same float32 arithmetic as ``normalize``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from .config import PreprocessConfig

if TYPE_CHECKING:
    pass

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
    intermediate full-size image is made. Two geometries (``config.pixel_aligned``):

    - ``False`` (this package's own and the TF ports'): the crop window is the exact central region of the
      source, fractional pixels included; it scales with the image, so a draft-decoded JPEG gets the same
      window as a full decode.
    - ``True`` (torchvision's and timm's ``Resize`` + ``CenterCrop``): the resized image's longer side is
      truncated to whole pixels and the crop offset rounded to whole pixels, as they do. The box mapped back
      to source pixels gives the same filter centres and image edges as their full resize followed by a crop,
      so the pixels equal theirs (to Pillow's rounding) at the cost of one resize of the crop only.
    """
    if image.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {image.mode}")
    size = config.input_size
    box = crop_box(*image.size, config)
    return image.resize((size, size), pillow_resample(config.interpolation), box=box)


def crop_box(width: int, height: int, config: PreprocessConfig) -> tuple[float, float, float, float]:
    """The window (left, top, right, bottom), in pixels of a ``width`` x ``height`` image, that
    :func:`resize_and_crop` turns into the ``input_size`` square: the region the network sees, and so the
    region a feature map's grid covers (cell (i, j) of an h x w grid is the (i, j)-th of h x w equal parts).
    One geometry for both: the crop itself and whoever draws on the original."""
    w, h = width, height
    size = config.input_size
    if config.pixel_aligned:
        short, long = min(w, h), max(w, h)
        new_short, new_long = config.resize_size, int(config.resize_size * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        crop_w, crop_h = min(size, new_w), min(size, new_h)
        left, top = int(round((new_w - crop_w) / 2.0)), int(round((new_h - crop_h) / 2.0))
        sx, sy = w / new_w, h / new_h
        return (left * sx, top * sy, (left + crop_w) * sx, (top + crop_h) * sy)
    scale = config.resize_size / min(w, h)
    # The crop window in source pixels: the part of the image that maps onto the central square.
    crop_w, crop_h = min(w, size / scale), min(h, size / scale)
    left, top = (w - crop_w) / 2, (h - crop_h) / 2
    return (left, top, left + crop_w, top + crop_h)


def _scale_and_shift(config: PreprocessConfig) -> tuple[np.ndarray, np.ndarray]:
    """``(x / 255 - mean) / std`` as ``x * scale - shift``, float32 per channel."""
    scale = np.asarray([1.0 / (255.0 * s) for s in config.std], dtype=np.float32)
    shift = np.asarray([m / s for m, s in zip(config.mean, config.std, strict=True)], dtype=np.float32)
    return scale, shift


def normalize(image: Image.Image, config: PreprocessConfig) -> np.ndarray:
    """An RGB image as float32 CHW, ``(x / 255 - mean) / std``."""
    array = np.asarray(image, dtype=np.float32)  # HWC, 0..255
    scale, shift = _scale_and_shift(config)
    array = array * scale - shift
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def to_uint8_chw(image: Image.Image) -> np.ndarray:
    """An RGB image as a contiguous uint8 CHW array (0..255), not normalised."""
    if image.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {image.mode}")
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1))
