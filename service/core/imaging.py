"""Image bytes -> resized, cropped uint8 CHW array, following the variant's own preprocessing config.

Runs in a worker thread (Pillow releases the GIL while decoding and resampling). The steps:

1. Open lazily with Pillow, restricted to JPEG, PNG, WebP, GIF, BMP and TIFF; anything else is
   "not a supported image" (400). Only the header has been read at this point.
2. Refuse images over ``max_pixels`` from the header size, before decoding a single pixel (413).
3. For JPEG, ``Image.draft`` lets libjpeg decode at 1/2, 1/4 or 1/8 scale, never below the size the
   resize step needs: much cheaper for large photos.
4. Decode the first frame (animations), apply the EXIF orientation, convert every mode to RGB.
   Transparent images are composited on white, what a viewer shows on a white page: dropping alpha
   would expose whatever colour transparent pixels happen to store (often black). 16-bit greyscale is
   scaled to 8 bits (v / 257), not clipped.
5. Resize the shorter side to ``resize_size`` and centre-crop ``input_size`` in one Pillow call (the
   model package's ``resize_and_crop``: the crop box is mapped back to source pixels), so an extreme
   aspect ratio such as 4000x3 never materialises a huge intermediate image.
6. Hand over the uint8 pixels, CHW. Each engine normalises (``(x / 255 - mean) / std``) itself: the torch
   engine on its device, the ONNX engines inside their graph (``model.export``'s ``uint8_input``), with the
   same float32 arithmetic as ``model.normalize``. A quarter of the bytes to stack and copy, and no
   per-pixel float work on the decode threads.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from typing import Protocol

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from model import pillow_resample, resize_and_crop, to_uint8_chw
from service.core.errors import ImageTooLarge, InvalidImage

SUPPORTED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
_WHITE = (255, 255, 255)

# Truncated files are errors, not grey-padded images.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class PreprocessSpec(Protocol):
    """What preprocessing needs from ``model.PreprocessConfig``."""

    @property
    def input_size(self) -> int: ...
    @property
    def resize_size(self) -> int: ...
    @property
    def interpolation(self) -> str: ...
    @property
    def mean(self) -> Sequence[float]: ...
    @property
    def std(self) -> Sequence[float]: ...


def decode_image(data: bytes, *, max_pixels: int, min_size: int | None = None) -> Image.Image:
    """Decode ``data`` into an RGB image with EXIF orientation applied.

    ``min_size``: the smallest shorter side the caller needs; JPEGs are then decoded at a reduced scale
    that still keeps both sides at least that long. Raises ``InvalidImage`` (400) for empty, unknown or
    undecodable content and ``ImageTooLarge`` (413) for images over ``max_pixels``.
    """
    if not data:
        raise InvalidImage("empty image")
    try:
        with warnings.catch_warnings():
            # Pillow's own decompression-bomb warning: our explicit limit below is the one that counts.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=list(SUPPORTED_FORMATS))
            width, height = image.size
            if width < 1 or height < 1:
                raise InvalidImage("image has no pixels")
            if width * height > max_pixels:
                raise ImageTooLarge(
                    f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}"
                )
            if image.format == "JPEG" and min_size:
                image.draft(image.mode, (min_size, min_size))
            image.seek(0)
            image.load()
            image = _apply_exif_orientation(image)
            return to_rgb(image)
    except (InvalidImage, ImageTooLarge):
        raise
    except Image.DecompressionBombError as exc:
        # Pillow's own hard limit (2 x Image.MAX_IMAGE_PIXELS), also checked from the header alone.
        raise ImageTooLarge(f"image has more pixels than the limit of {max_pixels}") from exc
    except UnidentifiedImageError as exc:
        raise InvalidImage(
            "not a supported image: expected JPEG, PNG, WebP, GIF, BMP or TIFF content"
        ) from exc
    except MemoryError as exc:
        raise ImageTooLarge("image too large to decode") from exc
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, struct.error, ... on bad data
        raise InvalidImage(f"cannot decode image ({type(exc).__name__})") from exc


def _apply_exif_orientation(image: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except Exception:
        # A corrupt EXIF block must not make an otherwise fine image unusable: keep it unrotated.
        return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB (see the module docstring for the choices)."""
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode in ("P", "L", "RGB") and "transparency" in image.info
    ):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, _WHITE)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if mode.startswith("I;16"):
        values = np.asarray(image).astype(np.float32)
        return _grey_to_rgb(values / 257.0)
    if mode == "I":
        values = np.asarray(image).astype(np.float32)
        # 32-bit integer images come from 16-bit sources (PNG, TIFF) in practice: scale those to 8 bits.
        if values.size and values.max() > 255:
            values = np.clip(values, 0, 65535) / 257.0
        return _grey_to_rgb(values)
    if mode == "F":
        values = np.asarray(image).astype(np.float32)
        if values.size and np.nanmax(values) <= 1.0:
            values = values * 255.0
        return _grey_to_rgb(np.nan_to_num(values))
    return image.convert("RGB")


def _grey_to_rgb(values: np.ndarray) -> Image.Image:
    grey = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


DRAFT_OVERSAMPLE = 2


class Preprocessor:
    """Bytes -> uint8 array of shape (3, input_size, input_size) for one variant's preprocessing (not normalised)."""

    def __init__(self, spec: PreprocessSpec, *, max_pixels: int) -> None:
        pillow_resample(spec.interpolation)  # ValueError for an interpolation Pillow lacks
        if spec.input_size > spec.resize_size:
            raise ValueError("input_size must not exceed resize_size")
        self.spec = spec
        self.max_pixels = max_pixels
        self.input_size = int(spec.input_size)
        self.resize_size = int(spec.resize_size)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (3, self.input_size, self.input_size)

    def __call__(self, data: bytes) -> np.ndarray:
        # JPEG draft decoding (scaling in the DCT) only down to twice the resize target: the final bicubic
        # resize then still has the detail it averages over. Drafting right down to the target changed
        # the top-1 class of grace_hopper.jpg (academic gown -> mortarboard); at 2x every test photo keeps
        # the full decode's top-1, and a large photo still skips most of its decoding work.
        return self.from_image(
            decode_image(data, max_pixels=self.max_pixels, min_size=DRAFT_OVERSAMPLE * self.resize_size)
        )

    def from_image(self, image: Image.Image) -> np.ndarray:
        if image.mode != "RGB":
            image = to_rgb(image)
        # The model package owns the reference resize/crop (and the normalisation the engines apply), so
        # the service and offline use of the model agree to the last bit.
        return to_uint8_chw(resize_and_crop(image, self.spec))


def describe(spec: PreprocessSpec) -> dict[str, object]:
    """The preprocessing as plain data (for /info)."""
    return {
        "input_size": int(spec.input_size),
        "resize_size": int(spec.resize_size),
        "crop_fraction": float(getattr(spec, "crop_fraction", spec.input_size / spec.resize_size)),
        "interpolation": str(spec.interpolation),
        "mean": [float(v) for v in spec.mean],
        "std": [float(v) for v in spec.std],
        "formats": list(SUPPORTED_FORMATS),
    }


__all__ = [
    "SUPPORTED_FORMATS",
    "PreprocessSpec",
    "Preprocessor",
    "decode_image",
    "describe",
    "to_rgb",
]
