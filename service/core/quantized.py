"""The int8 model behind ``EFFNET_DTYPE=int8``: a file the operator baked, or quantised here and cached.

With ``EFFNET_INT8_MODEL`` the file is served as it is (checked against the variant's input and outputs).
Otherwise the model is quantised at start-up on the photos in ``EFFNET_CALIBRATION_DIR``, read with the
service's own preprocessing, and cached under ``EFFNET_CACHE_DIR`` so that a restart does not quantise
again. A cache entry is keyed by everything that changes its content: variant, input size, weights
SHA-256, calibration set (names and bytes), the quantisation recipe, and the onnx, onnxruntime and torch
versions. An entry is trusted only when its metadata parses, names the same key and records the SHA-256
of the model bytes beside it, and the model then loads; anything else is rebuilt (and overwritten). A
cache folder that other users can write to is not read at all (a shared /tmp must not plant a model).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from model.quantize import (
    RECIPE,
    CalibrationError,
    calibration_digest,
    calibration_files,
    load_calibration_set,
    quantize_model,
    read_metadata,
)
from service.core.errors import StartupError
from service.core.models import Int8Info

log = logging.getLogger("service.core.quantized")


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torch

    return {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "torch": torch.__version__}


def cache_key(variant: str, image_size: int, weights_sha256: str, calibration_sha256: str) -> str:
    """SHA-256 of everything that determines a quantised model's bytes."""
    parts = {"variant": variant, "image_size": image_size, "weights_sha256": weights_sha256,
             "calibration_sha256": calibration_sha256, "recipe": RECIPE, **_versions()}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _float_or_none(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _info(model: bytes, source: str, cache_hit: bool | None, cache_file: str | None) -> Int8Info:
    meta = read_metadata(model)
    return Int8Info(source=source, recipe=meta.get("recipe"),
                    calibration_count=_int_or_none(meta.get("calibration_count")),
                    calibration_sha256=meta.get("calibration_sha256"),
                    held_out_agreement=_float_or_none(meta.get("held_out_agreement")),
                    cache_hit=cache_hit, cache_file=cache_file)


def _private_folder(folder: Path) -> bool:
    """Whether only this user can write in ``folder``: a model planted by someone else is never loaded."""
    try:
        st = folder.stat()
    except OSError:
        return False
    return st.st_uid == os.getuid() and not st.st_mode & 0o022


def _read_cache(model_path: Path, meta_path: Path, key: str) -> bytes | None:
    """The cached model bytes when the entry is whole and is the one asked for; else None (with a reason)."""
    if not model_path.exists() and not meta_path.exists():
        return None
    if not _private_folder(model_path.parent):
        log.warning("int8 cache folder %s is writable by other users or not ours; not using its entries",
                    model_path.parent)
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        model = model_path.read_bytes()
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        log.warning("int8 cache entry %s is unreadable (%s); rebuilding it", model_path.name, type(exc).__name__)
        return None
    if not isinstance(meta, dict) or meta.get("key") != key:
        log.warning("int8 cache entry %s belongs to another key; rebuilding it", model_path.name)
        return None
    if meta.get("sha256") != hashlib.sha256(model).hexdigest():
        log.warning("int8 cache entry %s is corrupt (SHA-256 mismatch); rebuilding it", model_path.name)
        return None
    return model


def _write_cache(model_path: Path, meta_path: Path, key: str, model: bytes) -> bool:
    """Write the entry atomically (model first, then the metadata that vouches for it); False on failure."""
    try:
        model_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        for path, data in ((model_path, model),
                           (meta_path, json.dumps({"key": key, "sha256": hashlib.sha256(model).hexdigest()},
                                                  indent=1).encode())):
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
    except OSError as exc:
        log.warning("cannot write the int8 cache under %s (%s); the next start will quantise again",
                    model_path.parent, exc)
        return False
    return True


def int8_engine(
    *, net: Any, variant: str, image_size: int, weights_sha256: str | None, calibration_dir: str | None,
    int8_model: str | None, cache_dir: str, read: Callable[[bytes], np.ndarray], build: Callable[[bytes], Any],
) -> tuple[Any, Int8Info]:
    """The int8 engine (``build(model_bytes)``) and how its model was obtained.

    ``read`` turns a calibration file's bytes into the uint8 CHW array the engine is fed (the service's
    own preprocessing). Raises ``StartupError`` with one clear sentence when there is nothing to serve.
    """
    if int8_model:
        try:
            model = Path(int8_model).read_bytes()
        except OSError as exc:
            raise StartupError(f"cannot read EFFNET_INT8_MODEL {int8_model}: {exc.strerror or exc}") from None
        engine = build(model)
        info = _info(model, "file", None, None)
        meta_variant = read_metadata(model).get("variant")
        if meta_variant and meta_variant != variant:
            raise StartupError(f"EFFNET_INT8_MODEL {int8_model} was quantised from {meta_variant}, not {variant}")
        return engine, info
    if not calibration_dir:
        raise StartupError(
            "EFFNET_DTYPE=int8 needs EFFNET_CALIBRATION_DIR (a folder of at least 32 representative photos) "
            "or EFFNET_INT8_MODEL (a model made by python -m model.quantize)"
        )
    try:
        calibration_sha256 = calibration_digest(calibration_files(calibration_dir))
    except CalibrationError as exc:
        raise StartupError(f"EFFNET_CALIBRATION_DIR: {exc}") from None
    except OSError as exc:
        raise StartupError(f"EFFNET_CALIBRATION_DIR: cannot read {calibration_dir}: {exc}") from None

    cacheable = weights_sha256 is not None  # random weights differ at every start: never cached
    key = cache_key(variant, image_size, weights_sha256 or "random", calibration_sha256)
    model_path = Path(cache_dir, f"{variant}-int8-{key[:32]}.onnx")
    meta_path = model_path.with_suffix(".json")
    if cacheable:
        cached = _read_cache(model_path, meta_path, key)
        if cached is not None:
            try:
                engine = build(cached)
            except Exception as exc:  # a whole file that still does not load: rebuild, never serve it
                log.warning("int8 cache entry %s does not load (%s); rebuilding it", model_path.name, exc)
            else:
                log.info("int8 model from the cache: %s", model_path)
                return engine, _info(cached, "calibrated", True, str(model_path))

    try:
        calibration = load_calibration_set(calibration_dir, read)
    except CalibrationError as exc:
        raise StartupError(f"EFFNET_CALIBRATION_DIR: {exc}") from None
    log.info("quantising %s to int8 on %d calibration photos (%d skipped)", variant, len(calibration.images),
             len(calibration.skipped))
    result = quantize_model(net, calibration, image_size=image_size,
                            metadata={"weights_sha256": weights_sha256 or "random", "cache_key": key})
    log.info("int8 top-1 agreement with float32 on %d held-out calibration photos: %.1f%%",
             result.held_out, 100 * result.agreement)
    engine = build(result.model)
    written = cacheable and _write_cache(model_path, meta_path, key, result.model)
    return engine, _info(result.model, "calibrated", False, str(model_path) if written else None)


__all__ = ["Int8Info", "cache_key", "int8_engine"]
