"""PyTorch on any device and dtype; on a GPU, batches in flight through per-slot streams and CUDA graphs."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from model import Normalize, fold_batchnorm
from model.export import export_form

log = logging.getLogger("service.core.engines.torch")

WARMUP_ROUNDS = 3


def batch_buckets(max_batch_size: int) -> list[int]:
    """1, 2, 4, ... below ``max_batch_size``, then ``max_batch_size`` itself: the sizes graphs are captured at."""
    buckets, size = [], 1
    while size < max_batch_size:
        buckets.append(size)
        size *= 2
    return [*buckets, max_batch_size]


def bucket_for(n: int, buckets: list[int]) -> int | None:
    """The smallest bucket holding ``n`` images (None when none does)."""
    for bucket in buckets:
        if bucket >= n:
            return bucket
    return None


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    features: torch.Tensor  # static outputs, rows [0, bucket)
    logits: torch.Tensor


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
    graphs: dict[int, _Graph] = field(default_factory=dict)
    pool: object = None  # torch.cuda.graph_pool_handle(), made at the first capture

    @property
    def capacity(self) -> int:
        return len(self.host_in)


class TorchEngine:
    """PyTorch inference in the form that runs fastest.

    Static "SAME" padding for the served input size (no per-call shape arithmetic), plain Swish, BatchNorm
    folded into the convolutions, channels-last memory format, ``inference_mode``. The input is the uint8
    image batch, normalised on the device (``model.Normalize``: the same float32 arithmetic as the CPU
    path), then cast to the compute dtype; a float batch is taken as already normalised. float32 on CUDA is
    IEEE float32 (TF32 turned off for this process).

    On CUDA, ``input_buffers(slots, max_batch_size)`` sets up one slot per batch in flight: a stream,
    pinned host buffers for the pixels (returned, so the batcher stacks straight into pinned memory) and
    for the outputs, and a device input buffer, all allocated once and reused. A batch in slot ``k``
    copies in, computes and copies out on slot ``k``'s stream, so one slot's copies overlap another's
    compute. ``warm_up`` runs every bucket (1, 2, 4, ... max_batch_size) on every slot, which lets cuDNN
    pick its kernels, then (``cuda_graphs``) captures one CUDA graph per bucket and slot: a batch is
    padded to its bucket (the padding rows hold stale pixels whose outputs are never read) and its graph
    replayed, one launch instead of a few hundred. Batches larger than a slot, float batches, or buckets
    without a graph run eagerly.

    ``run`` may be called from several threads at once, but never twice at once with the same ``slot``
    (the batcher guarantees it).
    """

    backend = "torch"

    def __init__(
        self, net: torch.nn.Module, device: torch.device, dtype: torch.dtype, *, image_size: int | None = None,
        cuda_graphs: bool = True,
    ) -> None:
        self._torch_device = device
        self._torch_dtype = dtype
        self._cuda = device.type == "cuda"
        if self._cuda:
            torch.backends.cudnn.benchmark = True
            if dtype == torch.float32:
                # float32 means float32: cuDNN would otherwise run its convolutions in TF32 (10-bit
                # mantissa). The fast GPU path is bfloat16, the default there (EFFNET_DTYPE=auto).
                torch.backends.cudnn.allow_tf32 = False
                torch.backends.cuda.matmul.allow_tf32 = False
        self.image_size = int(image_size or net.image_size or net.variant.resolution)
        self.normalize = Normalize(net.variant.preprocess).to(device)
        net = fold_batchnorm(export_form(net, self.image_size))
        self.num_features = int(net.num_features)
        self.num_classes = int(net._fc.out_features) if net.include_top else 0  # 0: no classifier
        self.net = net.to(device=device, dtype=dtype, memory_format=torch.channels_last).eval()
        self.device = str(device)
        self.dtype = str(dtype).removeprefix("torch.")
        self.cuda_graphs = bool(cuda_graphs) and self._cuda
        self._slots: list[_Slot] = []
        self._buckets: list[int] = []
        self.warmup_seconds: float | None = None
        self.graphs_captured = 0

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
        return _Slot(
            stream=torch.cuda.Stream(device=device),
            host_in=torch.empty(shape, dtype=torch.uint8, pin_memory=True),
            device_in=torch.zeros(shape, dtype=torch.uint8, device=device),
            host_features=torch.empty((capacity, self.num_features), dtype=torch.float32, pin_memory=True),
            host_logits=torch.empty((capacity, self.num_classes), dtype=torch.float32, pin_memory=True),
        )

    def warm_up(self, max_batch_size: int) -> None:
        """Before serving: the first passes at each batch size pay for kernel selection and allocation.
        On CUDA every bucket runs on every slot, then its graph is captured (when enabled)."""
        started = time.perf_counter()
        with torch.inference_mode():
            if not self._cuda or not self._slots:
                size = self.image_size
                for batch_size in sorted({1, max_batch_size}):
                    batch = np.zeros((batch_size, 3, size, size), dtype=np.uint8)
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
            features, logits = self._forward(x)
        slot.graphs[bucket] = _Graph(graph, features, logits)
        self.graphs_captured += 1

    # -- inference --------------------------------------------------------------------------------------------
    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch already on the device -> float32 (pooled features, logits) on the device."""
        if x.dtype == torch.uint8:
            x = self.normalize(x)
        x = x.to(dtype=self._torch_dtype).contiguous(memory_format=torch.channels_last)
        pooled, logits = self.net.forward_features_and_logits(x)
        return pooled.float(), logits.float()

    def run(self, batch: np.ndarray | torch.Tensor, slot: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """uint8 NCHW batch (normalised here, on the device); a float batch is taken as already normalised."""
        with torch.inference_mode():
            x = batch if isinstance(batch, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(batch))
            if not self._cuda:
                features, logits = self._forward(x)
                return features.numpy(), logits.numpy()
            if x.dtype == torch.uint8 and slot < len(self._slots) and len(x) <= self._slots[slot].capacity:
                return self._run_in_slot(x, self._slots[slot])
            # Outside the slots (a start-up probe, a float batch, a batch larger than the slots).
            features, logits = self._forward(x.to(self._torch_device))
            return features.cpu().numpy(), logits.cpu().numpy()

    def _run_in_slot(self, x: torch.Tensor, slot: _Slot) -> tuple[np.ndarray, np.ndarray]:
        n = len(x)
        if x.data_ptr() != slot.host_in.data_ptr():  # not stacked into the slot's pinned buffer already
            slot.host_in[:n].copy_(x)
        with torch.cuda.stream(slot.stream):
            slot.device_in[:n].copy_(slot.host_in[:n], non_blocking=True)
            bucket = bucket_for(n, self._buckets)
            graph = slot.graphs.get(bucket) if bucket is not None else None
            if graph is not None:
                graph.graph.replay()
                features, logits = graph.features[:n], graph.logits[:n]
            else:
                features, logits = self._forward(slot.device_in[:n])
            slot.host_features[:n].copy_(features, non_blocking=True)
            slot.host_logits[:n].copy_(logits, non_blocking=True)
        slot.stream.synchronize()  # releases the GIL: the other slots' threads run meanwhile
        # Copies: the pinned buffers are refilled by this slot's next batch.
        return slot.host_features[:n].numpy().copy(), slot.host_logits[:n].numpy().copy()
