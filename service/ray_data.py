"""EfficientNet in a Ray Data pipeline: a callable class for ``Dataset.map_batches`` (an actor pool that
loads the model once per actor), on the service's own loading, decoding, engines and outputs.

    import ray
    from ray.data import ActorPoolStrategy
    from service.ray_data import EfficientNetPredictor

    ds = ray.data.read_binary_files("/data/catalogue/", include_paths=True)      # columns: bytes, path
    ds = ds.map_batches(EfficientNetPredictor, fn_constructor_kwargs={"task": "features"}, batch_size=64,
                        compute=ActorPoolStrategy(min_size=1, max_size=8), num_cpus=2)
    ds.write_parquet("/data/embeddings/")                                         # path, embedding, error

Rows in: ``bytes`` (an image file's content; decoded and resized exactly as the service does it) or
``pixels`` (uint8 ``3 x S x S`` from ``decode_images``), optionally ``error`` (a row already failed: it is
passed on untouched); every other column (``path``, an id of yours) is passed through. Rows out: those
columns, then the fields ``efficientnet-batch`` writes: ``top_k`` (a list of ``{index, label, score}``,
best first, as ``/predict`` gives it) for ``task="predict"`` or ``embedding`` (float64, as ``/features``
gives it) for ``task="features"``, and ``error`` (``{code, message}`` as in the service's error bodies,
null on success). An image that cannot be decoded is its own error row; the batch goes on.

The model is chosen as the server chooses it, from the worker's ``EFFNET_*`` environment and the
constructor's arguments (which win): ``model`` (a variant, or a model of ``model_repository``),
``weights`` (a checkpoint), ``labels`` (its class names), ``settings`` (other settings by name, e.g.
``{"backend": "onnxruntime", "dtype": "int8"}``). Paths are read on the worker: on a cluster they must be
visible to every node (a shared filesystem, or baked into the image). Inference threads default to the
CPUs the actor was given (``num_cpus``), not the machine's, so actors sharing a node do not oversubscribe it.

This module and ``service.cli.on_ray`` are the only ones that import Ray (the ``ray`` extra); the server
never does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa

from service.core.errors import ServiceError
from service.core.imaging import Preprocessor
from service.core.loading import LoadedModel, load_model
from service.core.outputs import check_top_k, embedding, top_classes
from service.core.repository import ModelRepository
from service.core.settings import ModelSettings, ModelSpec, ServerSettings

TASKS = ("predict", "features")
# The arrow types of the fields every output of efficientnet-batch has (see service/cli/sinks.py).
TOP_K_TYPE = pa.list_(pa.struct([("index", pa.int32()), ("label", pa.string()), ("score", pa.float64())]))
ERROR_TYPE = pa.struct([("code", pa.string()), ("message", pa.string())])
# Columns that carry the image into the predictor; they are not passed on.
_INPUT_COLUMNS = ("bytes", "pixels", "error")


def model_spec(model: str | None = None, weights: str | None = None, *, labels: str | None = None,
               model_repository: str | None = None, settings: Mapping[str, Any] | None = None,
               spec: ModelSpec | None = None) -> tuple[ModelSpec, ServerSettings]:
    """(what to load, the server-wide settings decoding follows), decided as the server decides: the
    ``EFFNET_*`` environment, overridden by ``settings`` (the variables' names without the prefix, in lower
    case) and the named arguments; a repository model's own ``model.toml``. ``spec``: a model already
    decided (``efficientnet-batch --ray`` sends the driver's), taken as it is. Not resolved: the machine
    that loads the model resolves it (its device, its CPUs)."""
    values = dict(settings or {})
    unknown = sorted(set(values) - set(ModelSettings.model_fields) - set(ServerSettings.model_fields))
    if unknown:
        raise ValueError(f"unknown setting(s) {', '.join(unknown)}: use the names of the EFFNET_* variables, "
                         "without the prefix, in lower case")
    model_values = {k: v for k, v in values.items() if k in ModelSettings.model_fields}
    server_values = {k: v for k, v in values.items() if k in ServerSettings.model_fields}
    if model_repository is not None:
        server_values["model_repository"] = model_repository
    server = ServerSettings(**server_values)
    if spec is not None:
        if model_values or any(v is not None for v in (model, weights, labels, model_repository)):
            raise ValueError("give the model either as a ModelSpec or by model/weights/labels/model_repository/"
                             "settings, not both")
        return spec, server
    if server.model_repository:
        if weights is not None or labels is not None:
            raise ValueError("with a model repository each model's model.toml names its weights and labels: "
                             "give model=NAME only")
        repository = ModelRepository(server.model_repository, ModelSettings(**model_values))
        name = model or server.default_model
        if not name:
            names = repository.names()
            if len(names) != 1:
                raise ValueError(f"the model repository {repository.root} holds {len(names)} models "
                                 f"({', '.join(names)}): name one with model=NAME")
            name = names[0]
        if name not in repository:
            raise ValueError(f"no model {name!r} in the repository {repository.root} (it has: "
                             f"{', '.join(repository.names()) or 'nothing'})")
        return repository.spec(name), server
    for key, value in (("model", model), ("weights", weights), ("labels", labels)):
        if value is not None:
            model_values[key] = value
    return ModelSpec.from_environment(**model_values), server


def _assigned_cpus() -> int | None:
    """CPUs Ray gave this actor or task (None outside Ray, or with none reserved)."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    except Exception:  # noqa: BLE001 - not in a Ray worker: the settings' own defaults apply
        return None
    return max(1, int(round(cpus))) if cpus else None


def for_this_worker(spec: ModelSpec) -> ModelSpec:
    """The spec with as many inference threads as CPUs Ray gave this worker, unless set explicitly (the
    machine's CPU count would oversubscribe a node shared by several actors)."""
    cpus = _assigned_cpus()
    if cpus is None or spec.settings.num_threads is not None:
        return spec
    return dataclasses.replace(spec, settings=spec.settings.model_copy(update={"num_threads": cpus}))


# ---- decoding -----------------------------------------------------------------------------------------------
def decode_one(preprocessor: Preprocessor, data: bytes) -> tuple[np.ndarray | None, dict[str, str] | None]:
    """(uint8 pixels, None), or (None, the error as the service words it) for bytes that are no image."""
    try:
        return preprocessor(data), None
    except ServiceError as exc:
        return None, {"code": exc.code, "message": exc.detail}
    except Exception as exc:  # noqa: BLE001 - the core maps decoder failures; anything else is still a bad image
        return None, {"code": "invalid_image", "message": f"cannot decode image ({type(exc).__name__})"}


def pixels_table(columns: Mapping[str, pa.Array], arrays: list[np.ndarray | None],
                 errors: list[dict[str, str] | None], shape: tuple[int, int, int]) -> pa.Table:
    """``columns`` plus ``pixels`` (zeros for a failed row) and ``error``: what ``EfficientNetPredictor``
    takes as already decoded images."""
    from ray.data.extensions import ArrowTensorArray

    pixels = np.zeros((len(arrays), *shape), dtype=np.uint8)
    for i, array in enumerate(arrays):
        if array is not None:
            pixels[i] = array
    return pa.table({**columns, "pixels": ArrowTensorArray.from_numpy(pixels),
                     "error": pa.array(errors, type=ERROR_TYPE)})


def decode_images(batch: pa.Table | Mapping[str, np.ndarray], *, preprocess: Any, max_pixels: int) -> pa.Table:
    """A ``map_batches`` function (CPU tasks) that decodes the ``bytes`` column into ``pixels`` with the
    service's preprocessing (``preprocess``: the model's ``PreprocessConfig``), so decoding scales apart
    from inference; feed its output to ``EfficientNetPredictor``."""
    table = _as_table(batch)
    preprocessor = Preprocessor(preprocess, max_pixels=max_pixels)
    decoded = [decode_one(preprocessor, data) for data in table.column("bytes").to_pylist()]
    rest = {name: table.column(name) for name in table.column_names if name not in _INPUT_COLUMNS}
    return pixels_table(rest, [a for a, _ in decoded], [e for _, e in decoded], preprocessor.shape)


def _as_table(batch: pa.Table | Mapping[str, np.ndarray]) -> pa.Table:
    if isinstance(batch, pa.Table):
        return batch
    if not isinstance(batch, Mapping):
        raise TypeError(f"EfficientNetPredictor takes batches as numpy or pyarrow, not {type(batch).__name__}: "
                        "use map_batches(..., batch_format='numpy') or 'pyarrow'")
    from ray.data.extensions import ArrowTensorArray

    columns = {}
    for name, values in batch.items():
        values = np.asarray(values)
        if values.ndim > 1:
            columns[name] = ArrowTensorArray.from_numpy(values)
        elif name == "bytes":
            columns[name] = pa.array(list(values), type=pa.binary())
        else:
            columns[name] = pa.array(list(values) if values.dtype == object else values)
    return pa.table(columns)


def _tensor_column(table: pa.Table, name: str) -> np.ndarray:
    column = table.column(name).combine_chunks()
    to_numpy = getattr(column, "to_numpy", None)
    return np.asarray(to_numpy() if to_numpy is not None else column)


# ---- inference ----------------------------------------------------------------------------------------------
class EfficientNetPredictor:
    """The model on one Ray worker, for ``map_batches`` (see the module's docstring for rows in and out).

    ``task``: ``"predict"`` (``top_k`` classes per image, ``top_k`` of them) or ``"features"``
    (``embedding``, L2-normalised with ``normalize=True``). The model: ``model``, ``weights``, ``labels``,
    ``model_repository``, ``settings`` or ``spec`` as in ``model_spec``. Loading fails with the server's one-line
    ``StartupError`` (a missing checkpoint, a labels file of the wrong length).
    """

    def __init__(self, model: str | None = None, weights: str | None = None, *, labels: str | None = None,
                 task: str = "predict", top_k: int = 5, normalize: bool = False,
                 model_repository: str | None = None, settings: Mapping[str, Any] | None = None,
                 spec: ModelSpec | None = None) -> None:
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, not {task!r}")
        spec, self.server = model_spec(model, weights, labels=labels, model_repository=model_repository,
                                       settings=settings, spec=spec)
        self.model: LoadedModel = load_model(for_this_worker(spec))
        self.settings = self.model.settings  # resolved by load_model
        self.name = self.model.name
        self.task = task
        self.top_k = int(top_k)
        self.normalize = bool(normalize)
        if task == "predict":
            check_top_k(self.model, self.top_k)  # the check of every door: a classifier, 1 <= top_k <= classes
        self.preprocessor = Preprocessor(self.model.preprocess, max_pixels=self.server.max_image_pixels)
        engine = self.model.engine
        self.batch_size = self.settings.max_batch_size
        # The engine's life as the service runs it: its input buffer (pinned memory on a GPU), then warm-up
        # (CUDA graphs per batch size) unless EFFNET_WARMUP=false.
        buffers = engine.input_buffers(1, self.batch_size)
        self._buffer = buffers[0] if buffers else None
        if self.settings.warmup:
            engine.warm_up_thread(self.batch_size)
            engine.warm_up(self.batch_size)
        self._decoders: ThreadPoolExecutor | None = None

    def __call__(self, batch: pa.Table | Mapping[str, np.ndarray]) -> pa.Table:
        table = _as_table(batch)
        n = table.num_rows
        errors: list[dict[str, str] | None] = (
            table.column("error").to_pylist() if "error" in table.column_names else [None] * n
        )
        if "pixels" in table.column_names:
            pixels = _tensor_column(table, "pixels")
            arrays: list[np.ndarray | None] = [pixels[i] if errors[i] is None else None for i in range(n)]
        elif "bytes" in table.column_names:
            arrays, errors = self._decode(table.column("bytes").to_pylist(), errors)
        else:
            raise ValueError("EfficientNetPredictor needs a 'bytes' column (image files' content, as "
                             "ray.data.read_binary_files gives it) or a 'pixels' column (from decode_images); "
                             f"this batch has {table.column_names}")
        ok = [i for i in range(n) if errors[i] is None]
        pooled, logits = self.infer(np.stack([arrays[i] for i in ok])) if ok else (None, None)
        columns = {name: table.column(name) for name in table.column_names if name not in _INPUT_COLUMNS}
        row_of = {i: j for j, i in enumerate(ok)}
        if self.task == "predict":
            top_k: list[list[dict[str, Any]] | None] = [None] * n
            for i, j in row_of.items():
                top_k[i] = [{"index": c.index, "label": c.label, "score": c.score}
                            for c in top_classes(logits[j], self.model.labels, self.top_k)]
            columns["top_k"] = pa.array(top_k, type=TOP_K_TYPE)
        else:
            dim = self.model.num_features
            values = np.zeros((n, dim), dtype=np.float64)
            for i, j in row_of.items():
                values[i] = embedding(pooled[j], normalize=self.normalize)
            mask = pa.array([e is not None for e in errors], type=pa.bool_())
            columns["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), dim, mask=mask)
        columns["error"] = pa.array(errors, type=ERROR_TYPE)
        return pa.table(columns)

    def infer(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (N, 3, S, S) -> (pooled features, logits), in engine batches of EFFNET_MAX_BATCH_SIZE."""
        features, logits = [], []
        for start in range(0, len(pixels), self.batch_size):
            chunk = pixels[start:start + self.batch_size]
            if self._buffer is not None:
                np.copyto(self._buffer[:len(chunk)], chunk)
                chunk = self._buffer[:len(chunk)]
            f, g = self.model.engine.run(chunk, 0)
            # Copies: an engine may hand back views of buffers its next batch overwrites (pinned memory).
            features.append(np.array(f, dtype=np.float32))
            logits.append(np.array(g, dtype=np.float32))
        return np.concatenate(features), np.concatenate(logits)

    def _decode(self, blobs: list[bytes | None], errors: list[dict[str, str] | None]
                ) -> tuple[list[np.ndarray | None], list[dict[str, str] | None]]:
        if self._decoders is None:
            threads = self.server.decode_threads or _assigned_cpus() or self.server.decode_threads_for([self.settings])
            self._decoders = ThreadPoolExecutor(threads,
                                                thread_name_prefix="effnet-decode")
        todo = [i for i, error in enumerate(errors) if error is None]
        arrays: list[np.ndarray | None] = [None] * len(blobs)
        errors = list(errors)
        decoded = self._decoders.map(lambda i: decode_one(self.preprocessor, blobs[i] or b""), todo)
        for i, (array, error) in zip(todo, decoded, strict=True):
            arrays[i], errors[i] = array, error
        return arrays, errors


__all__ = [
    "ERROR_TYPE",
    "TOP_K_TYPE",
    "EfficientNetPredictor",
    "decode_images",
    "decode_one",
    "model_spec",
    "pixels_table",
]
