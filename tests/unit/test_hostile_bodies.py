"""Hostile bodies where a body is parsed outside the V2 JSON (which tests/unit/test_v2_rest.py and the
integration corpus cover): multipart uploads to /predict with thousands of fields or parts, or a part
header of a megabyte, are 4xx with a clear message, never a 500, and the app serves right afterwards."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from fastapi.testclient import TestClient

from tests.helpers.fakes import FakeEngine, app_with_engine

BOUNDARY = "hostile-boundary"


@contextmanager
def ready_client() -> Iterator[TestClient]:
    with TestClient(app_with_engine(FakeEngine(), warmup=False, max_body_bytes=8 * 1024 * 1024)) as client:
        deadline = time.monotonic() + 10
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        yield client


def _multipart(parts: list[tuple[str, bytes]]) -> bytes:
    """Parts given as (their header lines, their body)."""
    out = [f"--{BOUNDARY}\r\n{headers}\r\n\r\n".encode() + body + b"\r\n" for headers, body in parts]
    return b"".join(out) + f"--{BOUNDARY}--\r\n".encode()


FIELD = 'Content-Disposition: form-data; name="x"'
FILE = 'Content-Disposition: form-data; name="file"; filename="a.jpg"\r\nContent-Type: image/jpeg'
CASES = {
    "10,000 fields": (_multipart([(FIELD, b"1")] * 10_000), "fields"),
    "50,000 files": (_multipart([(FILE, b"x")] * 50_000), "images"),
    "a header of a megabyte": (_multipart([(FILE + "\r\nX-Long: " + "a" * (1 << 20), b"x")]), ""),
    "a field of a megabyte": (_multipart([(FIELD, b"a" * (1 << 20))]), "multipart"),
    "no closing boundary": (f"--{BOUNDARY}\r\n{FILE}\r\n\r\nxx".encode(), ""),
}


@pytest.mark.parametrize("case", CASES)
def test_hostile_multipart_is_4xx_never_500(case):
    body, word = CASES[case]
    with ready_client() as client:
        response = client.post("/predict", content=body,
                               headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})
        assert 400 <= response.status_code < 500, (case, response.status_code, response.text[:300])
        assert word in response.json()["error"]["message"].lower(), response.json()
        assert client.get("/readyz").status_code == 200
