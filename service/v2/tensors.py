"""Tensor encodings of the Open Inference Protocol: datatypes, raw little-endian bytes, JSON data.

Raw bytes are what gRPC's ``raw_input_contents`` / ``raw_output_contents`` and the REST binary-data
extension carry: numeric elements little-endian in row-major order, and each BYTES element as a 4-byte
little-endian length followed by its bytes. Every malformed tensor is a ``BadRequest`` saying which one.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np

from service.core.errors import BadRequest

# The protocol's datatypes and their little-endian numpy dtypes (BYTES elements are Python bytes).
NUMPY_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
DATATYPES = (*NUMPY_DTYPES, "BYTES")
_LENGTH = struct.Struct("<I")


def element_count(shape: Sequence[int], name: str) -> int:
    """Elements of a tensor of ``shape``; ``BadRequest`` for a negative or absurd dimension."""
    if any(not isinstance(d, int) or isinstance(d, bool) or d < 0 for d in shape):
        raise BadRequest(f"input '{name}': shape {list(shape)} must be non-negative integers")
    count = math.prod(shape)
    if count > 2**40:
        raise BadRequest(f"input '{name}': shape {list(shape)} is too large")
    return count


def check_datatype(datatype: str, name: str) -> None:
    if datatype not in DATATYPES:
        raise BadRequest(f"input '{name}': unknown datatype '{datatype}' (one of {', '.join(DATATYPES)})")


def serialize_bytes(elements: Sequence[bytes]) -> bytes:
    """BYTES elements -> raw form: each element prefixed by its 4-byte little-endian length."""
    return b"".join(_LENGTH.pack(len(e)) + e for e in elements)


def deserialize_bytes(raw: bytes | memoryview, name: str) -> list[bytes]:
    """Raw BYTES contents -> the elements (each a bytes object)."""
    view = memoryview(raw)
    elements: list[bytes] = []
    offset = 0
    while offset < len(view):
        if offset + 4 > len(view):
            raise BadRequest(f"input '{name}': BYTES data ends inside an element's 4-byte length prefix")
        (length,) = _LENGTH.unpack_from(view, offset)
        offset += 4
        if offset + length > len(view):
            raise BadRequest(
                f"input '{name}': BYTES element {len(elements) + 1} declares {length} bytes, "
                f"only {len(view) - offset} remain"
            )
        elements.append(bytes(view[offset : offset + length]))
        offset += length
    return elements


def from_raw(raw: bytes | memoryview, datatype: str, shape: Sequence[int], name: str) -> np.ndarray | list[bytes]:
    """Raw contents of one tensor -> a numpy array of ``shape`` (or the list of BYTES elements)."""
    check_datatype(datatype, name)
    count = element_count(shape, name)
    if datatype == "BYTES":
        elements = deserialize_bytes(raw, name)
        if len(elements) != count:
            raise BadRequest(f"input '{name}': shape {list(shape)} needs {count} BYTES elements, got {len(elements)}")
        return elements
    dtype = NUMPY_DTYPES[datatype]
    expected = count * dtype.itemsize
    if len(raw) != expected:
        raise BadRequest(
            f"input '{name}': {datatype} shape {list(shape)} needs {expected} bytes of data, got {len(raw)}"
        )
    return np.frombuffer(raw, dtype=dtype).reshape(tuple(shape))


def to_raw(data: np.ndarray | Sequence[bytes], datatype: str) -> bytes:
    """One output tensor -> raw contents."""
    if datatype == "BYTES":
        return serialize_bytes(data)  # type: ignore[arg-type]
    return np.ascontiguousarray(data, dtype=NUMPY_DTYPES[datatype]).tobytes()


# Nesting of a tensor's JSON ``data``: a tensor has at most this many dimensions (the protocol's own
# clients flatten it; an image batch nests 4 deep).
MAX_DATA_DEPTH = 16


def _flatten(data: Any, out: list[Any], name: str) -> None:
    """Nested lists -> ``out``, row-major; iterative, and ``BadRequest`` beyond ``MAX_DATA_DEPTH``."""
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                if len(stack) >= MAX_DATA_DEPTH:
                    raise BadRequest(f"input '{name}': 'data' nests deeper than {MAX_DATA_DEPTH} levels")
                stack.append(iter(item))
                break
            out.append(item)
        else:
            stack.pop()


def from_json(data: Any, datatype: str, shape: Sequence[int], name: str) -> np.ndarray | list[Any]:
    """JSON ``data`` (nested or flat, row-major) -> a numpy array of ``shape`` (BYTES: the list of
    elements as JSON gave them, strings)."""
    check_datatype(datatype, name)
    count = element_count(shape, name)
    flat: list[Any] = []
    _flatten(data if isinstance(data, list) else [data], flat, name)
    if len(flat) != count:
        raise BadRequest(f"input '{name}': shape {list(shape)} needs {count} elements, 'data' has {len(flat)}")
    if datatype == "BYTES":
        if not all(isinstance(e, str) for e in flat):
            raise BadRequest(f"input '{name}': BYTES elements in JSON must be strings")
        return flat
    dtype = NUMPY_DTYPES[datatype]
    if datatype == "BOOL":
        if not all(isinstance(e, bool) for e in flat):
            raise BadRequest(f"input '{name}': BOOL elements must be true or false")
    elif not all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in flat):
        raise BadRequest(f"input '{name}': {datatype} elements must be numbers")
    try:
        array = np.array(flat, dtype=dtype if dtype.kind != "f" else np.float64)
        if dtype.kind in "iu" and not np.array_equal(array, np.array(flat, dtype=object)):
            raise OverflowError
        return array.astype(dtype).reshape(tuple(shape))
    except (OverflowError, ValueError):
        raise BadRequest(f"input '{name}': an element does not fit {datatype}") from None


def to_json(data: np.ndarray | Sequence[bytes], datatype: str) -> list[Any]:
    """One output tensor -> flat JSON data (BYTES elements as UTF-8 strings)."""
    if datatype == "BYTES":
        return [e.decode("utf-8", errors="replace") for e in data]  # type: ignore[union-attr]
    return np.asarray(data).ravel().tolist()
