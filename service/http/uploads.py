"""Reading the uploaded images of /predict and /features from the request body.

Both endpoints take either ``multipart/form-data`` with one or more parts named ``file`` or a raw body
with an ``image/*`` (or ``application/octet-stream``) content type. The body is parsed here rather than
by FastAPI parameters because the two encodings share one endpoint; its OpenAPI description is written
out in ``IMAGE_REQUEST_BODY``.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from service.core.errors import BadRequest, ClientGone, ServiceError, UnsupportedMediaType
from service.core.imaging import ACCEPTED_MEDIA_TYPES, formats_text
from service.core.runtime import ServedModel

# Raw-body content types accepted besides multipart (the core's list). Other image/* types (svg+xml, jxl,
# ...) are 415. The declared type only admits the body: the decoder goes by the content.
RAW_IMAGE_TYPES = (*ACCEPTED_MEDIA_TYPES, "application/octet-stream")
_BINARY = {"type": "string", "format": "binary"}
IMAGE_REQUEST_BODY: dict[str, Any] = {
    "required": True,
    "description": (
        "Either multipart/form-data with one or more parts named `file`, or the raw bytes of one image. "
        f"Accepted formats: {formats_text('and')} (the first frame of an animation), recognised by content."
    ),
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {"file": {"type": "array", "items": _BINARY, "minItems": 1}},
                "required": ["file"],
            }
        },
        **{media: {"schema": _BINARY} for media in RAW_IMAGE_TYPES if media != "image/jpg"},
    },
}


async def read_images(request: Request, model: ServedModel) -> list[tuple[str | None, bytes]]:
    """The uploaded images as (filename, bytes). A client that hangs up mid-upload raises ``ClientGone``
    (answered 499 ``client_gone``, like one that leaves while queued), not a 500 or a 400."""
    content_type = request.headers.get("content-type", "")
    media = content_type.split(";", 1)[0].strip().lower()
    # The parser stops at the core's image limit instead of reading every part of an oversized request.
    cap = model.max_images_per_request
    if media == "multipart/form-data":
        parser = MultiPartParser(
            request.headers, request.stream(), max_files=cap, max_fields=16, max_part_size=64 * 1024
        )
        try:
            form = await parser.parse()
        except ServiceError:
            raise
        except ClientDisconnect:
            raise ClientGone() from None
        except MultiPartException as exc:
            if exc.message.startswith("Too many files"):
                model.check_image_count(None)
            raise BadRequest(f"invalid multipart body: {exc.message}") from None
        except Exception as exc:  # python-multipart errors on malformed bodies
            raise BadRequest(f"invalid multipart body ({type(exc).__name__})") from None
        try:
            parts = form.getlist("file")
            if not parts:
                raise BadRequest("multipart body has no part named 'file'")
            blobs: list[tuple[str | None, bytes]] = []
            for part in parts:
                if not isinstance(part, UploadFile):
                    raise BadRequest("part 'file' must be a file upload (with a filename)")
                name = (part.filename or None) and part.filename[:255]
                blobs.append((name, await part.read()))
            return blobs
        finally:
            await form.close()
    if media.startswith("image/") or media == "application/octet-stream":
        if media not in RAW_IMAGE_TYPES:
            raise UnsupportedMediaType(
                f"unsupported image type {media}; accepted: {formats_text()}"
            )
        try:
            return [(None, await request.body())]
        except ClientDisconnect:
            raise ClientGone() from None
    raise UnsupportedMediaType(
        f"unsupported content type {media or '(none)'}: send multipart/form-data with 'file' parts "
        "or a raw image body with an image/* content type"
    )
