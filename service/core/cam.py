"""Class activation maps: why the model said what it said, from every engine, in the core.

EfficientNet ends in global average pooling and one linear layer. For that head Grad-CAM equals the class
activation map (Selvaraju et al., arXiv 1610.02391, section 3.1): the gradient of class c's logit with
respect to the last activated feature map A is ``fc.weight[c] / (h * w)`` at every cell, so Grad-CAM's
channel weights are the classifier's row and its map is ``ReLU(sum_k fc.weight[c, k] * A_k)``. No backward
pass: any engine that hands over A (torch, onnxruntime, OpenVINO, int8) gives the map, for a few thousand
multiply-adds per class and image.

Where it is computed: in the engine's process, right after the engine's pass (``ServedModel``'s batch
function), from the batch's feature map and the classifier weights the loaded model carries. Only the
small h x w maps leave that process; the 1280 x h x w feature map never does, and a batch whose requests
ask for no map does not fetch it from the engine at all.

What a request asks (``CamWish``): the same classes for every image, or each image's own best ``top``.
Each map is ReLU'd and divided by its maximum (all zeros stays zeros), so values are in [0, 1]. Its grid
covers the crop of the original the network saw (``service.core.imaging.Crop``); ``overlay_png`` draws it
there, with Pillow alone.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from service.core.errors import BadRequest, NoClassifier
from service.core.imaging import Crop, decode_image
from service.core.outputs import NO_CLASSIFIER

# Classes one request may have explained per image: each is an h x w map in the answer (and, with several
# workers, on the wire back from the engine process).
MAX_CAM_CLASSES = 10


@dataclass(frozen=True)
class CamWish:
    """Which classes a request wants explained, for each of its images: ``classes`` (class indices, the
    same for every image), or when empty each image's ``top`` best classes by its own logits."""

    classes: tuple[int, ...] = ()
    top: int = 1

    def classes_for(self, logits: np.ndarray) -> list[int]:
        """The classes explained for an image with these ``logits``: the same rule wherever it is applied
        (the engine's process picks them, the door names them), best first for ``top`` (ties keep class
        order, as ``top_classes`` does)."""
        if self.classes:
            return list(self.classes)
        return [int(i) for i in np.argsort(-logits, kind="stable")[: self.top]]

    def to_wire(self) -> dict[str, Any]:
        return {"classes": list(self.classes), "top": self.top}

    @classmethod
    def from_wire(cls, data: dict[str, Any] | None) -> CamWish | None:
        if data is None:
            return None
        return cls(tuple(int(c) for c in data.get("classes", ())), int(data.get("top", 1)))


class Explained(NamedTuple):
    """One image's answer to a request with a ``CamWish``: the usual (features, logits), then a map per
    explained class (``maps``: k x h x w float32 in [0, 1]), those classes in the same order, and the crop
    of the original the grid covers (None for a request of preprocessed pixels)."""

    features: np.ndarray
    logits: np.ndarray
    maps: np.ndarray
    classes: list[int]
    crop: Crop | None


class HasClassifier:
    """What the checks below read of a model (a ``LoadedModel``)."""

    labels: list[str]
    num_classes: int


def check_wish(model: HasClassifier, wish: CamWish) -> None:
    """``NoClassifier`` (422) for a model without a classifier; ``BadRequest`` (400) for a class index out
    of range, or more classes than ``MAX_CAM_CLASSES``, naming it."""
    if model.num_classes == 0:
        raise NoClassifier(NO_CLASSIFIER)
    count = len(wish.classes) or wish.top
    if count < 1:
        raise BadRequest("no class to explain")
    if count > MAX_CAM_CLASSES:
        raise BadRequest(f"too many classes to explain ({count}); the limit is {MAX_CAM_CLASSES} per image")
    for index in wish.classes:
        if not 0 <= index < model.num_classes:
            raise BadRequest(f"class {index} is out of range: the model has classes 0 to {model.num_classes - 1}")


MAX_CLASS_NAME = 256  # longer than any label people write; an index of 4,300 digits would not even parse


def parse_classes(model: HasClassifier, values: Sequence[str]) -> tuple[int, ...]:
    """Classes as people name them (``class=`` of a request): an index, or a label of the model; in the
    order given, each once. ``BadRequest`` naming the value that is neither; ``NoClassifier`` for a model
    without a classifier. Range and count are ``check_wish``'s."""
    if model.num_classes == 0:
        raise NoClassifier(NO_CLASSIFIER)
    by_label: dict[str, int] = {}
    for index, label in enumerate(model.labels):
        by_label.setdefault(label.casefold(), index)
    chosen: list[int] = []
    for value in values:
        text = value.strip()
        if len(text) > MAX_CLASS_NAME:
            raise BadRequest(f"a class is named by an index or a label of at most {MAX_CLASS_NAME} characters")
        if text.lstrip("-").isdigit():
            index = int(text)
            if not 0 <= index < model.num_classes:
                raise BadRequest(f"class {text} is out of range: the model has classes 0 to {model.num_classes - 1}")
        elif text.casefold() in by_label:
            index = by_label[text.casefold()]
        else:
            raise BadRequest(f"unknown class '{value}': not a label of this model nor a class index "
                             f"(0 to {model.num_classes - 1})")
        if index not in chosen:
            chosen.append(index)
    return tuple(chosen)


def class_maps(feature_map: np.ndarray, weights: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """``ReLU(sum_k weights[c, k] * feature_map[k])`` for each class c of ``classes``, divided by its own
    maximum (a map that is zero everywhere stays zero): k x h x w float32 in [0, 1].

    ``feature_map``: one image's head activation (C x h x w, any strides); ``weights``: the classifier's
    (num_classes x C). The bias adds the same value to every cell and Grad-CAM leaves it out too."""
    channels, h, w = feature_map.shape
    rows = weights[np.asarray(classes, dtype=np.intp)].astype(np.float32, copy=False)
    maps = (rows @ np.asarray(feature_map, dtype=np.float32).reshape(channels, h * w)).reshape(len(classes), h, w)
    np.maximum(maps, 0.0, out=maps)
    peak = maps.max(axis=(1, 2), keepdims=True)
    np.divide(maps, peak, out=maps, where=peak > 0)
    return maps


# -- drawing a map over the photo (Pillow only) ------------------------------------------------------------------
def _palette() -> np.ndarray:
    """256 RGB colours from dark blue (0) through cyan, green and yellow to red (1): a jet-like scale."""
    stops = np.array([0.0, 0.125, 0.375, 0.625, 0.875, 1.0])
    colours = np.array([[0, 0, 128], [0, 0, 255], [0, 255, 255], [255, 255, 0], [255, 0, 0], [128, 0, 0]],
                       dtype=np.float64)
    x = np.linspace(0.0, 1.0, 256)
    return np.stack([np.interp(x, stops, colours[:, c]) for c in range(3)], axis=1).round().astype(np.uint8)


PALETTE = _palette()
OVERLAY_MAX_SIDE = 1024  # the longer side of a drawn overlay, in pixels (never larger than the photo)
HEAT_WEIGHT = 0.5  # the heat map's share of a pixel inside the crop


def overlay(image: Image.Image, grid: np.ndarray, crop: Crop, *, max_side: int = OVERLAY_MAX_SIDE) -> Image.Image:
    """``image`` (the oriented photo, at any scale: a reduced decode is fine) at most ``max_side`` pixels
    long, with ``grid`` (h x w in [0, 1]) drawn as a heat map over the crop the network saw, upsampled
    bilinearly to it; the part of the photo outside the crop is dimmed, and the crop is outlined."""
    image = image.convert("RGB")
    scale = min(1.0, max_side / max(image.size))
    size = (max(1, round(image.size[0] * scale)), max(1, round(image.size[1] * scale)))
    if size != image.size:
        image = image.resize(size, Image.Resampling.BILINEAR)
    # The crop in the drawn image's pixels.
    fx, fy = size[0] / crop.size[0], size[1] / crop.size[1]
    left, top, right, bottom = crop.box
    x0, y0 = max(0, round(left * fx)), max(0, round(top * fy))
    x1, y1 = min(size[0], max(x0 + 1, round(right * fx))), min(size[1], max(y0 + 1, round(bottom * fy)))
    pixels = np.asarray(image, dtype=np.float32)
    out = pixels * 0.45  # outside the crop: dimmed, never seen by the network
    heat = Image.fromarray(np.clip(np.asarray(grid, dtype=np.float32) * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    heat = np.asarray(heat.resize((x1 - x0, y1 - y0), Image.Resampling.BILINEAR))
    colours = PALETTE[heat].astype(np.float32)
    inside = pixels[y0:y1, x0:x1]
    out[y0:y1, x0:x1] = (1.0 - HEAT_WEIGHT) * inside + HEAT_WEIGHT * colours
    drawn = np.clip(out + 0.5, 0, 255).astype(np.uint8)
    line = max(1, round(max(size) / 400))
    for y in (slice(y0, min(y1, y0 + line)), slice(max(y0, y1 - line), y1)):
        drawn[y, x0:x1] = 255
    for x in (slice(x0, min(x1, x0 + line)), slice(max(x0, x1 - line), x1)):
        drawn[y0:y1, x] = 255
    return Image.fromarray(drawn, "RGB")


def overlay_png(data: bytes, grid: np.ndarray, crop: Crop, *, max_pixels: int,
                max_side: int = OVERLAY_MAX_SIDE) -> bytes:
    """The encoded photo ``data`` with ``grid`` drawn over its ``crop`` (``overlay``), as PNG bytes. The
    photo is decoded again here (a JPEG at a reduced scale, no smaller than the drawing needs)."""
    image = decode_image(data, max_pixels=max_pixels, min_size=max_side)
    buffer = io.BytesIO()
    overlay(image, grid, crop, max_side=max_side).save(buffer, format="PNG", compress_level=3)
    return buffer.getvalue()


__all__ = ["MAX_CAM_CLASSES", "CamWish", "Explained", "check_wish", "class_maps", "overlay", "overlay_png",
           "parse_classes"]
