"""The V2 protocol's codecs and REST front-end in-process, with a stand-in engine: BYTES length prefixes,
the binary-data extension's framing, JSON tensors, the FP32-to-pixel mapping that never rounds silently,
compressed bodies, the protocol's error shape (also for the body limit), and the committed gRPC code being
exactly what the .proto generates.

The gRPC server itself is tested against a real process with tritonclient (tests/integration/test_v2_*):
its generated modules and tritonclient's register the same protobuf names, so they never share a process.
"""

from __future__ import annotations

import gzip
import json
import os
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.core.errors import BadRequest
from service.core.runtime import check_pixels
from service.v2 import tensors
from service.v2.rest import HEADER_LENGTH, parse_infer_request
from tests.helpers.fakes import ESPRESSO, FakeEngine, app_with_engine

REPO = Path(__file__).resolve().parents[2]
MODEL = "efficientnet-lite0"
INFER = f"/v2/models/{MODEL}/infer"


@contextmanager
def ready_client(engine: FakeEngine, **settings) -> Iterator[TestClient]:
    with TestClient(app_with_engine(engine, warmup=False, **settings)) as client:
        deadline = time.monotonic() + 10
        while client.get("/v2/health/ready").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        yield client


# -- codecs ------------------------------------------------------------------------------------------------
def test_bytes_elements_are_length_prefixed_little_endian():
    raw = tensors.serialize_bytes([b"ab", b"", b"\x00\xff"])
    assert raw == struct.pack("<I", 2) + b"ab" + struct.pack("<I", 0) + struct.pack("<I", 2) + b"\x00\xff"
    assert tensors.deserialize_bytes(raw, "x") == [b"ab", b"", b"\x00\xff"]
    with pytest.raises(BadRequest, match="length prefix"):
        tensors.deserialize_bytes(raw[:-5] + b"\x01", "x")
    with pytest.raises(BadRequest, match="declares 9 bytes"):
        tensors.deserialize_bytes(struct.pack("<I", 9) + b"abc", "x")


def test_raw_and_json_tensors_check_shape_and_type():
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    raw = tensors.to_raw(array, "FP32")
    np.testing.assert_array_equal(tensors.from_raw(raw, "FP32", [2, 3], "t"), array)
    with pytest.raises(BadRequest, match="needs 24 bytes"):
        tensors.from_raw(raw[:-1], "FP32", [2, 3], "t")
    np.testing.assert_array_equal(tensors.from_json([[0, 1, 2], [3, 4, 5]], "FP32", [2, 3], "t"), array)
    with pytest.raises(BadRequest, match="needs 6 elements"):
        tensors.from_json([1, 2], "FP32", [2, 3], "t")
    with pytest.raises(BadRequest, match="does not fit UINT8"):
        tensors.from_json([300], "UINT8", [1], "t")
    with pytest.raises(BadRequest, match="unknown datatype"):
        tensors.from_json([1], "FLOAT", [1], "t")
    with pytest.raises(BadRequest, match="non-negative"):
        tensors.from_json([1], "FP32", [-1], "t")
    assert tensors.to_json([b"0.5:1:a"], "BYTES") == ["0.5:1:a"]


def test_binary_data_framing_takes_each_inputs_bytes_in_order():
    head = {
        "id": "r1",
        "inputs": [
            {"name": "a", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": 13}},
            {"name": "b", "datatype": "UINT8", "shape": [3], "parameters": {"binary_data_size": 3}},
        ],
        "outputs": [{"name": "logits", "parameters": {"classification": 2}}],
    }
    text = json.dumps(head).encode()
    body = text + tensors.serialize_bytes([b"xyzab", b""]) + bytes([1, 2, 3])
    request, inputs, outputs = parse_infer_request(body, str(len(text)))
    assert request["id"] == "r1"
    assert inputs[0].data == [b"xyzab", b""]
    np.testing.assert_array_equal(inputs[1].data, [1, 2, 3])
    assert outputs is not None and outputs[0].classification == 2
    with pytest.raises(BadRequest, match="belong to no input"):
        parse_infer_request(body + b"!", str(len(text)))
    with pytest.raises(BadRequest, match="exceeds the binary data"):
        parse_infer_request(body[:-1], str(len(text)))
    with pytest.raises(BadRequest, match=HEADER_LENGTH):
        parse_infer_request(body, str(len(body) + 1))


def test_float_input_goes_to_the_engine_as_sent_and_nan_is_refused():
    """A float tensor is the network's input as sent (any finite values, float64 narrowed to float32);
    uint8 pixels stay uint8; NaN, infinity, a value beyond float32 and integer tensors are BadRequests."""
    off_grid = np.linspace(-5, 5, 3 * 4 * 4, dtype=np.float32).reshape(1, 3, 4, 4)
    assert check_pixels(off_grid) is off_grid
    wide = check_pixels(off_grid.astype(np.float64))
    assert wide.dtype == np.float32 and np.array_equal(wide, off_grid)
    pixels = np.zeros((1, 3, 4, 4), dtype=np.uint8)
    assert check_pixels(pixels) is pixels
    for bad, match in ((np.nan, "NaN"), (np.inf, "NaN or infinite"), (1e300, "float32")):
        batch = np.zeros((1, 3, 4, 4), dtype=np.float64)
        batch[0, 1, 2, 3] = bad
        with pytest.raises(BadRequest, match=match):
            check_pixels(batch)
    with pytest.raises(BadRequest, match="int16"):
        check_pixels(np.zeros((1, 3, 4, 4), dtype=np.int16))


def test_json_nested_deeper_than_the_decoder_goes_is_a_400():
    """100,000 levels of nesting anywhere in the JSON (not only in 'data'), and data nested deeper than a
    tensor could be, are BadRequests, not a RecursionError."""
    deep = b"[" * 100_000 + b"]" * 100_000
    for body in (deep, b'{"inputs": ' + deep + b"}", b'{"id": "x", "parameters": {"a": ' + deep + b"}}"):
        with pytest.raises(BadRequest, match="nests too deeply"):
            parse_infer_request(body, None)
    data: list = [1.0]
    for _ in range(20):
        data = [data]
    nested = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1], "data": data}]}
    with pytest.raises(BadRequest, match="nests deeper"):
        parse_infer_request(json.dumps(nested).encode(), None)
    with pytest.raises(BadRequest, match="'id' must be a string"):
        parse_infer_request(b'{"id": [[[[1]]]], "inputs": [{"name": "image", "datatype": "BYTES", "shape": [0], '
                            b'"data": []}]}', None)


def test_committed_grpc_code_is_what_the_proto_generates():
    env = {**os.environ, "PY": sys.executable}  # grpcio-tools of the interpreter running the tests
    result = subprocess.run(["bash", "scripts/gen_protos.sh", "--check"], cwd=REPO, capture_output=True, text=True,
                            env=env)
    assert result.returncode == 0, result.stderr


# -- the REST front-end in-process ---------------------------------------------------------------------------
def test_json_infer_with_classification_and_id(jpeg):
    import base64

    with ready_client(FakeEngine()) as client:
        body = {
            "id": "abc",
            "inputs": [{"name": "image", "datatype": "BYTES", "shape": [2],
                        "data": [base64.b64encode(jpeg).decode()] * 2}],
            "outputs": [{"name": "probabilities", "parameters": {"classification": 1}}, {"name": "features"}],
        }
        response = client.post(INFER, json=body)
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["id"] == "abc" and answer["model_name"] == MODEL and answer["model_version"] == "1"
        probs, features = answer["outputs"]
        assert probs["datatype"] == "BYTES" and probs["shape"] == [2, 1]
        assert probs["data"][0].split(":")[1:] == [str(ESPRESSO), "espresso"]
        assert features["shape"] == [2, 1280] and len(features["data"]) == 2 * 1280


def test_binary_output_and_gzip_request(jpeg):
    with ready_client(FakeEngine()) as client:
        head = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                            "parameters": {"binary_data_size": 4 + len(jpeg)}}],
                "parameters": {"binary_data_output": True}}
        text = json.dumps(head).encode()
        body = gzip.compress(text + tensors.serialize_bytes([jpeg]))
        response = client.post(INFER, content=body, headers={HEADER_LENGTH: str(len(text)), "Content-Encoding": "gzip"})
        assert response.status_code == 200, response.text
        size = int(response.headers[HEADER_LENGTH])
        answer = json.loads(response.content[:size])
        sizes = [o["parameters"]["binary_data_size"] for o in answer["outputs"]]
        assert [o["name"] for o in answer["outputs"]] == ["logits", "probabilities", "features"]
        assert sizes == [4000, 4000, 5120] and len(response.content) == size + sum(sizes)
        logits = np.frombuffer(response.content[size : size + 4000], dtype="<f4")
        assert int(np.argmax(logits)) == ESPRESSO
        response = client.post(INFER, content=b"{}", headers={"Content-Encoding": "br"})
        assert response.status_code == 415 and "br" in response.json()["error"]


def test_errors_use_the_protocols_shape():
    with ready_client(FakeEngine(), max_body_bytes=4096, api_key="k") as client:
        auth = {"Authorization": "Bearer k"}
        cases = [
            (client.post("/v2/models/other/infer", json={}, headers=auth), 404),
            (client.post(INFER, json={"inputs": []}, headers=auth), 400),
            (client.post(INFER, content=b"x" * 5000, headers=auth), 413),  # the body limit, before any parsing
            (client.post(INFER, json={"inputs": []}), 401),
            (client.get(f"/v2/models/{MODEL}/versions/2"), 404),
        ]
        for response, status in cases:
            assert response.status_code == status, response.text
            assert set(response.json()) == {"error"} and isinstance(response.json()["error"], str)
        assert client.get(f"/v2/models/{MODEL}/versions/1/ready").json() == {"name": MODEL, "ready": True}
