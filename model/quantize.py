"""Static int8 quantisation of the model's ONNX export, calibrated on real photos (onnxruntime QDQ).

The recipe was chosen by measurement (docs/benchmarks.md, "Int8 recipe"): Lite0 calibrated on 100 ImageNet
photos and measured on 900 others. Per-channel int8 weights (per-tensor lost 8 points of top-1), uint8
activations with a zero point (symmetric int8 activations were slower and no better), min-max calibration
(entropy and percentile were no better and several times slower), every operator quantised except the
input normalisation (keeping the classifier in float32 bought nothing measurable; the normalisation's
per-channel mean/std constants are not weights to round to int8).

The float graph quantised is the export that takes the uint8 NCHW image and normalises it itself, so a
server hands the int8 model the same uint8 batch as the float one. The calibration photos are split by
name: every fifth is held out and never calibrated on, so the top-1 agreement with float32 reported on it
is an honest estimate for photos the model has not seen.

Command line::

    python -m model.quantize --variant efficientnet-lite0 [--weights W] --calibration-dir D --output M.onnx
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import logging
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .config import VARIANTS, PreprocessConfig
from .efficientnet import EfficientNet
from .preprocess import resize_and_crop
from .weights import WeightsError

log = logging.getLogger("model.quantize")

MIN_CALIBRATION_IMAGES = 32
# Beyond this many, calibration only adds start-up time: min-max ranges settle within ~100 photos.
MAX_CALIBRATION_IMAGES = 200
MAX_HELD_OUT_IMAGES = 200
HOLD_OUT_EVERY = 5
# Part of every cache key and of the artifact's metadata: bump it whenever the recipe changes.
RECIPE = "qdq-u8act-s8w-perchannel-minmax-floatnorm-v2"
METADATA_PREFIX = "effnet."


class CalibrationError(ValueError):
    """A calibration folder that cannot be used (missing, empty, or too few readable photos)."""


@dataclass
class CalibrationSet:
    """Readable calibration photos as uint8 (N, 3, S, S), in name order, and the files skipped."""

    images: np.ndarray
    names: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    sha256: str = ""

    def split(self) -> tuple[np.ndarray, np.ndarray]:
        """(photos to calibrate on, photos held out): every fifth by name is held out, each capped."""
        index = np.arange(len(self.images))
        held = index[index % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1]
        calibrate = index[index % HOLD_OUT_EVERY != HOLD_OUT_EVERY - 1]
        return self.images[_spread(calibrate, MAX_CALIBRATION_IMAGES)], self.images[_spread(held, MAX_HELD_OUT_IMAGES)]


def _spread(index: np.ndarray, limit: int) -> np.ndarray:
    """At most ``limit`` entries of ``index``, evenly spaced over it (deterministic)."""
    if len(index) <= limit:
        return index
    return index[np.linspace(0, len(index) - 1, limit).round().astype(int)]


def calibration_files(directory: str | Path) -> list[Path]:
    """The regular, non-hidden files directly in ``directory``, sorted by name."""
    path = Path(directory)
    if not path.is_dir():
        raise CalibrationError(f"calibration folder {directory} does not exist or is not a folder")
    try:
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    except OSError as exc:
        raise CalibrationError(f"cannot list calibration folder {directory}: {exc}") from None
    if not files:
        raise CalibrationError(
            f"calibration folder {directory} is empty; it needs at least {MIN_CALIBRATION_IMAGES} photos"
        )
    return files


def calibration_digest(files: Sequence[Path]) -> str:
    """SHA-256 over the names and contents of ``files``: the identity of a calibration set.

    Computed from the bytes alone, so a cache lookup need not decode a single photo.
    """
    digest = hashlib.sha256()
    for path in files:
        content = hashlib.sha256(path.read_bytes()).hexdigest()
        digest.update(f"{path.name}\0{content}\n".encode())
    return digest.hexdigest()


def read_photo(data: bytes, config: PreprocessConfig) -> np.ndarray:
    """A photo file's bytes as the uint8 (3, S, S) crop the network sees (EXIF orientation applied)."""
    with Image.open(io.BytesIO(data)) as image:
        rgb = ImageOps.exif_transpose(image).convert("RGB")
    return np.ascontiguousarray(np.asarray(resize_and_crop(rgb, config), dtype=np.uint8).transpose(2, 0, 1))


def load_calibration_set(directory: str | Path, read: Callable[[bytes], np.ndarray],
                         minimum: int = MIN_CALIBRATION_IMAGES) -> CalibrationSet:
    """Read every file of ``directory`` with ``read`` (bytes -> uint8 CHW); unreadable ones are skipped.

    Raises :class:`CalibrationError` when the folder is missing or empty, or fewer than ``minimum`` files
    are readable photos. Each skipped file is logged as a warning.
    """
    files = calibration_files(directory)
    images, names, skipped = [], [], []
    for path in files:
        try:
            array = read(path.read_bytes())
        except Exception as exc:  # any decoder error: the photo is skipped, the set may still be enough
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            skipped.append((path.name, reason))
            log.warning("calibration: skipped %s (%s)", path.name, reason)
            continue
        images.append(array)
        names.append(path.name)
    if len(images) < minimum:
        raise CalibrationError(
            f"calibration folder {directory} has {len(images)} readable photos ({len(skipped)} unreadable "
            f"of {len(files)} files); at least {minimum} are needed"
        )
    return CalibrationSet(np.stack(images), names, skipped, calibration_digest(files))


def _session(model: bytes, num_threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if num_threads:
        options.intra_op_num_threads = num_threads
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def _batches(images: np.ndarray, size: int) -> list[np.ndarray]:
    return [images[i:i + size] for i in range(0, len(images), size)]


def quantize_onnx(float_model: bytes, images: np.ndarray, *, metadata: dict[str, str] | None = None,
                  batch_size: int = 8, overrides: dict | None = None, pre_process: bool = True) -> bytes:
    """Statically quantise ``float_model`` (an ONNX export taking uint8 NCHW) calibrated on ``images``.

    Returns the QDQ model's bytes, with ``metadata`` (and the recipe) in its metadata properties.
    ``overrides`` (keyword arguments of ``onnxruntime.quantization.quantize_static``) and ``pre_process``
    exist for the recipe study (benchmarks/bench_int8_recipes.py); the service uses neither.
    """
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    graph = onnx.load_from_string(float_model).graph
    input_name = graph.input[0].name
    # The input normalisation stays float32: its per-channel constants (ImageNet mean/std in the B series)
    # are not weights to round to int8, and the first convolution's input is quantised right after it.
    normalisation = [node.name for node in graph.node if node.name.startswith("/normalize/")]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter(_batches(images, batch_size))

        def get_next(self):
            batch = next(self._batches, None)
            return None if batch is None else {input_name: batch}

    with tempfile.TemporaryDirectory(prefix="effnet-quantize-") as tmp, _quiet_onnxruntime(ort):
        raw, source, target = Path(tmp, "raw.onnx"), Path(tmp, "float.onnx"), Path(tmp, "int8.onnx")
        raw.write_bytes(float_model)
        # Shape inference and graph folding first: without it the static-padding arithmetic stays in the
        # graph, Pad is left between float tensors, and the int8 model ran only 1.3x float32, not 2.5x.
        if pre_process:
            quant_pre_process(str(raw), str(source))
        else:
            source = raw
        options = dict(quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                       weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                       nodes_to_exclude=normalisation)
        options.update(overrides or {})
        quantize_static(str(source), str(target), Reader(), **options)
        model = onnx.load(str(target))
    for key, value in {"recipe": RECIPE, **(metadata or {})}.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = METADATA_PREFIX + key, str(value)
    return model.SerializeToString()


@contextlib.contextmanager
def _quiet_onnxruntime(ort):
    """Keep onnxruntime's per-initializer warnings and the quantiser's advice out of the log."""
    root = logging.getLogger()
    level = root.level
    ort.set_default_logger_severity(3)
    root.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        root.setLevel(level)
        ort.set_default_logger_severity(2)


def read_metadata(model: bytes) -> dict[str, str]:
    """The ``effnet.*`` metadata properties of a quantised model, prefix removed."""
    import onnx

    proto = onnx.load_from_string(model)
    return {p.key.removeprefix(METADATA_PREFIX): p.value for p in proto.metadata_props
            if p.key.startswith(METADATA_PREFIX)}


def top1(model: bytes, images: np.ndarray, batch_size: int = 16, num_threads: int | None = None) -> np.ndarray:
    """Top-1 class index of each image under ``model`` (an ONNX model with a ``logits`` output)."""
    session = _session(model, num_threads)
    name = session.get_inputs()[0].name
    out = [session.run(["logits"], {name: images[i:i + batch_size]})[0].argmax(1)
           for i in range(0, len(images), batch_size)]
    return np.concatenate(out) if out else np.empty(0, dtype=np.int64)


def top1_agreement(reference: bytes, candidate: bytes, images: np.ndarray) -> float:
    """Fraction of ``images`` whose top-1 class is the same under both models."""
    if len(images) == 0:
        return float("nan")
    return float((top1(reference, images) == top1(candidate, images)).mean())


@dataclass(frozen=True)
class Quantized:
    """A quantised model and how it was made."""

    model: bytes
    calibrated: int
    held_out: int
    agreement: float  # top-1 agreement with float32 on the held-out photos

    @property
    def metadata(self) -> dict[str, str]:
        return read_metadata(self.model)


def float_export(net: EfficientNet, image_size: int | None = None) -> bytes:
    """The float32 export quantisation starts from: uint8 NCHW in, features and logits out."""
    from .export import export_onnx_bytes

    return export_onnx_bytes(net.eval(), image_size=image_size, with_features=True, check=True, uint8_input=True)


def quantize_model(net: EfficientNet, calibration: CalibrationSet, *, image_size: int | None = None,
                   metadata: dict[str, str] | None = None) -> Quantized:
    """Export ``net``, quantise it on the calibration split, measure agreement on the held-out split."""
    calibrate, held_out = calibration.split()
    float_model = float_export(net, image_size)
    meta = {"variant": net.variant.name, "calibration_sha256": calibration.sha256,
            "calibration_count": str(len(calibration.images)), "calibrated": str(len(calibrate)),
            "held_out": str(len(held_out)), **(metadata or {})}
    model = quantize_onnx(float_model, calibrate, metadata=meta)
    agreement = top1_agreement(float_model, model, held_out)
    model = _set_metadata(model, {"held_out_agreement": f"{agreement:.4f}"})
    return Quantized(model, len(calibrate), len(held_out), agreement)


def _set_metadata(model: bytes, values: dict[str, str]) -> bytes:
    import onnx

    proto = onnx.load_from_string(model)
    for key, value in values.items():
        full = METADATA_PREFIX + key
        for entry in proto.metadata_props:
            if entry.key == full:
                entry.value = value
                break
        else:
            entry = proto.metadata_props.add()
            entry.key, entry.value = full, value
    return proto.SerializeToString()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.quantize", description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", required=True, help=f"one of: {', '.join(VARIANTS)}")
    parser.add_argument("--weights", help="local checkpoint (default: the packaged weights of lite0-lite2)")
    parser.add_argument("--calibration-dir", required=True,
                        help=f"folder of at least {MIN_CALIBRATION_IMAGES} representative photos")
    parser.add_argument("--output", required=True, help="int8 ONNX file to write")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    from .weights import default_weights_path

    try:
        weights = args.weights or default_weights_path(args.variant)
        if weights is None:
            raise WeightsError(f"no packaged weights for {args.variant}; pass --weights")
        net = EfficientNet.from_pretrained(args.variant, weights)
        calibration = load_calibration_set(args.calibration_dir, lambda data: read_photo(data, net.variant.preprocess))
        weights_sha = hashlib.sha256(Path(weights).read_bytes()).hexdigest()
        result = quantize_model(net, calibration, metadata={"weights_sha256": weights_sha})
        output = Path(args.output)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_bytes(result.model)
    except (ValueError, KeyError, FileNotFoundError, WeightsError, CalibrationError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"quantised {args.variant} to int8 on {result.calibrated} photos "
          f"({len(calibration.skipped)} unreadable skipped); wrote {output}")
    print(f"top-1 agreement with float32 on {result.held_out} held-out photos: {result.agreement:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
