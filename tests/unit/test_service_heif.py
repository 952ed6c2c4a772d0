"""HEIC/HEIF and AVIF input: decoding (orientation once, alpha, 10 bits), the limits checked from the header,
hostile files, the HTTP and V2 REST doors in-process (stand-in engine), the batch command's sniffing, the
page's picker and hint, and -- with the real Lite0 weights (``slow``) -- the same top-1 as the JPEG
original for real photos re-encoded to HEIC and AVIF, an iPhone-style rotated HEIC and a 12 MP photo.

The network doors (multipart and raw /predict and /features, V2 REST and gRPC against a real server) are
in tests/integration/test_heif_doors.py.
"""

from __future__ import annotations

import base64
import io
import json
import re
import time
from pathlib import Path

import numpy as np
import pillow_heif
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from service.core.errors import ImageTooLarge, InvalidImage
from service.core.imaging import (
    ACCEPTED_EXTENSIONS,
    ACCEPTED_MEDIA_TYPES,
    SUPPORTED_FORMATS,
    decode_image,
    formats_text,
)
from tests.helpers.fakes import FakeEngine, app_with_engine
from tests.helpers.heif import (
    assert_same_top1,
    boxes,
    declaring,
    heic_10_bit,
    iphone_style_heic,
    to_avif,
    to_heic,
    top_k,
)
from tests.helpers.images import DATA, PHOTO_NAMES

LIMIT = 64_000_000
RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)
ENCODERS = {"HEIF": to_heic, "AVIF": to_avif}
REPO = Path(__file__).resolve().parents[2]


def decode(data: bytes, **kwargs) -> Image.Image:
    return decode_image(data, max_pixels=kwargs.pop("max_pixels", LIMIT), **kwargs)


def centre(image: Image.Image) -> tuple[int, ...]:
    return image.getpixel((image.width // 2, image.height // 2))


def halves(size=(40, 20)) -> Image.Image:
    """Left half red, right half blue: where each colour ends up shows how the image was turned."""
    image = Image.new("RGB", size, BLUE)
    image.paste(RED, (0, 0, size[0] // 2, size[1]))
    return image


@pytest.fixture(scope="module")
def small() -> dict[str, bytes]:
    noise = Image.effect_noise((64, 48), 40).convert("RGB")
    return {fmt: encode(noise) for fmt, encode in ENCODERS.items()}


# -- decoding ----------------------------------------------------------------------------------------------
def test_both_formats_are_installed_and_accepted():
    """pillow-heif is a dependency and the pinned Pillow has libavif: neither may be missing silently."""
    assert {"HEIF", "AVIF"} <= set(SUPPORTED_FORMATS)
    assert {"image/heic", "image/heif", "image/avif"} <= set(ACCEPTED_MEDIA_TYPES)
    assert {".heic", ".heif", ".avif"} <= set(ACCEPTED_EXTENSIONS)
    assert formats_text().endswith("AVIF or HEIC/HEIF")


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF"])
def test_heic_and_avif_decode_to_rgb(fmt):
    data = ENCODERS[fmt](halves())
    assert data[4:8] == b"ftyp"
    image = decode(data)
    assert image.mode == "RGB" and image.size == (40, 20)
    assert np.allclose(image.getpixel((5, 10)), RED, atol=12)
    assert np.allclose(image.getpixel((35, 10)), BLUE, atol=12)


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF"])
def test_the_generic_mif1_brand_is_decoded_by_the_right_plugin(fmt, small):
    """Files whose major brand is the generic "mif1" (compatible brands say heic or avif) are claimed by
    both plugins: each must still reach the decoder that has its codec (libheif here has no AV1)."""
    data = small[fmt]
    generic = data[:8] + b"mif1" + data[12:]
    assert decode(generic).size == (64, 48)


def test_the_primary_image_of_a_heif_collection_is_the_one_decoded():
    """A HEIF file may hold several images; viewers show the primary one, which need not be the first."""
    images = [Image.new("RGB", (32, 24), RED), Image.new("RGB", (32, 24), BLUE)]
    data = to_heic(images[0], save_all=True, append_images=images[1:], primary_index=1)
    assert pillow_heif.open_heif(io.BytesIO(data)).primary_index == 1
    assert np.allclose(centre(decode(data)), BLUE, atol=12)


def test_iphone_style_heic_is_turned_upright_once():
    """Stored sideways with EXIF orientation 6 *and* an irot box, tiled like an iPhone's: libheif applies
    the irot, and the EXIF orientation is not applied on top of it (that would turn it a second time)."""
    upright = halves((40, 20)).rotate(-90, expand=True)  # 20 wide, 40 tall: red on top, blue below
    assert upright.size == (20, 40)
    data = iphone_style_heic(upright, tile=16)
    assert {b"irot", b"grid", b"Exif"} <= boxes(data)
    exif = Image.Exif()
    exif.load(pillow_heif.open_heif(io.BytesIO(data)).info["exif"])
    assert exif[0x0112] == 6 and exif[0x010F] == "Apple"  # the file really says "rotate 90 clockwise"
    image = decode(data)
    assert image.size == (20, 40)
    assert np.allclose(image.getpixel((10, 5)), RED, atol=40)
    assert np.allclose(image.getpixel((10, 35)), BLUE, atol=40)


def test_avif_orientation_is_applied_once():
    """Pillow writes EXIF orientation 6 as the AVIF irot box; reading reports it as the EXIF orientation
    (libavif does not apply irot itself), and it is applied exactly once."""
    exif = Image.Exif()
    exif[0x0112] = 6
    data = to_avif(halves(), exif=exif.tobytes())
    assert b"irot" in boxes(data)
    image = decode(data)
    assert image.size == (20, 40)
    assert np.allclose(image.getpixel((10, 5)), RED, atol=40)
    assert np.allclose(image.getpixel((10, 35)), BLUE, atol=40)


def test_10_bit_heic_is_scaled_to_8_bits_not_clipped():
    ramp = np.linspace(0, 65535, 64, dtype=np.float64).round().astype(np.uint16)
    values = np.repeat(np.repeat(ramp[None, :, None], 8, axis=0), 3, axis=2)  # a grey ramp, 64 x 8
    data = heic_10_bit(values)
    assert Image.open(io.BytesIO(data)).info["bit_depth"] == 10
    image = decode(data)
    assert image.mode == "RGB"
    row = np.asarray(image)[4, :, 1].astype(int)
    expected = np.rint(ramp / 257.0).astype(int)
    assert row[0] <= 2 and row[-1] >= 253  # the full range, not the low 8 of 10 bits
    assert np.abs(row - expected).max() <= 3


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF"])
def test_transparent_pixels_are_composited_on_white(fmt):
    rgba = Image.new("RGBA", (32, 32), (255, 0, 0, 0))  # fully transparent red
    rgba.paste((0, 0, 255, 255), (0, 0, 16, 32))  # opaque blue left half
    image = decode(ENCODERS[fmt](rgba, quality=-1 if fmt == "HEIF" else 100))
    assert np.allclose(image.getpixel((4, 16)), BLUE, atol=8)
    assert np.allclose(image.getpixel((28, 16)), WHITE, atol=8)


# -- limits and hostile files --------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["HEIF", "AVIF"])
def test_a_header_claiming_100000_by_100000_is_413_at_once(fmt, small):
    bomb = declaring(small[fmt], 100_000, 100_000)
    assert len(bomb) < 4096
    started = time.perf_counter()
    with pytest.raises(ImageTooLarge, match="100000x100000"):
        decode(bomb)
    assert time.perf_counter() - started < 0.5


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF"])
def test_the_declared_size_counts_even_when_a_clean_aperture_hides_it(fmt, small):
    """Pillow (pillow-heif) reports the size after the clean-aperture crop: a file declaring 10000x10000
    with a 64x48 crop looks small to it, and libheif would decode the whole declared picture first."""
    bomb = declaring(small[fmt], 10_000, 10_000)
    if fmt == "HEIF":
        assert b"clap" in boxes(bomb) and Image.open(io.BytesIO(bomb)).size == (64, 48)
    with pytest.raises(ImageTooLarge, match="10000x10000"):
        decode(bomb)


def test_libheifs_own_security_limit_is_a_413_too(small):
    """With a pixel limit above libheif's (a gigapixel), libheif refuses the allocation itself: still 413."""
    bomb = declaring(small["HEIF"], 40_000, 40_000)
    with pytest.raises(ImageTooLarge, match="security limits"):
        decode(bomb, max_pixels=2_000_000_000)


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF"])
def test_pixel_limit_applies_to_real_files(fmt):
    data = ENCODERS[fmt](Image.new("RGB", (300, 200), RED))
    assert decode(data).size == (300, 200)
    with pytest.raises(ImageTooLarge, match="limit is 50000"):
        decode(data, max_pixels=50_000)


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF"])
@pytest.mark.parametrize("keep", [0.5, 0.9, 40, -10])
def test_truncated_files_are_invalid(fmt, keep):
    data = ENCODERS[fmt](Image.effect_noise((96, 64), 50).convert("RGB"))
    end = int(len(data) * keep) if isinstance(keep, float) else keep
    with pytest.raises(InvalidImage):
        decode(data[:end])


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF"])
@pytest.mark.parametrize("seed", range(4))
def test_random_bytes_after_a_valid_ftyp_box_are_invalid(fmt, small, seed):
    data = small[fmt]
    ftyp_size = int.from_bytes(data[:4], "big")
    noise = np.random.default_rng(seed).integers(0, 256, 4000, dtype=np.uint8).tobytes()
    with pytest.raises(InvalidImage, match="HEIF/AVIF|cannot decode"):
        decode(data[:ftyp_size] + noise)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    fmt=st.sampled_from(["HEIF", "AVIF"]),
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=8),
    cut=st.integers(0, 10_000),
)
def test_fuzzed_heif_files_raise_only_declared_errors(small, fmt, edits, cut):
    data = bytearray(small[fmt])
    for position, value in edits:
        data[position % len(data)] = value
    data = bytes(data[: max(1, len(data) - cut % len(data))])
    try:
        image = decode(data, max_pixels=4_000_000)
    except (InvalidImage, ImageTooLarge):
        return
    assert image.mode == "RGB"


# -- the HTTP and V2 REST doors, in-process with a stand-in engine -------------------------------------------
@pytest.fixture(scope="module")
def client():
    with TestClient(app_with_engine(FakeEngine(), warmup=False)) as client:
        deadline = time.monotonic() + 10
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        yield client


@pytest.mark.parametrize(
    ("fmt", "media"),
    [("HEIF", "image/heic"), ("HEIF", "image/heif"), ("AVIF", "image/avif"), ("HEIF", "application/octet-stream")],
)
def test_raw_bodies_with_heif_types_are_accepted(client, small, fmt, media):
    for path in ("/predict", "/features"):
        response = client.post(path, content=small[fmt], headers={"Content-Type": media})
        assert response.status_code == 200, response.text


def test_content_decides_not_the_name_or_declared_type(client, small):
    """A HEIC sent as "photo.jpg" / image/jpeg, and a JPEG sent as image/heic, are both read by content."""
    files = [("file", ("photo.jpg", small["HEIF"], "image/jpeg")), ("file", ("IMG_0001", small["AVIF"], "text/plain"))]
    response = client.post("/predict", files=files)
    assert response.status_code == 200, response.text
    assert len(response.json()["results"]) == 2
    jpeg = (DATA / "coffee.jpg").read_bytes()
    assert client.post("/predict", content=jpeg, headers={"Content-Type": "image/heic"}).status_code == 200


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF"])
def test_hostile_files_get_4xx_json_errors(client, small, fmt):
    cases = {
        "huge": (declaring(small[fmt], 100_000, 100_000), 413, "image_too_large"),
        "truncated": (small[fmt][: len(small[fmt]) // 2], 400, "invalid_image"),
        "noise": (small[fmt][:32] + bytes(range(256)) * 8, 400, "invalid_image"),
    }
    media = "image/avif" if fmt == "AVIF" else "image/heic"
    for name, (data, status, code) in cases.items():
        response = client.post("/predict", content=data, headers={"Content-Type": media})
        assert response.status_code == status, (name, response.text)
        assert response.json()["error"]["code"] == code, name


def test_unsupported_image_types_still_name_what_is_accepted(client):
    response = client.post("/predict", content=b"\xff\x0a", headers={"Content-Type": "image/jxl"})
    assert response.status_code == 415
    assert "AVIF or HEIC/HEIF" in response.json()["error"]["message"]


def test_info_lists_the_accepted_formats(client):
    info = client.get("/info").json()
    by_name = {f["name"]: f for f in info["image_formats"]}
    assert list(by_name) == list(SUPPORTED_FORMATS) == info["preprocessing"]["formats"]
    assert by_name["HEIF"]["label"] == "HEIC/HEIF"
    assert {"image/heic", "image/heif"} <= set(by_name["HEIF"]["media_types"])
    assert by_name["AVIF"]["media_types"] == ["image/avif"] and ".avif" in by_name["AVIF"]["extensions"]
    assert "pillow-heif" in info["versions"]


def test_v2_rest_bytes_accept_heic_and_avif(client, small):
    body = {
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [2],
                    "data": [base64.b64encode(small["HEIF"]).decode(), base64.b64encode(small["AVIF"]).decode()]}],
        "outputs": [{"name": "logits"}],
    }
    response = client.post("/v2/models/efficientnet-lite0/infer", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][0]["shape"] == [2, 1000]
    body["inputs"][0]["shape"] = [1]
    body["inputs"][0]["data"] = [base64.b64encode(declaring(small["HEIF"], 100_000, 100_000)).decode()]
    response = client.post("/v2/models/efficientnet-lite0/infer", json=body)
    assert response.status_code == 413 and "100000x100000" in response.json()["error"]


# -- the batch command's sniffing and the page ----------------------------------------------------------------
def test_batch_sniffing_finds_heic_and_avif_without_their_extension(tmp_path, small):
    from service.cli.discover import discover, looks_like_image

    iphone = iphone_style_heic(halves((20, 40)), tile=16)
    for data in (small["HEIF"], small["AVIF"], iphone):
        assert looks_like_image(data[:32])
    (tmp_path / "IMG_0001.HEIC").write_bytes(iphone)
    (tmp_path / "camera-dump-0002").write_bytes(small["HEIF"])
    (tmp_path / "web.avif").write_bytes(small["AVIF"])
    (tmp_path / "notes.txt").write_text("not an image")
    found = discover([str(tmp_path)])
    assert sorted(Path(p).name for p in found.images) == ["IMG_0001.HEIC", "camera-dump-0002", "web.avif"]
    assert found.ignored == 1


def test_the_page_offers_and_names_every_accepted_format():
    """The static page's defaults are the core's list (app.js refreshes both from /info)."""
    html = (REPO / "service/web/static/index.html").read_text()
    accept = re.search(r'<input id="images"[^>]*accept="([^"]*)"', html, re.S).group(1).split(",")
    assert set(accept) == {"image/*", *ACCEPTED_EXTENSIONS}
    hint = re.search(r'<span id="formats">([^<]*)</span>', html).group(1)
    assert hint == formats_text()
    script = (REPO / "service/web/static/app.js").read_text()
    assert "image_formats" in script and "els.input.accept" in script


# -- real photos, real weights ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lite0_model():
    from service.core.loading import load_model
    from service.core.settings import ModelSettings

    return load_model(ModelSettings(model="efficientnet-lite0", num_threads=2))


def _top5(model, preprocessor, blobs: list[bytes]) -> list[list[tuple[int, float]]]:
    batch = np.stack([preprocessor(b) for b in blobs])
    _, logits = model.engine.run(batch)
    return [top_k(row) for row in logits]


@pytest.mark.slow
def test_real_photos_as_heic_avif_and_iphone_heic_keep_the_jpeg_top1(lite0_model):
    """Each shared photo re-encoded to HEIC and AVIF (and stored sideways as an iPhone does) gets the top-1
    of its JPEG original through the service's own preprocessing and engine."""
    from service.core.imaging import Preprocessor

    pre = Preprocessor(lite0_model.variant.preprocess, max_pixels=LIMIT)
    for name in PHOTO_NAMES:
        jpeg = (DATA / name).read_bytes()
        upright = Image.open(io.BytesIO(jpeg)).convert("RGB")
        variants = {"HEIC": to_heic(upright), "AVIF": to_avif(upright), "iPhone HEIC": iphone_style_heic(upright)}
        reference, *others = _top5(lite0_model, pre, [jpeg, *variants.values()])
        for what, other in zip(variants, others, strict=True):
            assert_same_top1(reference, other, f"{name} as {what}")


@pytest.mark.slow
def test_a_12_megapixel_heic_and_avif_keep_the_top1_of_the_same_photo_as_jpeg(lite0_model):
    """A phone-sized photo (4000x2667): HEVC and AV1 have no reduced-size decode, so these decode in full;
    the JPEG is draft-decoded. All three must agree on the top-1."""
    from service.core.imaging import Preprocessor

    pre = Preprocessor(lite0_model.variant.preprocess, max_pixels=LIMIT)
    big = Image.open(DATA / "coffee.jpg").convert("RGB").resize((4000, 2667), Image.Resampling.BICUBIC)
    jpeg = io.BytesIO()
    big.save(jpeg, "JPEG", quality=92)
    heic = to_heic(big, enc_params={"preset": "ultrafast"})
    avif = to_avif(big, speed=10)
    assert decode(heic).size == decode(avif).size == (4000, 2667)
    reference, from_heic, from_avif = _top5(lite0_model, pre, [jpeg.getvalue(), heic, avif])
    assert reference[0][0] == from_heic[0][0] == from_avif[0][0] == 967  # espresso, no tie here


@pytest.mark.slow
def test_the_batch_command_reads_heic_and_avif_like_their_jpeg(tmp_path, monkeypatch, lite0_model, capsys):
    import dataclasses

    from service.cli.main import main
    from service.core import registry

    # The run's own spec (warm-up off, as the command asks), on the shared network.
    monkeypatch.setattr(registry, "load_model", lambda spec: dataclasses.replace(lite0_model, spec=spec))
    photos = tmp_path / "camera-roll"
    photos.mkdir()
    for name in PHOTO_NAMES:
        jpeg = (DATA / name).read_bytes()
        upright = Image.open(io.BytesIO(jpeg)).convert("RGB")
        stem = name.removesuffix(".jpg")
        (photos / name).write_bytes(jpeg)
        (photos / f"{stem}.avif").write_bytes(to_avif(upright))
        (photos / f"IMG_{stem}.HEIC").write_bytes(iphone_style_heic(upright))
        (photos / f"{stem}-no-extension").write_bytes(to_heic(upright))
    out = tmp_path / "rows.jsonl"
    assert main(["predict", str(photos), "--output", str(out), "--top-k", "2", "--quiet"]) == 0
    rows = {Path(r["path"]).name: r for r in map(json.loads, out.read_text().splitlines())}
    assert len(rows) == 4 * len(PHOTO_NAMES) and not [r for r in rows.values() if "error" in r]
    for name in PHOTO_NAMES:
        stem = name.removesuffix(".jpg")
        reference = [(c["index"], c["score"]) for c in rows[name]["top_k"]]
        for other in (f"{stem}.avif", f"IMG_{stem}.HEIC", f"{stem}-no-extension"):
            assert_same_top1(reference, [(c["index"], c["score"]) for c in rows[other]["top_k"]], other)
