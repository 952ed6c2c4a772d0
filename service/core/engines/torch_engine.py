"""PyTorch on any device and dtype; on a GPU, batches in flight through per-slot streams and CUDA graphs."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from model import Normalize, fold_batchnorm
from model.export import export_form
from service.core.engines.base import WARMUP_ROUNDS, Engine, batch_buckets, bucket_for

log = logging.getLogger("service.core.engines.torch")


class _ScopedSetting:
    """A process-wide backend setting an engine needs only while its own passes run (eager passes and
    graph capture; a replayed graph keeps the kernels it was captured with). The first holder sets it,
    the last one to leave restores what was there before, so the rest of the process keeps its own
    choice. Counted, so batches in several threads (and several engines) can hold it at once."""

    def __init__(self, read: Callable[[], object], write: Callable[[object], None], value: object) -> None:
        self._read, self._write, self._value = read, write, value
        self._lock = threading.Lock()
        self._holders = 0
        self._saved: object = None

    @contextmanager
    def held(self) -> Iterator[None]:
        with self._lock:
            if self._holders == 0:
                self._saved = self._read()
                self._write(self._value)
            self._holders += 1
        try:
            yield
        finally:
            with self._lock:
                self._holders -= 1
                if self._holders == 0:
                    self._write(self._saved)


_FP32_PRECISION_API = hasattr(torch.backends.cudnn, "conv")  # torch >= 2.9; before, the allow_tf32 flags


def _read_fp32_precision() -> tuple[object, object]:
    if _FP32_PRECISION_API:
        return torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision
    return torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32


def _write_fp32_precision(value: tuple[object, object]) -> None:
    if _FP32_PRECISION_API:
        torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision = value
    else:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = value


def _write_cudnn_benchmark(value: bool) -> None:
    torch.backends.cudnn.benchmark = value


# float32 means float32: cuDNN would otherwise run float32 convolutions in TF32 (10-bit mantissa). The
# current API (torch.backends.*.fp32_precision); the fast GPU path is bfloat16 anyway (EFFNET_DTYPE=auto).
IEEE_FLOAT32 = _ScopedSetting(_read_fp32_precision, _write_fp32_precision,
                              ("ieee", "ieee") if _FP32_PRECISION_API else (False, False))
# cuDNN times the candidate kernels the first time it meets a shape and keeps the fastest. Its cache is
# per thread: hence the per-thread warm-up and the batches padded to the buckets the warm-up ran.
CUDNN_BENCHMARK = _ScopedSetting(lambda: torch.backends.cudnn.benchmark, _write_cudnn_benchmark, True)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    features: torch.Tensor  # static outputs, rows [0, bucket)
    logits: torch.Tensor
    feature_map: torch.Tensor  # the head's map, in the compute dtype: read only by batches that ask for it


@dataclass
class _Slot:
    """One inference slot on a GPU, used by one batch at a time: its own stream, pinned host buffers
    (input pixels, output features and logits), device input buffer and CUDA graphs (one per bucket,
    sharing one memory pool: a slot's graphs never run at the same time)."""

    stream: torch.cuda.Stream
    host_in: torch.Tensor  # (capacity, 3, S, S) uint8, pinned; the batcher stacks into its numpy view
    device_in: torch.Tensor  # (capacity, 3, S, S) uint8 on the device; the graphs' static input
    host_features: torch.Tensor  # (capacity, num_features) float32, pinned
    host_logits: torch.Tensor  # (capacity, num_classes) float32, pinned
    done: torch.cuda.Event  # blocking: waiting on it sleeps instead of spinning a core
    graphs: dict[int, _Graph] = field(default_factory=dict)
    host_map: torch.Tensor | None = None  # (capacity, C, h, w) float32, pinned; made by the first map asked
    pool: object = None  # torch.cuda.graph_pool_handle(), made at the first capture

    @property
    def capacity(self) -> int:
        return len(self.host_in)


class TorchEngine(Engine):
    """PyTorch inference in the form that runs fastest.

    Static "SAME" padding for the served input size (no per-call shape arithmetic), plain Swish, BatchNorm
    folded into the convolutions, channels-last memory format, ``inference_mode``. The input is the uint8
    image batch, normalised on the device (``model.Normalize``: the same float32 arithmetic as the CPU
    path), then cast to the compute dtype; a float batch is taken as already normalised. float32 on CUDA is
    IEEE float32 (TF32 off while this engine's passes run: ``IEEE_FLOAT32``).

    On CUDA, ``input_buffers(slots, max_batch_size)`` sets up one slot per batch in flight: a stream,
    pinned host buffers for the pixels (returned, so the batcher stacks straight into pinned memory) and
    for the outputs, and a device input buffer, all allocated once and reused. A batch in slot ``k``
    copies in, computes and copies out on slot ``k``'s stream, so one slot's copies overlap another's
    compute; its thread then sleeps on a blocking event until the copies back are done.

    Every batch runs at its bucket's size (1, 2, 4, ... max_batch_size; ``pad_to_buckets``, on by default
    on CUDA): the padding rows hold stale pixels whose outputs are never read. So cuDNN meets only the
    bucket sizes, and those are what warm-up runs: ``warm_up_thread`` runs every bucket eagerly on each
    inference thread (cuDNN keeps its kernel choices per thread), ``warm_up`` every bucket on every slot
    and then (``cuda_graphs``) captures one CUDA graph per bucket and slot, replayed as one launch instead
    of a few hundred. Float batches, batches larger than a slot and any bucket without a graph run
    eagerly. Graphs are captured in warm-up only: with ``EFFNET_WARMUP=false`` batches run eagerly, and
    the first batch says so in the log.

    ``run`` may be called from several threads at once, but never twice at once with the same ``slot``
    (the batcher guarantees it).
    """

    backend = "torch"

    def __init__(
        self, net: torch.nn.Module, device: torch.device, dtype: torch.dtype, *, image_size: int | None = None,
        cuda_graphs: bool = True, pad_to_buckets: bool | None = None,
    ) -> None:
        self._torch_device = device
        self._torch_dtype = dtype
        self._cuda = device.type == "cuda"
        self.image_size = int(image_size or net.image_size or net.variant.resolution)
        self.normalize = Normalize(net.variant.preprocess).to(device)
        net = fold_batchnorm(export_form(net, self.image_size))
        self.num_features = int(net.num_features)
        self.num_classes = int(net._fc.out_features) if net.include_top else 0  # 0: no classifier
        self.net = net.to(device=device, dtype=dtype, memory_format=torch.channels_last).eval()
        self.device = str(device)
        self.dtype = str(dtype).removeprefix("torch.")
        self.cuda_graphs = bool(cuda_graphs) and self._cuda
        # On CPU there is no per-size kernel search to save, and padding would cost real compute.
        self.pad_to_buckets = self._cuda if pad_to_buckets is None else bool(pad_to_buckets)
        self._settings = ([CUDNN_BENCHMARK] + ([IEEE_FLOAT32] if dtype == torch.float32 else [])) if self._cuda else []
        self._slots: list[_Slot] = []
        self._buckets: list[int] = []
        self.warmup_seconds: float | None = None
        self.graphs_captured = 0
        self._told_not_warm = False

    @contextmanager
    def _backend_settings(self) -> Iterator[None]:
        """The process-wide cuDNN settings this engine's passes need, held while they run."""
        with ExitStack() as stack:
            for setting in self._settings:
                stack.enter_context(setting.held())
            yield

    # -- set-up ---------------------------------------------------------------------------------------------
    def input_buffers(self, slots: int, max_batch_size: int) -> list[np.ndarray]:
        """One uint8 (max_batch_size, 3, S, S) buffer per slot for the batcher to stack into: pinned host
        memory on CUDA (with the slot's stream and device buffers behind it), plain memory on CPU."""
        shape = (max_batch_size, 3, self.image_size, self.image_size)
        self._buckets = batch_buckets(max_batch_size)
        if not self._cuda:
            return [np.empty(shape, dtype=np.uint8) for _ in range(slots)]
        self._slots = [self._new_slot(shape) for _ in range(slots)]
        return [slot.host_in.numpy() for slot in self._slots]

    def _new_slot(self, shape: tuple[int, ...]) -> _Slot:
        device = self._torch_device
        capacity = shape[0]
        slot = _Slot(
            stream=torch.cuda.Stream(device=device),
            host_in=torch.empty(shape, dtype=torch.uint8, pin_memory=True),
            device_in=torch.zeros(shape, dtype=torch.uint8, device=device),
            host_features=torch.empty((capacity, self.num_features), dtype=torch.float32, pin_memory=True),
            host_logits=torch.empty((capacity, self.num_classes), dtype=torch.float32, pin_memory=True),
            done=torch.cuda.Event(blocking=True),
        )
        # device_in was zero-filled on the current stream: all later work on the slot's stream follows it.
        slot.stream.wait_stream(torch.cuda.current_stream(device))
        return slot

    def rows_for(self, n: int) -> int:
        """Rows a batch of ``n`` runs at: its bucket when padding (and one holds it), else ``n``."""
        bucket = bucket_for(n, self._buckets) if self.pad_to_buckets else None
        return bucket if bucket is not None else n

    def padded_batch_size(self, n: int) -> int | None:
        return self.rows_for(n) if self.pad_to_buckets else None

    def warm_up_thread(self, max_batch_size: int) -> None:
        """Every bucket once, eagerly, on this thread (when batches are padded to buckets): cuDNN's kernel
        search for each size happens here rather than in the first user's batch."""
        if not self.pad_to_buckets:
            return
        buckets = self._buckets or batch_buckets(max_batch_size)
        with torch.inference_mode(), self._backend_settings():
            for bucket in sorted(buckets, reverse=True):
                self._forward(self._zeros_on_device(bucket))
            if self._cuda:
                torch.cuda.current_stream(self._torch_device).synchronize()

    def _zeros_on_device(self, rows: int) -> torch.Tensor:
        return torch.zeros((rows, 3, self.image_size, self.image_size), dtype=torch.uint8, device=self._torch_device)

    def warm_up(self, max_batch_size: int) -> None:
        """Before serving: the first passes at each batch size pay for kernel selection and allocation.
        On CUDA every bucket runs on every slot, then its graph is captured (when enabled)."""
        started = time.perf_counter()
        with torch.inference_mode(), self._backend_settings():
            if not self._cuda or not self._slots:
                sizes = self._buckets if self.pad_to_buckets and self._buckets else sorted({1, max_batch_size})
                for batch_size in sizes:
                    batch = self.zeros(batch_size)
                    for _ in range(WARMUP_ROUNDS):
                        self.run(batch)
            else:
                for slot in self._slots:
                    # Largest first: the later, smaller graphs reuse the memory pool of the larger ones.
                    for bucket in sorted(self._buckets, reverse=True):
                        self._warm_bucket(slot, bucket)
                torch.cuda.synchronize(self._torch_device)
        self.warmup_seconds = time.perf_counter() - started
        log.info("torch engine warm: %d CUDA graph(s) captured in %.1f s", self.graphs_captured, self.warmup_seconds)

    def _warm_bucket(self, slot: _Slot, bucket: int) -> None:
        x = slot.device_in[:bucket]
        slot.stream.wait_stream(torch.cuda.current_stream(self._torch_device))
        with torch.cuda.stream(slot.stream):
            for _ in range(WARMUP_ROUNDS):
                self._forward(x)
        slot.stream.synchronize()
        if not self.cuda_graphs:
            return
        if slot.pool is None:
            slot.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # thread_local: another thread's CUDA calls cannot invalidate this capture.
        with torch.cuda.graph(graph, pool=slot.pool, stream=slot.stream, capture_error_mode="thread_local"):
            features, logits, feature_map = self._forward(x)
        slot.graphs[bucket] = _Graph(graph, features, logits, feature_map)
        self.graphs_captured += 1

    # -- inference --------------------------------------------------------------------------------------------
    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A batch already on the device -> float32 (pooled features, logits) and the head's feature map
        (compute dtype) on the device. The map exists in every pass (the features pool it); it leaves the
        device only for a batch that asks for it."""
        if x.dtype == torch.uint8:
            x = self.normalize(x)
        x = x.to(dtype=self._torch_dtype).contiguous(memory_format=torch.channels_last)
        pooled, logits, feature_map = self.net.forward_with_feature_map(x)
        return pooled.float(), logits.float(), feature_map

    def run(self, batch: np.ndarray | torch.Tensor, slot: int = 0, *,
            feature_map: bool = False) -> tuple[np.ndarray, ...]:
        """uint8 NCHW batch (normalised here, on the device); a float batch is taken as already normalised."""
        with torch.inference_mode():
            x = batch if isinstance(batch, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(batch))
            if x.dtype not in (torch.uint8, torch.float32):  # never a silent cast (float64, int16, ...)
                raise TypeError(f"expected a uint8 or float32 NCHW batch, got {x.dtype}")
            in_slot = self._cuda and x.dtype == torch.uint8 and slot < len(self._slots)
            if in_slot and len(x) <= self._slots[slot].capacity:
                return self._run_in_slot(x, self._slots[slot], feature_map)
            # CPU; on CUDA a batch outside the slots (the start-up probe, a float batch, one over capacity).
            n, rows = len(x), self.rows_for(len(x))
            if rows > n:
                x = torch.cat([x, x.new_zeros((rows - n, *x.shape[1:]))])
            with self._backend_settings():
                features, logits, maps = self._forward(x.to(self._torch_device))
            outputs = features[:n].cpu().numpy(), logits[:n].cpu().numpy()
            if feature_map:
                outputs += (maps[:n].float().contiguous().cpu().numpy(),)
            return outputs

    @staticmethod
    def _map_to_host(slot: _Slot, maps: torch.Tensor) -> None:
        """Queue the copy of a batch's feature map (``maps``, its rows) into the slot's pinned buffer, made
        the first time a batch of this slot asks for it (on the slot's stream, before its event)."""
        if slot.host_map is None:
            slot.host_map = torch.empty((slot.capacity, *maps.shape[1:]), dtype=torch.float32, pin_memory=True)
        slot.host_map[: len(maps)].copy_(maps.float().contiguous(), non_blocking=True)

    def _run_in_slot(self, x: torch.Tensor, slot: _Slot, feature_map: bool = False) -> tuple[np.ndarray, ...]:
        n = len(x)
        rows = self.rows_for(n)
        if x.data_ptr() != slot.host_in.data_ptr():  # not stacked into the slot's pinned buffer already
            slot.host_in[:n].copy_(x)
        graph = slot.graphs.get(rows)
        if graph is None and self.cuda_graphs and not self._told_not_warm:
            self._told_not_warm = True
            log.warning("CUDA graphs are on but none was captured for a batch of %d (graphs are captured in "
                        "warm-up: EFFNET_WARMUP=false?): batches run eagerly, and each batch size's first "
                        "batch on each thread pays for cuDNN's kernel search", rows)
        with torch.cuda.stream(slot.stream):
            # Rows n..rows of device_in hold an earlier batch's pixels: computed, never read.
            slot.device_in[:n].copy_(slot.host_in[:n], non_blocking=True)
            if graph is not None:
                graph.graph.replay()
                features, logits, maps = graph.features[:n], graph.logits[:n], graph.feature_map[:n]
            else:
                with self._backend_settings():
                    features, logits, maps = self._forward(slot.device_in[:rows])
                features, logits, maps = features[:n], logits[:n], maps[:n]
            slot.host_features[:n].copy_(features, non_blocking=True)
            slot.host_logits[:n].copy_(logits, non_blocking=True)
            if feature_map:  # only then does the map leave the device
                self._map_to_host(slot, maps)
            slot.done.record(slot.stream)
        # A blocking event: this thread sleeps (GIL released) until the copies back are done, leaving
        # the core to the decode threads; Stream.synchronize would spin on it for the whole GPU time.
        slot.done.synchronize()
        # Copies: the pinned buffers are refilled by this slot's next batch.
        outputs = slot.host_features[:n].numpy().copy(), slot.host_logits[:n].numpy().copy()
        if feature_map:
            outputs += (slot.host_map[:n].numpy().copy(),)
        return outputs
