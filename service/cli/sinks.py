"""Output files, chosen by extension, written as results arrive and resumable.

- ``.jsonl``: one JSON object per image (``path``, then ``top_k``, ``embedding`` or ``error``), each line
  written and flushed as its result arrives. An interrupted run leaves whole lines; a line torn by a hard
  kill is dropped on ``--resume``.
- ``.parquet`` (needs pyarrow: the ``parquet`` extra): columns ``path``, ``top_k`` (list of struct
  index/label/score) or ``embedding`` (fixed-size list of float32), and ``error`` (struct code/message,
  null on success). Row groups go to ``<name>.parquet.partial`` and the file is renamed into place when
  the run ends, interrupted or not, so the output path only ever holds a complete file.
- ``.npy`` (features only): a float32 matrix, one row per image that succeeded, and ``<name>.paths.txt``
  beside it with the path of each row, one per line. The header's row count is rewritten after every
  row, so the file loads with ``numpy.load`` at any moment; errors are reported on stderr only.

``--resume`` reads the existing output: paths with a result are skipped; paths recorded with an error are
tried again (their old rows are removed first, so every path keeps one row).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import IO, Any

import numpy as np

from service.cli.results import Result


class OutputError(Exception):
    """The output cannot be opened, resumed or written (a message for the user)."""


FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".npy": "npy"}


def output_format(path: str, task: str) -> str:
    if path == "-":
        return "jsonl"
    fmt = FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise OutputError(f"cannot tell the output format of {path!r}: use a .jsonl, .parquet or .npy name")
    if fmt == "npy" and task != "features":
        raise OutputError(".npy holds embeddings: use it with 'features', or write predictions to .jsonl")
    return fmt


class Sink:
    """Where results go. ``done`` holds the paths already finished (from a resumed file)."""

    def __init__(self) -> None:
        self.done: set[str] = set()
        self.retried = 0  # error rows of a resumed file, removed so their paths run again

    def refuses(self, path: str) -> str | None:
        """Why this output cannot hold ``path`` (None: it can)."""
        return None

    def write(self, result: Result) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


def _atomic_write(path: Path, writer) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        writer(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _check_fresh(path: Path, resume: bool, overwrite: bool) -> bool:
    """Whether an existing output is to be resumed; refuses to replace one unless told to."""
    if not path.exists():
        return False
    if resume:
        return True
    if overwrite:
        return False
    raise OutputError(f"{path} exists: use --resume to continue it or --overwrite to replace it")


# ---- JSON lines ---------------------------------------------------------------------------------------------
class JsonlSink(Sink):
    def __init__(self, path: str, task: str, *, resume: bool = False, overwrite: bool = False) -> None:
        super().__init__()
        self.label = "stdout" if path == "-" else path
        self._key = "top_k" if task == "predict" else "embedding"
        if path == "-":
            if resume:
                raise OutputError("--resume needs an output file, not stdout")
            import sys

            # An unencodable character (a file name that is not valid UTF-8) becomes a \udcXX escape: the
            # same escape in JSON, so the line still parses back to the path os.walk gave.
            sys.stdout.reconfigure(errors="backslashreplace")
            self._file: IO[str] = sys.stdout
            self._own = False
            return
        target = Path(path)
        if _check_fresh(target, resume, overwrite):
            self._resume(target)
            self._file = open(target, "a", encoding="utf-8", errors="backslashreplace")
        else:
            self._file = open(target, "w", encoding="utf-8", errors="backslashreplace")
        self._own = True

    def _resume(self, path: Path) -> None:
        kept: list[bytes] = []
        dropped = 0
        other = "embedding" if self._key == "top_k" else "top_k"
        with open(path, "rb") as f:
            for raw in f:
                try:
                    row = json.loads(raw)
                    good = isinstance(row, dict) and isinstance(row.get("path"), str) and raw.endswith(b"\n")
                except ValueError:
                    good = False
                if not good:
                    dropped += 1  # a line torn by a hard kill, or not ours
                    continue
                if other in row:
                    kind = "predictions" if other == "top_k" else "embeddings"
                    raise OutputError(f"{path} holds {kind}; resume it with the command that wrote it")
                if self._key in row and row["path"] not in self.done:
                    self.done.add(row["path"])
                    kept.append(raw)
                else:
                    dropped += 1
                    self.retried += "error" in row
        if dropped:
            _atomic_write(path, lambda f: f.writelines(kept))

    def write(self, result: Result) -> None:
        self._file.write(json.dumps(result.as_json(), ensure_ascii=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._own:
            self._file.close()
        else:
            self._file.flush()


# ---- Parquet ------------------------------------------------------------------------------------------------
def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise OutputError(
            "writing .parquet needs pyarrow: pip install 'effnet-serve[parquet]' (or write .jsonl)"
        ) from None
    return pa, pq


class ParquetSink(Sink):
    ROWS_PER_GROUP = 1024
    SECONDS_PER_GROUP = 10.0

    def __init__(self, path: str, task: str, *, dim: int, resume: bool = False, overwrite: bool = False) -> None:
        super().__init__()
        pa, pq = self._pa, self._pq = _pyarrow()
        self.label = path
        self._task = task
        self.path = Path(path)
        error_type = pa.struct([("code", pa.string()), ("message", pa.string())])
        if task == "predict":
            value = ("top_k", pa.list_(pa.struct([("index", pa.int32()), ("label", pa.string()),
                                                  ("score", pa.float64())])))
        else:
            value = ("embedding", pa.list_(pa.float32(), dim))
        self.schema = pa.schema([("path", pa.string()), value, ("error", error_type)])
        self._partial = self.path.with_name(self.path.name + ".partial")
        previous = None
        if _check_fresh(self.path, resume, overwrite):
            previous = self._read_previous()
        self._writer = pq.ParquetWriter(self._partial, self.schema)
        if previous is not None and previous.num_rows:
            self._writer.write_table(previous)
        self._rows: list[Result] = []
        self._last_flush = time.monotonic()

    def _read_previous(self):
        pa, pq = self._pa, self._pq
        import pyarrow.compute as pc

        try:
            table = pq.read_table(self.path)
        except Exception as exc:
            raise OutputError(f"cannot resume {self.path}: not a readable Parquet file ({exc})") from None
        if table.schema.names != self.schema.names:
            raise OutputError(f"cannot resume {self.path}: its columns are {table.schema.names}, "
                              f"this run writes {self.schema.names}")
        try:
            table = table.cast(self.schema)
        except (pa.ArrowInvalid, ValueError) as exc:
            raise OutputError(f"cannot resume {self.path}: {exc}") from None
        total = table.num_rows
        table = table.filter(pc.is_null(table.column("error")))
        self.retried = total - table.num_rows
        self.done = set(table.column("path").to_pylist())
        return table

    def refuses(self, path: str) -> str | None:
        try:
            path.encode("utf-8")
        except UnicodeEncodeError:
            return "a file name that is not valid UTF-8 cannot be stored in a Parquet string column"
        return None

    def write(self, result: Result) -> None:
        self._rows.append(result)
        if len(self._rows) >= self.ROWS_PER_GROUP or time.monotonic() - self._last_flush > self.SECONDS_PER_GROUP:
            self._flush()

    def _flush(self) -> None:
        self._last_flush = time.monotonic()
        if not self._rows:
            return
        pa = self._pa
        rows, self._rows = self._rows, []
        columns: dict[str, Any] = {"path": [r.path for r in rows], "error": [r.error for r in rows]}
        if self._task == "predict":
            columns["top_k"] = [r.top_k for r in rows]
        else:
            columns["embedding"] = [None if r.embedding is None else r.embedding.astype(np.float32) for r in rows]
        self._writer.write_table(pa.Table.from_pydict(columns, schema=self.schema))

    def close(self) -> None:
        self._flush()
        self._writer.close()
        os.replace(self._partial, self.path)


# ---- .npy + .paths.txt --------------------------------------------------------------------------------------
_MAGIC = b"\x93NUMPY\x01\x00"
_HEADER_BYTES = 128  # magic + version + length + dict, padded: room for any row count


def _npy_header(rows: int, dim: int) -> bytes:
    text = f"{{'descr': '<f4', 'fortran_order': False, 'shape': ({rows}, {dim}), }}"
    body_len = _HEADER_BYTES - len(_MAGIC) - 2
    body = text.ljust(body_len - 1) + "\n"
    return _MAGIC + body_len.to_bytes(2, "little") + body.encode("ascii")


def paths_file(npy_path: str | Path) -> Path:
    """``embeddings.npy`` -> ``embeddings.paths.txt``: row i of the matrix is line i."""
    path = Path(npy_path)
    return path.with_name(path.stem + ".paths.txt")


class NpySink(Sink):
    def __init__(self, path: str, *, dim: int, resume: bool = False, overwrite: bool = False) -> None:
        super().__init__()
        self.label = path
        self.path = Path(path)
        self.dim = dim
        self._row_bytes = 4 * dim
        self._paths_path = paths_file(self.path)
        self.rows = 0
        if _check_fresh(self.path, resume, overwrite):
            self._resume()
            self._data = open(self.path, "r+b")
            self._data.seek(0, os.SEEK_END)
            self._paths = open(self._paths_path, "a", encoding="utf-8", errors="surrogateescape")
        else:
            self._data = open(self.path, "w+b")
            self._data.write(_npy_header(0, dim))
            self._data.flush()
            self._paths = open(self._paths_path, "w", encoding="utf-8", errors="surrogateescape")

    def _resume(self) -> None:
        with open(self.path, "rb") as f:
            try:
                version = np.lib.format.read_magic(f)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, fortran, dtype = read_header(f)
            except Exception as exc:
                raise OutputError(f"cannot resume {self.path}: not a .npy file ({exc})") from None
            offset = f.tell()
        if dtype != np.dtype("<f4") or fortran or len(shape) != 2 or shape[1] != self.dim:
            raise OutputError(f"cannot resume {self.path}: it holds {dtype} {shape}, this run writes float32 "
                              f"rows of {self.dim}")
        try:
            lines = self._paths_path.read_text(encoding="utf-8", errors="surrogateescape").split("\n")
        except FileNotFoundError:
            raise OutputError(f"cannot resume {self.path}: {self._paths_path} is missing") from None
        complete = lines[:-1]  # the text after the last newline is a torn line (or empty)
        stored = (self.path.stat().st_size - offset) // self._row_bytes
        rows = min(len(complete), stored)
        if offset != _HEADER_BYTES:  # written by something else: rewrite it in this layout
            matrix = np.load(self.path, mmap_mode="r")[:rows]
            _atomic_write(self.path, lambda f: (f.write(_npy_header(rows, self.dim)),
                                                f.write(np.ascontiguousarray(matrix, "<f4").tobytes())))
        else:
            with open(self.path, "r+b") as f:
                f.truncate(_HEADER_BYTES + rows * self._row_bytes)
                f.write(_npy_header(rows, self.dim))
        if rows != len(lines) - 1 or lines[-1]:
            text = "".join(p + "\n" for p in complete[:rows])
            _atomic_write(self._paths_path, lambda f: f.write(text.encode("utf-8", "surrogateescape")))
        self.rows = rows
        self.done = set(complete[:rows])

    def refuses(self, path: str) -> str | None:
        if "\n" in path or "\r" in path:
            return f"a path with a line break cannot be listed in {self._paths_path.name}"
        return None

    def write(self, result: Result) -> None:
        if result.embedding is None:
            return  # errors have no row; they are reported on stderr and counted
        self._data.write(np.ascontiguousarray(result.embedding, dtype="<f4").tobytes())
        self._data.flush()
        self._paths.write(result.path + "\n")
        self._paths.flush()
        self.rows += 1
        os.pwrite(self._data.fileno(), _npy_header(self.rows, self.dim), 0)

    def close(self) -> None:
        self._data.close()
        self._paths.close()


def open_sink(path: str, task: str, *, dim: int, resume: bool, overwrite: bool) -> Sink:
    fmt = output_format(path, task)
    if fmt == "jsonl":
        return JsonlSink(path, task, resume=resume, overwrite=overwrite)
    if fmt == "parquet":
        return ParquetSink(path, task, dim=dim, resume=resume, overwrite=overwrite)
    return NpySink(path, dim=dim, resume=resume, overwrite=overwrite)
