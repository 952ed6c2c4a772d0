"""Evaluation preprocessing of a decoded RGB image, as each variant's :class:`PreprocessConfig` defines it.

Resize the shorter side to ``resize_size``, centre-crop ``input_size``, scale to 0..1 and normalise.
``to_uint8_chw`` stops before the normalisation (what a server sends to its engine: a quarter of the
bytes); ``Normalize`` is the same normalisation as a module, for a uint8 batch on any device or inside an
exported graph, with the same float32 arithmetic as ``normalize``. The Pillow and NumPy half lives in
:mod:`model.imageops` (no torch) and is re-exported here.
"""

from __future__ import annotations

import torch
from PIL import Image
from torch import nn

from .config import PreprocessConfig
from .imageops import _scale_and_shift, normalize, pillow_resample, resize_and_crop, to_uint8_chw

__all__ = ["Normalize", "normalize", "pillow_resample", "preprocess_image", "resize_and_crop", "to_uint8_chw"]


class Normalize(nn.Module):
    """uint8 (or float 0..255) NCHW batch -> float32 ``(x / 255 - mean) / std``, as :func:`normalize` computes.

    The constants are float32 buffers, so the module moves with ``.to(device)`` (move it only: cast to a
    lower precision, the constants would lose digits). It exports to ONNX as Cast, Mul and Sub. The result
    is float32: cast it afterwards for a float16/bfloat16 network.
    """

    def __init__(self, config: PreprocessConfig) -> None:
        super().__init__()
        scale, shift = _scale_and_shift(config)
        self.register_buffer("scale", torch.from_numpy(scale).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", torch.from_numpy(shift).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.float32) * self.scale - self.shift


def preprocess_image(image: Image.Image, config: PreprocessConfig) -> torch.Tensor:
    """A decoded RGB image as the (3, input_size, input_size) float32 tensor the network expects."""
    return torch.from_numpy(normalize(resize_and_crop(image, config), config))
