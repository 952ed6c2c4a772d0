"""In-process inference: the server's own models (``ModelRegistry``), as ``efficientnet-serve`` runs them,
without any transport.

The run builds a registry the way a server does (``load_startup``: tracing, the repository, the model),
with the one model the command uses, so the repository's ``model.toml``, ``EFFNET_MAX_QUEUE_TOTAL`` and the
default-model rule work exactly as in the server. Each image is one ``serve`` call, so a bad image fails
only its own row. Many calls are in flight at once: the decode threads turn bytes into arrays while the
inference thread runs the previous batch, and the dynamic batcher groups the decoded images into batches
of up to ``EFFNET_MAX_BATCH_SIZE``.
"""

from __future__ import annotations

import asyncio

from service.cli.cams import CamWriter
from service.cli.results import Result, failure
from service.core import tracing
from service.core.access import AccessRecord
from service.core.cam import CamWish
from service.core.errors import ServiceError
from service.core.metrics import Metrics
from service.core.outputs import embedding, top_classes
from service.core.registry import ModelRegistry, Startup, load_startup
from service.core.runtime import InferenceRequest, ServedModel
from service.core.settings import ModelSettings, ServerSettings

# The deadline of one image unless EFFNET_REQUEST_TIMEOUT_S is set: a batch job never overfills the queue
# (see ``default_concurrency``), so an image waits for at most a few batches; this only bounds a hung engine.
IMAGE_DEADLINE_S = 3600.0


class LocalRunner:
    """Loads the model the server would serve under ``name`` (None: its default model) from ``server`` and
    ``base`` (the EFFNET_* settings), and runs images through it. ``startup``: models already loaded."""

    def __init__(self, server: ServerSettings, base: ModelSettings, task: str, *, top_k: int = 5,
                 normalize: bool = False, name: str | None = None, startup: Startup | None = None,
                 cam: str | None = None) -> None:
        self.task = task
        # --cam DIR: each image's top-1 class activation map, drawn and saved there.
        self.cams = CamWriter(cam, max_pixels=server.max_image_pixels) if cam else None
        self.top_k = top_k
        self.normalize = normalize
        startup = startup or load_startup(server, base, only=[name] if name else None)
        self.metrics = Metrics(max(m.settings.max_batch_size for m in startup.models), process_metrics=False)
        self.registry = ModelRegistry(server, self.metrics, startup)
        self.served: ServedModel = self.registry.get(name)
        self.model = self.served.model
        self.model_name = self.served.name
        self.num_classes = self.model.num_classes
        self.dim = self.model.num_features
        self.max_file_bytes = server.max_body_bytes
        self.file_limit_name = "EFFNET_MAX_BODY_BYTES"  # what a file over max_file_bytes is told
        self._run_span = None  # the whole run's span (tracing on): one trace, a child span per image

    def default_concurrency(self) -> int:
        """Images in flight: enough to keep every decode thread busy while two batches wait to run."""
        s = self.served.settings
        return min(s.max_queue, 2 * s.max_batch_size + 2 * self.registry.decode_threads)

    def describe(self) -> str:
        e = self.model.engine
        variant = self.model.variant.name
        named = self.model_name if self.model_name == variant else f"{self.model_name} ({variant})"
        return f"{named} in-process ({e.backend}, {e.device}, {e.dtype})"

    async def start(self) -> None:
        self._run_span = tracing.start_span(
            f"efficientnet-batch {self.task}", {"effnet.model": self.model_name, "effnet.task": self.task}
        )
        await self.registry.start()

    async def close(self) -> None:
        await self.registry.close()
        if self._run_span is not None:
            self._run_span.end()
            self._run_span = None
            await asyncio.to_thread(tracing.shutdown, 5.0)

    async def run(self, path: str, data: bytes) -> Result:
        record = AccessRecord("CLI", path, endpoint=self.task)
        if self._run_span is not None:
            record.start_trace("efficientnet-batch image", "internal", {"effnet.file": path}, parent=self._run_span)
        wish = CamWish(top=1) if self.cams is not None else None
        try:
            ((pooled, logits, *explained),) = await self.served.serve(InferenceRequest(images=[(None, data)], cam=wish),
                                                                      record=record)
        except ServiceError as exc:
            record.fail(exc)
            # The core names the image by its position in a request ("image 1: ..."); here the row names it.
            return failure(path, exc.code, exc.detail)
        finally:
            record.finish(self.metrics)
        if self.task == "predict":
            scores = top_classes(logits, self.model.labels, self.top_k)
            cam = None
            if self.cams is not None:
                maps, classes, crop = explained
                png = await self.cams.write(path, data, maps[0], crop)
                cam = {"index": classes[0], "label": self.model.labels[classes[0]], "png": png,
                       "npy": png[: -len(".png")] + ".npy"}
            return Result(path, top_k=[{"index": c.index, "label": c.label, "score": c.score} for c in scores],
                          cam=cam)
        return Result(path, embedding=embedding(pooled, normalize=self.normalize))
