"""Input: odd-but-valid images are answered 200 with the right content and orientation; hostile
inputs get their 4xx JSON error quickly and without the server's memory jumping; the body limit holds
while reading, also for chunked uploads that never end.

One real server process (Lite0, real weights, onnxruntime on CPU) serves the whole module. Every image is
generated here with Pillow from the real test photos; nothing large is stored in git.
"""

from __future__ import annotations

import io
import json
import os
import random
import select
import socket
import time
import zipfile
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.helpers.images import encode, png_declaring
from tests.helpers.server import rss_bytes

MAX_BODY = 1_000_000  # small, so the limit tests are cheap
HOSTILE_SECONDS = 2.0  # upper bound on the wall time of any one hostile request (generous: 2 shared cores)
RSS_JUMP_LIMIT = 200 * 2**20


@pytest.fixture(scope="module")
def service(start_service):
    server = start_service({"EFFNET_MAX_BODY_BYTES": str(MAX_BODY), "EFFNET_MAX_BATCH_DELAY_MS": "2"})
    yield server
    server.close()


@pytest.fixture()
def client(service):
    with httpx.Client(base_url=service.url, timeout=60.0) as c:
        yield c


def cosine(a: list[float], b: list[float]) -> float:
    x, y = np.asarray(a), np.asarray(b)
    return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))


@pytest.fixture(scope="module")
def coffee(photos) -> Image.Image:
    """The espresso photo at 300x200: small uploads, still unmistakably espresso for Lite0."""
    return Image.open(io.BytesIO(photos["coffee.jpg"])).convert("RGB").resize((300, 200), Image.Resampling.LANCZOS)


@pytest.fixture(scope="module")
def cat(photos) -> Image.Image:
    return Image.open(io.BytesIO(photos["chelsea.jpg"])).convert("RGB").resize((300, 200), Image.Resampling.LANCZOS)


def _frame(size: tuple[int, int], width: int = 12) -> Image.Image:
    """A mask (mode L) that is 255 on a border of ``width`` pixels and 0 inside."""
    mask = Image.new("L", size, 255)
    mask.paste(0, (width, width, size[0] - width, size[1] - width))
    return mask


# -- odd but valid ------------------------------------------------------------------------------------------
def _palette_with_transparency(photo: Image.Image) -> bytes:
    # 255 colours for the photo, palette index 255 (bright green) transparent and painted on a border: a
    # decoder that ignored the transparency would show a green frame, ours composites it on white.
    image = photo.quantize(colors=255)
    palette = image.getpalette()[: 255 * 3] + [0, 255, 0]
    image.putpalette(palette)
    image.paste(255, mask=_frame(photo.size))
    return encode(image, "PNG", transparency=255)


def _with_alpha(image: Image.Image) -> Image.Image:
    alpha = Image.eval(_frame(image.size), lambda v: 255 - v)  # transparent border, opaque inside
    image = image.copy()
    image.putalpha(alpha)
    return image


def odd_but_valid(coffee: Image.Image) -> dict[str, tuple[bytes, str | None]]:
    """name -> (bytes, the class Lite0 must answer, or None where the content is not a photo)."""
    grey = coffee.convert("L")
    grey16 = Image.fromarray(np.asarray(grey).astype(np.uint16) * 257)
    assert grey16.mode.startswith("I;16")
    rng = np.random.default_rng(0)
    return {
        "greyscale L PNG": (encode(grey, "PNG"), "espresso"),
        "palette P with transparency": (_palette_with_transparency(coffee), "espresso"),
        "RGBA PNG": (encode(_with_alpha(coffee), "PNG"), "espresso"),
        "LA PNG": (encode(_with_alpha(grey), "PNG"), "espresso"),
        "CMYK JPEG": (encode(coffee.convert("CMYK"), "JPEG", quality=92), "espresso"),
        "16-bit greyscale PNG": (encode(grey16, "PNG"), "espresso"),
        "progressive JPEG": (encode(coffee, "JPEG", quality=90, progressive=True), "espresso"),
        "WebP": (encode(coffee, "WEBP", quality=90), "espresso"),
        "TIFF": (encode(coffee, "TIFF", compression="tiff_lzw"), "espresso"),
        "BMP": (encode(coffee, "BMP"), "espresso"),
        "1x1 PNG": (encode(Image.new("RGB", (1, 1), (90, 60, 30)), "PNG"), None),
        "4000x3 PNG": (encode(Image.fromarray(rng.integers(0, 255, (3, 4000, 3), dtype=np.uint8)), "PNG"), None),
        "3x4000 JPEG": (encode(Image.fromarray(rng.integers(0, 255, (4000, 3, 3), dtype=np.uint8)), "JPEG"), None),
    }


ODD_NAMES = [
    "greyscale L PNG",
    "palette P with transparency",
    "RGBA PNG",
    "LA PNG",
    "CMYK JPEG",
    "16-bit greyscale PNG",
    "progressive JPEG",
    "WebP",
    "TIFF",
    "BMP",
    "1x1 PNG",
    "4000x3 PNG",
    "3x4000 JPEG",
]


@pytest.mark.parametrize("name", ODD_NAMES)
def test_odd_but_valid_images_are_answered_200_with_the_right_class(client, coffee, name):
    data, expected = odd_but_valid(coffee)[name]
    response = client.post("/predict", files={"file": (name, data, "application/octet-stream")})
    assert response.status_code == 200, response.text
    (result,) = response.json()["results"]
    assert result["filename"] == name and len(result["top_k"]) == 5
    if expected is not None:
        assert result["top_k"][0]["label"] == expected, result["top_k"]


def _features(client: httpx.Client, images: list[bytes]) -> list[list[float]]:
    files = [("file", (f"{i}", data, "application/octet-stream")) for i, data in enumerate(images)]
    response = client.post("/features", files=files, params={"normalize": "true"})
    assert response.status_code == 200, response.text
    return [r["embedding"] for r in response.json()["results"]]


# EXIF orientation -> how the stored pixels are turned relative to the upright picture.
ORIENTATIONS = {
    3: Image.Transpose.ROTATE_180,
    6: Image.Transpose.ROTATE_90,  # stored turned 90 degrees anticlockwise; shown turned back clockwise
    8: Image.Transpose.ROTATE_270,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
}


@pytest.mark.parametrize("orientation", list(ORIENTATIONS))
def test_exif_rotated_photo_is_seen_upright(client, coffee, orientation):
    stored = coffee.transpose(ORIENTATIONS[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    tagged = encode(stored, "JPEG", quality=95, exif=exif.tobytes())
    upright, rotated_tagged, untagged = _features(
        client, [encode(coffee, "JPEG", quality=95), tagged, encode(stored, "JPEG", quality=95)]
    )
    assert cosine(rotated_tagged, upright) > 0.99
    if orientation != 2:  # a mirror image of a cup is still much the same cup to a classifier
        assert cosine(untagged, upright) < 0.9  # the test would notice the orientation being ignored
    predicted = client.post("/predict", files={"file": ("tagged.jpg", tagged, "image/jpeg")}).json()
    assert predicted["results"][0]["top_k"][0]["label"] == "espresso"


def test_animated_gif_is_classified_by_its_first_frame(client, coffee, cat):
    animation = io.BytesIO()
    coffee.save(animation, format="GIF", save_all=True, append_images=[cat], duration=100, loop=0)
    data = animation.getvalue()
    with Image.open(io.BytesIO(data)) as check:
        assert check.n_frames == 2
    predicted = client.post("/predict", files={"file": ("anim.gif", data, "image/gif")})
    assert predicted.status_code == 200, predicted.text
    assert predicted.json()["results"][0]["top_k"][0]["label"] == "espresso"
    gif, first, second = _features(client, [data, encode(coffee, "PNG"), encode(cat, "PNG")])
    assert cosine(gif, first) > 0.95
    assert cosine(gif, second) < cosine(gif, first) - 0.3


# -- hostile ------------------------------------------------------------------------------------------------
def _zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("image.jpg", b"\xff\xd8\xff" + b"\x00" * 5000)
    return buffer.getvalue()


SVG = (
    b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="60000" height="60000">'
    b'<rect width="100%" height="100%" fill="red"/></svg>'
)


def hostile_corpus(photos: dict[str, bytes]) -> dict[str, tuple[dict, int, str]]:
    """name -> (httpx request arguments, status, error code)."""
    bomb = png_declaring(60000, 60000, rows=20)
    assert 1000 < len(bomb) < 10_000, len(bomb)
    jpeg = photos["coffee.jpg"]
    noise = random.Random(6).randbytes(4096)

    def part(name: str, data: bytes, media: str = "application/octet-stream") -> dict:
        return {"files": {"file": (name, data, media)}}

    return {
        "empty part": (part("empty.jpg", b"", "image/jpeg"), 400, "invalid_image"),
        "empty raw body": ({"content": b"", "headers": {"Content-Type": "image/jpeg"}}, 400, "invalid_image"),
        "random bytes": (part("noise.jpg", noise, "image/jpeg"), 400, "invalid_image"),
        "HTML": (part("page.png", b"<!doctype html><html><body>hi</body></html>", "image/png"), 400, "invalid_image"),
        "truncated JPEG": (part("cut.jpg", jpeg[: len(jpeg) // 3], "image/jpeg"), 400, "invalid_image"),
        "JPEG header only": (part("head.jpg", jpeg[:600], "image/jpeg"), 400, "invalid_image"),
        "PNG declaring 60000x60000 (part)": (part("bomb.png", bomb, "image/png"), 413, "image_too_large"),
        "PNG declaring 60000x60000 (raw)": (
            {"content": bomb, "headers": {"Content-Type": "image/png"}},
            413,
            "image_too_large",
        ),
        "ZIP": (part("photos.zip", _zip(), "application/zip"), 400, "invalid_image"),
        "SVG in a part": (part("vector.svg", SVG, "image/svg+xml"), 400, "invalid_image"),
        "SVG raw body": ({"content": SVG, "headers": {"Content-Type": "image/svg+xml"}}, 415, "unsupported_media_type"),
        "multipart without a file part": (
            {"files": {"image": ("a.jpg", jpeg, "image/jpeg")}, "data": {"note": "x"}},
            400,
            "bad_request",
        ),
        "hundreds of parts": (
            {"files": [("file", (f"{i}.jpg", b"\xff\xd8\xff\xe0", "image/jpeg")) for i in range(300)]},
            413,
            "too_many_images",
        ),
        "a valid image among bad ones": (
            {"files": [("file", ("ok.jpg", jpeg, "image/jpeg")), ("file", ("bad.jpg", noise, "image/jpeg"))]},
            400,
            "invalid_image",
        ),
    }


def test_hostile_inputs_get_their_4xx_json_quickly_without_memory_growth(service, client, photos):
    corpus = hostile_corpus(photos)
    client.post("/predict", files={"file": ("warm.jpg", photos["coffee.jpg"])})  # steady state first
    rss_before = rss_bytes(service.proc.pid)
    slow: dict[str, float] = {}
    for _ in range(3):  # three rounds: anything that leaks shows up threefold
        for name, (kwargs, status, code) in corpus.items():
            for path in ("/predict", "/features"):
                started = time.perf_counter()
                response = client.post(path, **kwargs)
                elapsed = time.perf_counter() - started
                assert response.status_code == status, (name, path, response.text)
                assert response.headers["content-type"].startswith("application/json"), name
                error = response.json()["error"]
                assert error["code"] == code, (name, error)
                assert error["message"] and error["request_id"] == response.headers["x-request-id"]
                if elapsed > HOSTILE_SECONDS:
                    slow[f"{name} {path}"] = elapsed
    rss_after = rss_bytes(service.proc.pid)
    assert not slow, slow
    assert rss_after - rss_before < RSS_JUMP_LIMIT, (rss_before, rss_after)
    # The server keeps serving, and keeps getting it right.
    assert client.get("/readyz").status_code == 200
    response = client.post("/predict", files={"file": ("coffee.jpg", photos["coffee.jpg"])})
    assert response.status_code == 200
    assert response.json()["results"][0]["top_k"][0]["label"] == "espresso"


def test_header_declaring_too_many_pixels_is_refused_before_decoding(service, client):
    # 60000x60000 RGB would be 10.8 GB decoded; a refusal from the header takes milliseconds and no memory.
    bomb = png_declaring(60000, 60000, rows=20)
    rss_before = rss_bytes(service.proc.pid)
    started = time.perf_counter()
    response = client.post("/predict", content=bomb, headers={"Content-Type": "image/png"})
    assert time.perf_counter() - started < HOSTILE_SECONDS
    assert response.status_code == 413 and response.json()["error"]["code"] == "image_too_large"
    assert "limit" in response.json()["error"]["message"]
    assert rss_bytes(service.proc.pid) - rss_before < 50 * 2**20


# -- the body limit while reading -------------------------------------------------------------------------
class RawResponse:
    def __init__(self, raw: bytes) -> None:
        head, _, self.body = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1])
        self.headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:] if line)}

    def json(self) -> dict:
        return json.loads(self.body)


def raw_post(
    port: int, headers: dict[str, str], body: Iterator[bytes] | None, *, chunked: bool, timeout: float = 30.0
) -> RawResponse:
    """POST /predict over a plain socket, sending ``body`` only while the server has not answered yet.

    An HTTP client library would insist on writing the whole body before reading the answer; this one
    stops writing as soon as the answer arrives (or the server closes), so the caller can count how much
    of the body was ever pulled from its generator.
    """
    lines = ["POST /predict HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        sock.setblocking(False)
        received = b""
        pending = b""
        sending = body is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            readable, writable, _ = select.select([sock], [sock] if sending else [], [], 0.5)
            if readable:
                try:
                    data = sock.recv(65536)
                except ConnectionResetError:
                    break
                if not data:
                    break
                received += data
                if b"\r\n\r\n" in received:
                    length = RawResponse(received).headers.get("content-length")
                    if length is not None and len(received.partition(b"\r\n\r\n")[2]) >= int(length):
                        break
                continue
            if writable:
                if not pending:
                    piece = next(body, None)  # type: ignore[arg-type]
                    if piece is None:
                        pending = b"0\r\n\r\n" if chunked else b""
                        sending = False
                    else:
                        pending = (f"{len(piece):x}\r\n".encode() + piece + b"\r\n") if chunked else piece
                try:
                    while pending:
                        sent = sock.send(pending)
                        pending = pending[sent:]
                except BlockingIOError:
                    pass
                except (BrokenPipeError, ConnectionResetError):
                    sending = False
        assert received, "no answer from the server"
        return RawResponse(received)
    finally:
        sock.close()


class CountingBody:
    """A body of ``total`` bytes produced 64 KiB at a time, counting how much was pulled from it."""

    def __init__(self, total: int, prefix: bytes = b"") -> None:
        self.total = total
        self.pulled = 0
        self.prefix = prefix

    def __iter__(self) -> Iterator[bytes]:
        if self.prefix:
            self.pulled += len(self.prefix)
            yield self.prefix
        block = os.urandom(65536)
        while self.pulled < self.total:
            self.pulled += len(block)
            yield block


TWO_HUNDRED_MB = 200 * 2**20


@pytest.mark.parametrize("encoding", ["raw image", "multipart"])
def test_chunked_body_over_the_limit_is_refused_while_reading(service, encoding):
    if encoding == "multipart":
        boundary = "reliability-boundary"
        headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        prefix = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="huge.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
    else:
        headers, prefix = {"Content-Type": "image/jpeg"}, b""
    body = CountingBody(TWO_HUNDRED_MB, prefix)
    rss_before = rss_bytes(service.proc.pid)
    started = time.perf_counter()
    response = raw_post(service.port, headers, iter(body), chunked=True)
    elapsed = time.perf_counter() - started
    assert response.status == 413, response.body
    assert response.json()["error"]["code"] == "body_too_large"
    # The server stopped reading just past the 1 MB limit: only socket buffers' worth more was ever sent.
    assert body.pulled < 40 * 2**20, body.pulled
    assert elapsed < 10, elapsed
    assert rss_bytes(service.proc.pid) - rss_before < 50 * 2**20
    with httpx.Client(base_url=service.url) as client:
        assert client.get("/readyz").status_code == 200


def test_declared_content_length_over_the_limit_is_refused_at_once(service):
    started = time.perf_counter()
    # Not a byte of the body is sent: the answer must come from the header alone.
    response = raw_post(
        service.port, {"Content-Type": "image/jpeg", "Content-Length": str(TWO_HUNDRED_MB)}, None, chunked=False
    )
    assert time.perf_counter() - started < HOSTILE_SECONDS
    assert response.status == 413
    assert response.json()["error"]["code"] == "body_too_large"
    assert str(TWO_HUNDRED_MB) in response.json()["error"]["message"]
    assert response.headers.get("connection") == "close"


def test_a_body_just_under_the_limit_is_read(service, coffee):
    # The limit refuses only what is over it: a valid image padded to just under 1 MB is a 200.
    image = encode(coffee, "BMP")
    data = image + b"\x00" * (MAX_BODY - 4096 - len(image))  # BMP ignores trailing bytes
    with httpx.Client(base_url=service.url, timeout=60) as client:
        response = client.post("/predict", content=data, headers={"Content-Type": "image/bmp"})
    assert response.status_code == 200, response.text


# -- request ids in the access log -----------------------------------------------------------------------------
def test_generated_request_id_is_echoed_and_in_the_json_access_log(service, client):
    response = client.post("/predict", content=b"not an image", headers={"Content-Type": "image/jpeg"})
    request_id = response.headers["x-request-id"]
    assert len(request_id) == 32 and response.json()["error"]["request_id"] == request_id
    deadline = time.monotonic() + 5
    while True:
        entries = []
        for line in service.logs().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("request_id") == request_id and entry.get("logger") == "service.access":
                entries.append(entry)
        if entries or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    (entry,) = entries
    assert entry["path"] == "/predict" and entry["status"] == 400 and entry["method"] == "POST"
    assert entry["reject_reason"] == "invalid_image" and entry["duration_s"] >= 0
