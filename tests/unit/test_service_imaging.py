"""Unit tests of image decoding and preprocessing on small synthetic images."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from model import get_efficientnet_config
from service.core.errors import ImageTooLarge, InvalidImage
from service.core.imaging import Preprocessor, decode_image
from tests.helpers.images import encode, png_declaring

LIMIT = 10_000_000
RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def decode(data: bytes, **kwargs) -> Image.Image:
    return decode_image(data, max_pixels=kwargs.pop("max_pixels", LIMIT), **kwargs)


def centre(image: Image.Image) -> tuple[int, ...]:
    return image.getpixel((image.width // 2, image.height // 2))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"])
def test_every_accepted_format_decodes_to_rgb(fmt):
    image = decode(encode(Image.new("RGB", (32, 24), RED), fmt))
    assert image.mode == "RGB" and image.size == (32, 24)
    assert np.allclose(centre(image), RED, atol=8)


@pytest.mark.parametrize(
    ("mode", "fill", "expected"),
    [
        ("L", 128, (128, 128, 128)),
        ("1", 1, WHITE),
        ("P", 3, None),  # palette entry 3, whatever colour the default palette has
        ("CMYK", (0, 255, 255, 0), RED),
        ("LA", (100, 255), (100, 100, 100)),
        ("RGBA", (255, 0, 0, 255), RED),
    ],
)
def test_modes_convert_to_rgb(mode, fill, expected):
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    image = decode(encode(Image.new(mode, (16, 16), fill), fmt))
    assert image.mode == "RGB"
    if expected is not None:
        assert np.allclose(centre(image), expected, atol=6)


def test_transparent_pixels_are_composited_on_white():
    rgba = Image.new("RGBA", (16, 16), (255, 0, 0, 0))  # fully transparent red
    rgba.paste((0, 0, 255, 255), (0, 0, 8, 16))  # opaque blue left half
    image = decode(encode(rgba, "PNG"))
    assert image.getpixel((2, 8)) == BLUE
    assert image.getpixel((12, 8)) == WHITE


def test_palette_with_transparency_is_composited_on_white():
    palette = Image.new("P", (16, 16), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.paste(0, (0, 0, 8, 16))
    data = encode(palette, "PNG", transparency=0)
    image = decode(data)
    assert image.getpixel((2, 8)) == WHITE
    assert image.getpixel((12, 8)) == RED


def test_16_bit_greyscale_is_scaled_not_clipped():
    values = np.array([[0, 32896, 65535, 1000]], dtype=np.uint16)
    grey16 = Image.fromarray(values)  # mode I;16
    assert grey16.mode.startswith("I;16")
    image = decode(encode(grey16, "PNG"))
    row = [image.getpixel((x, 0))[0] for x in range(4)]
    assert row == [0, 128, 255, 4]


def test_32_bit_integer_and_float_tiffs():
    ints = Image.fromarray(np.array([[0, 65535]], dtype=np.int32))
    assert [decode(encode(ints, "TIFF")).getpixel((x, 0))[0] for x in range(2)] == [0, 255]
    floats = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert [decode(encode(floats, "TIFF")).getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_exif_orientation_is_applied():
    # Stored 40x20, left half red, right half blue; orientation 6 = display rotated 90 degrees clockwise.
    stored = Image.new("RGB", (40, 20), BLUE)
    stored.paste(RED, (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    image = decode(encode(stored, "JPEG", exif=exif.tobytes(), quality=95))
    assert image.size == (20, 40)
    assert np.allclose(image.getpixel((10, 5)), RED, atol=40)  # the left of the stored image is now on top
    assert np.allclose(image.getpixel((10, 35)), BLUE, atol=40)


def test_corrupt_exif_does_not_reject_the_image():
    data = encode(Image.new("RGB", (8, 8), RED), "JPEG", exif=b"Exif\x00\x00garbage-not-tiff")
    assert np.allclose(centre(decode(data)), RED, atol=8)


def test_animated_gif_uses_the_first_frame():
    frames = [Image.new("RGB", (16, 16), RED), Image.new("RGB", (16, 16), BLUE)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert np.allclose(centre(decode(buffer.getvalue())), RED, atol=8)


def test_large_jpeg_is_decoded_at_reduced_scale_but_never_below_the_target():
    data = encode(Image.new("RGB", (2000, 1500), RED), "JPEG")
    image = decode(data, min_size=256)
    assert min(image.size) >= 256
    assert image.size[0] < 2000  # draft mode reduced it in the DCT


def test_pixel_limit_is_checked_from_the_header_before_decoding():
    bomb = png_declaring(60000, 60000)
    assert len(bomb) < 1000  # a tiny file declaring 3.6 billion pixels
    started = time.perf_counter()
    with pytest.raises(ImageTooLarge, match="limit"):
        decode(bomb)
    with pytest.raises(ImageTooLarge, match="6000x6000"):
        decode(png_declaring(6000, 6000))
    assert time.perf_counter() - started < 0.5
    with pytest.raises(ImageTooLarge):
        decode(encode(Image.new("RGB", (100, 100)), "PNG"), max_pixels=9_999)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00" * 100,
        b"<html><body>not an image</body></html>",
        b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>',
        b"PK\x03\x04" + b"\x00" * 60,  # a ZIP
    ],
    ids=["empty", "zeros", "html", "svg", "zip"],
)
def test_non_images_are_invalid(data):
    with pytest.raises(InvalidImage):
        decode(data)


def test_formats_pillow_knows_but_we_do_not_accept_are_invalid():
    with pytest.raises(InvalidImage, match="not a supported image"):
        decode(encode(Image.new("RGB", (16, 16), RED), "ICO"))


def test_truncated_jpeg_is_invalid():
    data = encode(Image.effect_noise((256, 256), 64).convert("RGB"), "JPEG")
    with pytest.raises(InvalidImage):
        decode(data[: len(data) // 2])


@pytest.fixture(scope="module")
def lite0_preprocessor() -> Preprocessor:
    return Preprocessor(get_efficientnet_config("efficientnet-lite0").preprocess, max_pixels=LIMIT)


def test_preprocessing_gives_uint8_chw_pixels_not_normalised(lite0_preprocessor):
    """The decode threads hand the engine the resized, cropped uint8 pixels (CHW); engines normalise."""
    array = lite0_preprocessor(encode(Image.new("RGB", (300, 200), (200, 100, 50)), "PNG"))
    assert array.shape == (3, 224, 224) and array.dtype == np.uint8 and array.flags.c_contiguous
    for channel, value in enumerate((200, 100, 50)):
        assert (array[channel] == value).all()


def test_uint8_then_normalize_equals_the_float_preprocessing_exactly(lite0_preprocessor, photos):
    """model.Normalize on the uint8 pixels gives the very floats model.normalize gives (the old path)."""
    from model import Normalize, normalize, resize_and_crop
    from service.core.imaging import DRAFT_OVERSAMPLE, decode_image

    spec = lite0_preprocessor.spec
    for data in photos.values():
        image = decode_image(data, max_pixels=LIMIT, min_size=DRAFT_OVERSAMPLE * spec.resize_size)
        old = normalize(resize_and_crop(image, spec), spec)
        new = Normalize(spec)(torch.from_numpy(lite0_preprocessor(data))[None])[0].numpy()
        assert np.array_equal(old, new)


def test_centre_crop_of_the_shorter_side(lite0_preprocessor):
    # 400x200: red centre square, blue outer bands; after resize (short side 256) and the 224 crop only
    # the middle remains.
    image = Image.new("RGB", (400, 200), BLUE)
    image.paste(RED, (100, 0, 300, 200))
    array = lite0_preprocessor.from_image(image)
    assert (array[:, :, 112].T == RED).all()


def test_extreme_aspect_ratio_is_cheap(lite0_preprocessor):
    data = encode(Image.new("RGB", (4000, 3), RED), "PNG")
    started = time.perf_counter()
    array = lite0_preprocessor(data)
    assert array.shape == (3, 224, 224)
    assert time.perf_counter() - started < 1.0


_VALID = [
    encode(Image.effect_noise((24, 16), 40).convert("RGB"), fmt)
    for fmt in ("PNG", "JPEG", "GIF", "BMP", "WEBP")
]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    base=st.sampled_from(_VALID),
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=8),
    cut=st.integers(0, 10_000),
)
def test_fuzzed_images_raise_only_declared_errors(base, edits, cut):
    data = bytearray(base)
    for position, value in edits:
        data[position % len(data)] = value
    data = bytes(data[: max(1, len(data) - cut % len(data))])
    try:
        image = decode(data, min_size=8)
    except (InvalidImage, ImageTooLarge):
        return
    assert image.mode == "RGB"


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_raise_only_declared_errors(data):
    try:
        decode(data)
    except (InvalidImage, ImageTooLarge):
        pass
