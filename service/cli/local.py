"""In-process inference: the core's ``InferenceService``, as the server runs it, without any transport.

Each image is one ``infer`` call, so a bad image fails only its own row. Many calls are in flight at once:
the service's decode threads turn bytes into arrays while its inference thread runs the previous batch,
and the dynamic batcher groups the decoded images into batches of up to ``EFFNET_MAX_BATCH_SIZE``.
"""

from __future__ import annotations

import asyncio

from service.cli.results import Result, failure
from service.core import tracing
from service.core.access import AccessRecord
from service.core.errors import ServiceError
from service.core.loading import LoadedModel, load_model
from service.core.metrics import Metrics
from service.core.outputs import embedding, top_classes
from service.core.runtime import InferenceRequest, InferenceService
from service.core.settings import Settings

# The deadline of one image unless EFFNET_REQUEST_TIMEOUT_S is set: a batch job never overfills the queue
# (see ``default_concurrency``), so an image waits for at most a few batches; this only bounds a hung engine.
IMAGE_DEADLINE_S = 3600.0


class LocalRunner:
    """Loads the model from ``settings`` (the server's EFFNET_* settings, or a repository model's) and runs
    images through it. ``name``: the model's name in its repository (default: the variant's)."""

    def __init__(self, settings: Settings, task: str, *, top_k: int = 5, normalize: bool = False,
                 model: LoadedModel | None = None, name: str | None = None) -> None:
        self.settings = settings
        self.task = task
        self.top_k = top_k
        self.normalize = normalize
        self.model = model if model is not None else load_model(settings)
        self.model_name = name or self.model.variant.name
        self.num_classes = self.model.num_classes
        self.dim = self.model.num_features
        self.max_file_bytes = settings.max_body_bytes
        self.file_limit_name = "EFFNET_MAX_BODY_BYTES"  # what a file over max_file_bytes is told
        self._service: InferenceService | None = None
        self._run_span = None  # the whole run's span (tracing on): one trace, a child span per image

    def default_concurrency(self) -> int:
        """Images in flight: enough to keep every decode thread busy while two batches wait to run."""
        s = self.settings
        return min(s.max_queue, 2 * s.max_batch_size + 2 * s.effective_decode_threads)

    def describe(self) -> str:
        e = self.model.engine
        variant = self.model.variant.name
        named = self.model_name if self.model_name == variant else f"{self.model_name} ({variant})"
        return f"{named} in-process ({e.backend}, {e.device}, {e.dtype})"

    async def start(self) -> None:
        tracing.setup()
        self._run_span = tracing.start_span(
            f"efficientnet-batch {self.task}", {"effnet.model": self.model_name, "effnet.task": self.task}
        )
        self.metrics = Metrics(self.settings.max_batch_size, process_metrics=False)
        self._service = InferenceService(self.settings, self.model, self.metrics, name=self.model_name)
        await self._service.start()

    async def close(self) -> None:
        if self._service is not None:
            await self._service.close()
        if self._run_span is not None:
            self._run_span.end()
            self._run_span = None
            await asyncio.to_thread(tracing.shutdown, 5.0)

    async def run(self, path: str, data: bytes) -> Result:
        service = self._service
        assert service is not None, "start() first"
        record = AccessRecord("CLI", path)
        if self._run_span is not None:
            record.start_trace(parent=self._run_span)
        try:
            ((pooled, logits),) = await service.serve(
                InferenceRequest(images=[(None, data)]), record=record
            )
        except ServiceError as exc:
            record.fail(exc)
            # The core names the image by its position in a request ("image 1: ..."); here the row names it.
            return failure(path, exc.code, exc.detail)
        finally:
            record.finish(self.metrics)
        if self.task == "predict":
            scores = top_classes(logits, self.model.labels, self.top_k)
            return Result(path, top_k=[{"index": c.index, "label": c.label, "score": c.score} for c in scores])
        return Result(path, embedding=embedding(pooled, normalize=self.normalize))
