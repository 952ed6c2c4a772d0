"""Server mode: each image is one ``POST /predict`` or ``/features`` to a running service (or a load balancer).

At most ``concurrency`` requests are in flight (one per worker, and the connection pool holds no more).
What an image cannot help is retried: a 503 (overloaded, warming up, draining; its ``Retry-After`` is
honoured), a 429, a gateway's 502/504, the service's own 504, and connection failures, with exponential
backoff and jitter. When an image's retries run out the server is treated as gone and the run stops
(resumable), rather than writing an error row for every image left. What is the image's own fault
(400, 413, 415, a 500 from its batch) is its error row, with the service's code and message. A refused
API key (401/403) or a URL that is not the service (404) stops the run at once.

``model``: the served model's name, sent as ``?model=NAME`` with ``/info`` and every image, for a server
that serves several. A model the server does not serve (404 ``model_not_found``, on ``/info`` before any
image is sent, or on an image when it is unloaded mid-run) stops the run with the server's message.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
from typing import Any
from urllib.parse import quote

import httpx
import numpy as np

from service.cli.results import FatalError, Result, failure
from service.core import tracing

RETRY_STATUSES = {429, 502, 503, 504}
FATAL_STATUSES = {401, 403, 404, 405}
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0
RETRY_AFTER_MAX_S = 120.0


def retry_after_seconds(value: str | None) -> float | None:
    """``Retry-After`` as seconds: delta-seconds or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def backoff_seconds(attempt: int, retry_after: float | None = None) -> float:
    """Wait before retry number ``attempt`` (1-based): exponential with jitter, never below Retry-After."""
    exponential = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** (attempt - 1)) * random.uniform(0.8, 1.2)
    if retry_after is not None:
        return max(min(retry_after, RETRY_AFTER_MAX_S), exponential)
    return exponential


_RAW_IMAGE = {"Content-Type": "application/octet-stream"}


def _error_of(response: httpx.Response) -> tuple[str, str]:
    """(code, message) from the service's JSON error body, or from whatever a proxy answered."""
    try:
        error = response.json()["error"]
        # An error about one image says which ("image 1: ...") and gives the bare ``reason`` beside it; the
        # row names the image itself.
        return str(error["code"]), str(error.get("reason") or error["message"])
    except Exception:  # a proxy's HTML page, an empty body
        text = " ".join(response.text.split())[:200]
        return f"http_{response.status_code}", text or response.reason_phrase


class RemoteRunner:
    def __init__(self, url: str, task: str, *, top_k: int = 5, normalize: bool = False, api_key: str | None = None,
                 concurrency: int = 8, retries: int = 10, timeout_s: float = 120.0, model: str | None = None,
                 cam: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.task = task
        self.top_k = top_k
        self.normalize = normalize
        self.concurrency = concurrency
        self.retries = retries
        self.timeout_s = timeout_s
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.retried = 0  # requests sent again (503, connection failures, ...), for the summary
        self.model_name = "?"
        self.num_classes = 0
        self.dim = 0
        self.max_file_bytes: int | None = None
        self.file_limit_name = "the server's"  # what a file over max_file_bytes is told
        self._client: httpx.AsyncClient | None = None
        self._run_span: Any = None  # the run's span (tracing on): each request a client span under it
        self.model = model
        # The query string once, not merged into every request's URL.
        chosen = f"&model={quote(model, safe='')}" if model else ""
        self.cams = None
        if task == "predict" and cam:
            from service.cli.cams import CamWriter

            # /explain: the same top-k, a map for each (the first is the top-1's, the one drawn).
            self.cams = CamWriter(cam, max_pixels=1 << 62)  # the server has applied its own pixel limit
            self._target = f"/explain?top_k={top_k}{chosen}"
        elif task == "predict":
            self._target = f"/predict?top_k={top_k}{chosen}"
        else:
            self._target = f"/features?normalize={'true' if normalize else 'false'}{chosen}"
        self._info_target = f"/info?model={quote(model, safe='')}" if model else "/info"

    def default_concurrency(self) -> int:
        return self.concurrency

    def describe(self) -> str:
        return f"{self.model_name} at {self.url}"

    async def start(self) -> None:
        tracing.setup()
        attributes = {"effnet.task": self.task, "server.address": self.url}
        if self.model:
            attributes["effnet.model"] = self.model
        self._run_span = tracing.start_span(f"efficientnet-batch {self.task}", attributes)
        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        timeout = httpx.Timeout(self.timeout_s, connect=10.0)
        self._client = httpx.AsyncClient(base_url=self.url, limits=limits, timeout=timeout, headers=self.headers)
        info = await self._get_info()
        served = [m for m in info.get("models") or [] if isinstance(m, dict)]
        if not self.model and len(served) > 1 and not any(m.get("default") for m in served):
            # /info describes the first model then, but /predict would refuse every image: say so now.
            names = ", ".join(str(m.get("name")) for m in served)
            raise FatalError(f"{self.url}: this server serves several models ({names}) and none by default "
                             "(choose one with --model NAME)")
        self.model_name = str(info.get("model", "?"))
        if self.model and self.model_name != self.model:  # a server from before ?model= ignores it
            raise FatalError(f"{self.url}/info answered for model '{self.model_name}', not '{self.model}': "
                             "this server cannot choose a model by name")
        self.num_classes = int(info.get("num_classes", 0))
        self.dim = int(info.get("num_features", 0))
        limits_info = info.get("limits") or {}
        self.max_file_bytes = limits_info.get("max_body_bytes")

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
        if self._run_span is not None:
            self._run_span.end()
            self._run_span = None
            await asyncio.to_thread(tracing.shutdown, 5.0)

    async def _get_info(self) -> dict[str, Any]:
        """``GET /info`` (open even when an API key is set), retried like any request."""
        response = await self._send("GET", self._info_target, what="GET /info")
        if response.status_code != 200:
            code, message = _error_of(response)
            if code == "model_not_found":  # the service, but not that model
                raise FatalError(f"{self.url}: {message}")
            raise FatalError(f"{self.url}/info answered {response.status_code} ({message}): is this the service?")
        try:
            return response.json()
        except ValueError:
            raise FatalError(f"{self.url}/info did not answer JSON: is this the service?") from None

    async def _send(self, method: str, path: str, *, what: str, **kwargs: Any) -> httpx.Response:
        """One request, retried on 503/429/502/504 and connection failures; FatalError when retries run out."""
        assert self._client is not None, "start() first"
        attempt = 0
        while True:
            try:
                response = await self._client.request(method, path, **kwargs)
            except httpx.TransportError as exc:  # refused, reset, timed out, protocol error
                reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                wait = None
            else:
                if response.status_code not in RETRY_STATUSES:
                    return response
                code, message = _error_of(response)
                reason = f"{response.status_code} {code}: {message}"
                wait = retry_after_seconds(response.headers.get("retry-after"))
            attempt += 1
            if attempt > self.retries:
                retries = f"{self.retries} retr" + ("y" if self.retries == 1 else "ies")
                raise FatalError(f"{what}: giving up after {retries} ({reason})")
            self.retried += 1
            await asyncio.sleep(backoff_seconds(attempt, wait))

    async def run(self, path: str, data: bytes) -> Result:
        traced = tracing.start_client(f"POST {self._target.split('?', 1)[0]}", self._run_span,
                                      {"effnet.file": path, "http.request.method": "POST"})
        if traced is None:
            return await self._run(path, data, _RAW_IMAGE)
        span, trace_headers = traced
        status = None
        try:
            result = await self._run(path, data, {**_RAW_IMAGE, **trace_headers})
            status = "ok" if result.error is None else result.error["code"]
            return result
        finally:
            if status is None or status != "ok":
                code = status or "fatal"
                tracing.end_with_error(span, code, code, fault=status is None)
            span.end()

    async def _run(self, path: str, data: bytes, headers: dict[str, str]) -> Result:
        response = await self._send("POST", self._target, what=path, content=data, headers=headers)
        status = response.status_code
        endpoint = self._target.split("?", 1)[0]
        if status in FATAL_STATUSES:
            code, message = _error_of(response)
            hint = " (check --api-key)" if status in (401, 403) else ""
            raise FatalError(f"{self.url}{endpoint} answered {status} {code}: {message}{hint}")
        if status != 200:
            return failure(path, *_error_of(response))
        try:
            result = response.json()["results"][0]
            if self.task == "predict" and self.cams is not None:
                return await self._with_cam(path, data, result)
            if self.task == "predict":
                return Result(path, top_k=result["top_k"])
            return Result(path, embedding=np.asarray(result["embedding"], dtype=np.float64))
        except (ValueError, KeyError, IndexError, TypeError):
            return failure(path, "bad_response", f"the server answered 200 with an unexpected body: "
                                                 f"{response.text[:200]}")

    async def _with_cam(self, path: str, data: bytes, result: dict[str, Any]) -> Result:
        from service.core.imaging import Crop

        first, box = result["maps"][0], result["crop"]
        crop = Crop((box["left"], box["top"], box["right"], box["bottom"]), (box["width"], box["height"]))
        png = await self.cams.write(path, data, np.asarray(first["map"], dtype=np.float32), crop)
        cam = {"index": first["index"], "label": first["label"], "png": png, "npy": png[: -len(".png")] + ".npy"}
        return Result(path, top_k=result["top_k"], cam=cam)
