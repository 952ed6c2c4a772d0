"""Image bytes -> resized, cropped uint8 CHW array, following the variant's own preprocessing config.

Runs in a worker thread (Pillow releases the GIL while decoding and resampling). The steps:

1. Open lazily with Pillow, restricted to the formats of ``IMAGE_FORMATS`` (JPEG, PNG, WebP, GIF, BMP,
   TIFF, AVIF and HEIC/HEIF), recognised by their content, never by a name or a declared type; anything
   else is "not a supported image" (400). Only the header has been read at this point.
2. Refuse images over ``max_pixels`` from the header size, before decoding a single pixel (413). For the
   HEIF family (HEIC and AVIF) the sizes every image item declares (``ispe``) are checked first: the size
   Pillow reports is the one after the clean-aperture crop, and a huge grid cropped to a small ``clap``
   would otherwise be decoded in full.
3. For JPEG, ``Image.draft`` lets libjpeg decode at 1/2, 1/4 or 1/8 scale, never below the size the
   resize step needs: much cheaper for large photos. HEVC (libheif) and AV1 (libavif) have no such
   reduced decode: a 48 MP HEIC or AVIF is decoded at full size (still only after the checks above).
4. Decode the first frame (animations; the primary image of a HEIF file), apply the orientation once,
   convert every mode to RGB. The orientation of a HEIF file is its ``irot``/``imir`` transform, which
   libheif applies while decoding; pillow-heif then resets the EXIF orientation to 1, so the iPhone's
   EXIF orientation 6 beside an ``irot`` is not applied a second time. Pillow's AVIF decoder does not
   apply ``irot``/``imir``; it reports them as the EXIF orientation, applied here like a JPEG's. 10- and
   12-bit HEIF/AVIF are reduced to 8 bits by their decoders.
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
import struct
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError, features

from model.imageops import crop_box, pillow_resample, resize_and_crop, to_uint8_chw
from service.core.errors import ImageTooLarge, InvalidImage


@dataclass(frozen=True)
class ImageFormat:
    """One accepted image format: what Pillow calls it, what people call it, the raw-body media types and
    the file extensions that announce it. The one list the HTTP uploads, /info and the web page use."""

    pillow: str
    label: str
    media_types: tuple[str, ...]
    extensions: tuple[str, ...]


# HEIC/HEIF through pillow-heif's opener (libheif with libde265); AVIF through Pillow's own plugin (libavif).
# Their thumbnails, depth maps and auxiliary images are never used, so pillow-heif does not collect them.
try:
    import pillow_heif
except ImportError:  # a dependency of the package; only a bare environment (a GPU box with wheels carried) lacks it
    pillow_heif = None
else:
    pillow_heif.register_heif_opener(thumbnails=False, depth_images=False, aux_images=False)

_ALL_FORMATS = (
    ImageFormat("JPEG", "JPEG", ("image/jpeg", "image/jpg", "image/pjpeg"), (".jpg", ".jpeg", ".jpe", ".jfif")),
    ImageFormat("PNG", "PNG", ("image/png",), (".png", ".apng")),
    ImageFormat("WEBP", "WebP", ("image/webp",), (".webp",)),
    ImageFormat("GIF", "GIF", ("image/gif",), (".gif",)),
    ImageFormat("BMP", "BMP", ("image/bmp", "image/x-ms-bmp", "image/x-bmp"), (".bmp", ".dib")),
    ImageFormat("TIFF", "TIFF", ("image/tiff",), (".tif", ".tiff")),
    # AVIF before HEIF: both claim files whose major brand is the generic "mif1"; Pillow's AVIF plugin
    # refuses HEVC content at open (the next plugin then gets it), while pillow-heif's libheif would accept
    # an AV1 file and only fail when decoding it (it is built without an AV1 decoder).
    ImageFormat("AVIF", "AVIF", ("image/avif",), (".avif",)),
    ImageFormat(
        "HEIF",
        "HEIC/HEIF",
        ("image/heic", "image/heif", "image/heic-sequence", "image/heif-sequence"),
        (".heic", ".heif", ".hif"),
    ),
)
# Only what this installation really decodes (a Pillow built without libavif has no AVIF): /info says so.
_AVAILABLE = {"AVIF": features.check("avif"), "HEIF": pillow_heif is not None}
IMAGE_FORMATS: tuple[ImageFormat, ...] = tuple(f for f in _ALL_FORMATS if _AVAILABLE.get(f.pillow, True))
SUPPORTED_FORMATS: tuple[str, ...] = tuple(f.pillow for f in IMAGE_FORMATS)
ACCEPTED_MEDIA_TYPES: tuple[str, ...] = tuple(m for f in IMAGE_FORMATS for m in f.media_types)
ACCEPTED_EXTENSIONS: tuple[str, ...] = tuple(e for f in IMAGE_FORMATS for e in f.extensions)


def formats_text(conjunction: str = "or") -> str:
    """The accepted formats for people: "JPEG, PNG, ..., AVIF or HEIC/HEIF"."""
    labels = [f.label for f in IMAGE_FORMATS]
    return f"{', '.join(labels[:-1])} {conjunction} {labels[-1]}" if len(labels) > 1 else labels[0]


def describe_formats() -> list[dict[str, object]]:
    """The accepted formats as plain data (for /info)."""
    return [
        {"name": f.pillow, "label": f.label, "media_types": list(f.media_types), "extensions": list(f.extensions)}
        for f in IMAGE_FORMATS
    ]


# Major brands of the HEIF family (ISO/IEC 23008-12 and the AVIF specification).
_HEIF_FAMILY_BRANDS = frozenset({
    b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"heif", b"mif1", b"mif2", b"msf1", b"avif", b"avis",
})
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
    def crop_fraction(self) -> float: ...
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
    return decode_oriented(data, max_pixels=max_pixels, min_size=min_size)[0]


def decode_oriented(data: bytes, *, max_pixels: int,
                    min_size: int | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """``decode_image``, and the full size (width, height) of the oriented original: a JPEG decoded at a
    reduced scale is smaller than the photo its pixels stand for."""
    if not data:
        raise InvalidImage("empty image")
    if data[4:8] == b"ftyp":  # the ISO base media file format: HEIC, HEIF, AVIF
        declared = _largest_declared_item(data)
        if declared is not None and declared[0] * declared[1] > max_pixels:
            width, height = declared
            raise ImageTooLarge(
                f"image declares {width}x{height} = {width * height} pixels; the limit is {max_pixels}"
            )
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
            if image.format != "HEIF":  # pillow-heif opens at the primary image, which need not be the first
                image.seek(0)
            image.load()
            decoded, orientation = image.size, _exif_orientation(image)
            image = _apply_exif_orientation(image)
            # A transposing orientation (EXIF 5-8) swaps the sides, of the full size too.
            turned = orientation in (5, 6, 7, 8) and image.size == decoded[::-1]
            return to_rgb(image), ((height, width) if turned else (width, height))
    except (InvalidImage, ImageTooLarge):
        raise
    except Image.DecompressionBombError as exc:
        # Pillow's own hard limit (2 x Image.MAX_IMAGE_PIXELS), also checked from the header alone.
        raise ImageTooLarge(f"image has more pixels than the limit of {max_pixels}") from exc
    except UnidentifiedImageError as exc:
        if data[4:8] == b"ftyp" and data[8:12] in _HEIF_FAMILY_BRANDS:
            # Pillow's AVIF plugin refuses a damaged file at open, which reads as "unknown format".
            raise InvalidImage("cannot decode image: a truncated or corrupt HEIF/AVIF file") from exc
        raise InvalidImage(f"not a supported image: expected {formats_text()} content") from exc
    except MemoryError as exc:
        raise ImageTooLarge("image too large to decode") from exc
    except RuntimeError as exc:
        if "security limit" in str(exc).lower():  # libheif's own limits (image size, tiles, memory)
            raise ImageTooLarge("image exceeds the decoder's security limits") from exc
        raise InvalidImage(f"cannot decode image ({type(exc).__name__})") from exc
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, struct.error, ... on bad data
        raise InvalidImage(f"cannot decode image ({type(exc).__name__})") from exc


def _boxes(data: bytes, start: int, end: int) -> Iterator[tuple[bytes, int, int]]:
    """The ISO BMFF boxes between ``start`` and ``end``: (type, body start, body end). Stops at the first
    box that does not fit (a truncated or corrupt file: the decoder then says what is wrong)."""
    pos = start
    while pos + 8 <= end:
        size, kind = struct.unpack_from(">I4s", data, pos)
        header = 8
        if size == 1:  # a 64-bit size follows the type
            if pos + 16 > end:
                return
            size = struct.unpack_from(">Q", data, pos + 8)[0]
            header = 16
        elif size == 0:  # to the end of the enclosing box
            size = end - pos
        if size < header or pos + size > end:
            return
        yield kind, pos + header, pos + size
        pos += size


def _largest_declared_item(data: bytes) -> tuple[int, int] | None:
    """The largest width x height any image item of a HEIF/AVIF file declares (its ``ispe`` property in
    ``meta/iprp/ipco``), or None if there is none. Only the header boxes are read, never the coded data."""
    largest: tuple[int, int] | None = None
    for kind, body, end in _boxes(data, 0, len(data)):
        if kind != b"meta":
            continue
        for kind2, body2, end2 in _boxes(data, body + 4, end):  # meta is a full box: version + flags
            if kind2 != b"iprp":
                continue
            for kind3, body3, end3 in _boxes(data, body2, end2):
                if kind3 != b"ipco":
                    continue
                for kind4, body4, end4 in _boxes(data, body3, end3):
                    if kind4 == b"ispe" and end4 - body4 >= 12:
                        width, height = struct.unpack_from(">II", data, body4 + 4)
                        if largest is None or width * height > largest[0] * largest[1]:
                            largest = (width, height)
        break  # one meta box at file level
    return largest


def _exif_orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(0x0112, 1))
    except Exception:
        return 1


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

    def with_crop(self, data: bytes) -> tuple[np.ndarray, Crop]:
        """Like calling it, and where the input came from: the window of the oriented original photo (in
        its full-size pixels, even when a JPEG was decoded at a reduced scale) that became the input."""
        image, full = decode_oriented(data, max_pixels=self.max_pixels,
                                      min_size=DRAFT_OVERSAMPLE * self.resize_size)
        return self.from_image(image), crop_of(image.size, full, self.spec)


@dataclass(frozen=True)
class Crop:
    """The part of an image the network saw: ``box`` (left, top, right, bottom) in pixels of the oriented
    original, whose size is ``size`` (width, height). A feature map's h x w grid divides the box into equal
    cells, row by row."""

    box: tuple[float, float, float, float]
    size: tuple[int, int]

    def as_dict(self) -> dict[str, object]:
        left, top, right, bottom = self.box
        return {"left": left, "top": top, "right": right, "bottom": bottom,
                "width": self.size[0], "height": self.size[1]}


def crop_of(decoded: tuple[int, int], full: tuple[int, int], spec: PreprocessSpec) -> Crop:
    """The ``Crop`` of an image decoded at ``decoded`` (width, height) whose original is ``full``: the
    preprocessing's own window (``model.imageops.crop_box``), scaled to the original's pixels."""
    left, top, right, bottom = crop_box(decoded[0], decoded[1], spec)  # type: ignore[arg-type]
    sx, sy = full[0] / decoded[0], full[1] / decoded[1]
    return Crop((left * sx, top * sy, right * sx, bottom * sy), (int(full[0]), int(full[1])))


def describe(spec: PreprocessSpec) -> dict[str, object]:
    """The preprocessing as plain data (for /info)."""
    return {
        "input_size": int(spec.input_size),
        "resize_size": int(spec.resize_size),
        "crop_fraction": float(spec.crop_fraction),
        "interpolation": str(spec.interpolation),
        "mean": [float(v) for v in spec.mean],
        "std": [float(v) for v in spec.std],
        "formats": list(SUPPORTED_FORMATS),
    }


__all__ = [
    "ACCEPTED_EXTENSIONS",
    "Crop",
    "ACCEPTED_MEDIA_TYPES",
    "IMAGE_FORMATS",
    "SUPPORTED_FORMATS",
    "ImageFormat",
    "PreprocessSpec",
    "Preprocessor",
    "crop_of",
    "decode_image",
    "decode_oriented",
    "describe",
    "describe_formats",
    "formats_text",
    "to_rgb",
]
