"""Finding the images under the PATHs given on the command line.

A file named on the command line is always taken (if it is not an image, its row says so). Inside a
folder, walked recursively in sorted order, a file is taken when its name has an image extension or its
first bytes are an image signature: photos without an extension (camera dumps, content-addressed stores)
are found, and a ``broken.jpg`` that holds no image gets an error row rather than being silently left out.
Anything else (README, .csv, .json) is ignored and counted. Names starting with a dot (``.git``, macOS's
``._IMG_0001.jpg``) are skipped inside folders; symbolic links to files are followed, links to folders are
not (no cycles).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field

from service.core.imaging import ACCEPTED_EXTENSIONS

# Extensions of formats the service decodes, plus image formats it does not (JPEG XL, JPEG 2000): a file
# with one of those is meant as an image, so it gets a row saying why it could not be read.
IMAGE_EXTENSIONS = frozenset({*ACCEPTED_EXTENSIONS, ".apng", ".heics", ".heifs", ".avifs", ".jxl", ".jp2"})
# Major brands of HEIC/HEIF (ISO/IEC 23008-12) and AVIF: an iPhone photo without its .HEIC name is found.
_HEIF_BRANDS = {
    b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"heif", b"mif1", b"mif2", b"msf1", b"avif", b"avis",
}
_BMP_DIB_SIZES = {12, 40, 52, 56, 64, 108, 124}
SNIFF_BYTES = 32


def looks_like_image(head: bytes) -> bool:
    """Whether ``head`` (a file's first bytes) starts with the signature of an image format."""
    if head.startswith((b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"II*\x00", b"MM\x00*")):
        return True
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return True
    if head[:2] == b"BM" and len(head) >= 18:
        # "BM" alone is too weak (a text file may start with it): also require a known DIB header size.
        return int.from_bytes(head[14:18], "little") in _BMP_DIB_SIZES
    if head[4:8] == b"ftyp" and head[8:12] in _HEIF_BRANDS:
        return True
    return head.startswith((b"\xff\x0a", b"\x00\x00\x00\x0cJXL \r\n\x87\n"))


def _is_image_file(path: str) -> bool:
    if os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS:
        return True
    try:
        with open(path, "rb") as f:
            return looks_like_image(f.read(SNIFF_BYTES))
    except OSError:
        return False  # unreadable and not named like an image: not ours to report


@dataclass
class Discovery:
    images: list[str] = field(default_factory=list)  # normalised paths, each once, in walk order
    ignored: int = 0  # files inside folders that are not images
    missing: list[str] = field(default_factory=list)  # PATHs that do not exist
    unreadable_dirs: list[tuple[str, str]] = field(default_factory=list)  # (folder, reason)


def discover(paths: Iterable[str]) -> Discovery:
    """The images under ``paths`` (files and folders), each once, in command-line then walk order."""
    found = Discovery()
    seen: set[str] = set()

    def add(path: str) -> None:
        path = os.path.normpath(path)
        if path not in seen:
            seen.add(path)
            found.images.append(path)

    def on_error(exc: OSError) -> None:
        found.unreadable_dirs.append((exc.filename or "?", exc.strerror or str(exc)))

    for given in paths:
        if os.path.isdir(given):
            for root, dirs, files in os.walk(given, onerror=on_error, followlinks=False):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(files):
                    if name.startswith("."):
                        continue
                    path = os.path.join(root, name)
                    if not os.path.isfile(path):  # a broken link, a socket, a fifo
                        found.ignored += 1
                    elif _is_image_file(path):
                        add(path)
                    else:
                        found.ignored += 1
        elif os.path.lexists(given):
            add(given)
        else:
            found.missing.append(given)
    return found
