"""The models one server serves, by name, and the server's lifecycle over them.

Each model is a ``ServedModel`` of its own (engine, dynamic batcher, queue bound, statistics), so a
batch never mixes models; they share the decode threads. Without ``EFFNET_MODEL_REPOSITORY`` there is one
model, named after its variant, exactly as before. With one (``service.core.repository``) every model the
repository (or ``EFFNET_MODELS``) names is loaded before the server opens its ports.

``load(name)`` (the repository API, ``EFFNET_MODEL_CONTROL=explicit``) builds and warms the new model beside
the old, then sends new requests to it; the old one keeps answering what it admitted and is freed once it
has (``retire``). A load that fails leaves the old one serving. ``unload(name)`` stops sending requests to
the model (they get 404) and frees it once its admitted requests are answered.

The registry is what the probes and the shutdown see: ``state`` is one ``Lifecycle`` for the server (ready
while every model it should serve is warm), with the same listeners, lame duck and drain as one model's.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from service.core import tracing
from service.core.errors import (
    ModelControlDisabled,
    ModelLoadFailed,
    ModelNotFound,
    ServiceError,
    StartupError,
)
from service.core.lifecycle import Lifecycle, State
from service.core.metrics import Metrics
from service.core.models import LoadedModel
from service.core.repository import ModelRepository
from service.core.runtime import QueueBudget, ServedModel
from service.core.settings import ModelSettings, ModelSpec, ServerSettings

log = logging.getLogger("service.core.registry")


def load_model(spec: ModelSpec) -> LoadedModel:
    """``service.core.loading.load_model``, imported when a model is loaded: the registry module itself
    imports no torch (a front-end worker mirrors the engine process's registry without it)."""
    from service.core.loading import load_model as load

    return load(spec)

# After a reload or an unload, how long the old model still admits requests: those that were routed to it
# just before the switch (a front-end looks the model up, then admits) are answered, not refused.
RETIRE_GRACE_S = 0.5


@dataclass
class Startup:
    """What a server (or the batch command, in-process) has before it serves: the model repository, if
    any, and the models loaded from it or from the EFFNET_* settings."""

    repository: ModelRepository | None
    models: list[LoadedModel]


def load_startup(server: ServerSettings, base: ModelSettings | None = None, *,
                 only: Sequence[str] | None = None) -> Startup:
    """Everything before serving, in the order a start can fail: tracing from the ``OTEL_*`` variables
    (the one place it is set up), then the models (``StartupError`` naming the one that failed): the
    repository's (``EFFNET_MODELS``, or ``only``), or the one of ``EFFNET_MODEL`` / ``EFFNET_WEIGHTS``.
    ``base``: the model settings from the environment (read here when not given)."""
    tracing.setup(detail=server.trace_detail)
    base = base if base is not None else ModelSettings()
    if not server.model_repository:
        return Startup(None, [load_model(ModelSpec(None, "EFFNET_* settings", base))])
    repository = ModelRepository(server.model_repository, base)
    names = list(only) if only else repository.startup_names(server.models)
    if not only and server.default_model and server.default_model not in names:
        raise StartupError(f"EFFNET_DEFAULT_MODEL={server.default_model} is not among the models loaded at "
                           f"start ({', '.join(names)})")
    models = []
    for name in names:
        spec = repository.spec(name)
        started = time.perf_counter()
        try:
            loaded = load_model(spec)
        except StartupError as exc:
            raise StartupError(f"model '{name}' ({spec.source}): {exc}") from None
        log.info("model '%s' loaded in %.2f s: %s", name, time.perf_counter() - started, loaded.describe())
        models.append(loaded)
    return Startup(repository, models)


def default_model_name(server: ServerSettings, names: Sequence[str]) -> str | None:
    """The model a request that names none gets: ``EFFNET_DEFAULT_MODEL``, else the only one (None when
    there are several and no default)."""
    if server.default_model:
        return server.default_model
    return names[0] if len(names) == 1 else None


class ServedModels(ABC):
    """The served models by name and the server's lifecycle over them, as every door sees them: the
    rules of choosing a model and of the lame duck and the drain, written once for the in-process
    ``ModelRegistry`` and a front-end worker's ``RemoteRegistry`` (service/core/engine_client.py)."""

    server: ServerSettings
    models: dict[str, ServedModel]
    lifecycle: Lifecycle

    # -- choosing a model ---------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return sorted(self.models)

    @property
    def default_name(self) -> str | None:
        """The model a request that names none gets: ``EFFNET_DEFAULT_MODEL``, else the only one."""
        return default_model_name(self.server, list(self.models))

    def in_repository(self, name: str) -> bool:
        """Whether the model repository holds ``name`` (loaded or not)."""
        return False

    # -- the repository extension (Triton's): index, load (or reload), unload ---------------------------------
    @abstractmethod
    async def index(self) -> list[dict[str, str]]:
        """Every model the repository holds and every one served, with its state."""

    @abstractmethod
    async def load(self, name: str) -> object:
        """Load ``name`` from the repository, or reload it."""

    @abstractmethod
    async def unload(self, name: str) -> None:
        """Stop serving ``name``."""

    def get(self, name: str | None = None, *, or_first: bool = False) -> ServedModel:
        """The model called ``name`` (None or "": the default model); ``ModelNotFound`` (404) listing the
        served names otherwise. ``or_first``: with several models and no default, an unnamed request gets
        the first by name instead of a 404 (``/info``, which is how a client learns the names)."""
        if not name:
            default = self.default_name
            if default is None and or_first and self.models:
                default = self.names[0]
            if default is None:
                raise ModelNotFound(f"this server serves several models ({', '.join(self.names)}); name one "
                                    "with ?model=NAME")
            name = default
        model = self.models.get(name)
        if model is None:
            served = ", ".join(self.names) or "none"
            if self.in_repository(name):
                raise ModelNotFound(f"model '{name}' is not loaded; this server serves: {served}")
            raise ModelNotFound(f"unknown model '{name}'; this server serves: {served}")
        return model

    # -- lifecycle -------------------------------------------------------------------------------------------
    @property
    def state(self) -> State:
        return self.lifecycle.state

    @property
    def ready(self) -> bool:
        return self.lifecycle.state.ready

    @property
    def failure(self) -> str | None:
        return self.lifecycle.failure

    @property
    def busy(self) -> bool:
        return any(m.busy for m in self.models.values())

    def enter_lame_duck(self) -> bool:
        """SIGTERM's first step (see ``State``); False if the server was not ready."""
        if not self.lifecycle.enter_lame_duck():
            return False
        for model in self.models.values():
            model.lifecycle.enter_lame_duck()  # each still admits; its V2 ready turns false with the server's
        return True

    async def drain(self, timeout: float) -> bool:
        """Stop admitting work on every model and wait (up to ``timeout``) for what each admitted."""
        self.lifecycle.begin_drain()
        for model in self.models.values():
            model.lifecycle.begin_drain()
        drained = await self.lifecycle.drain(timeout, lambda: self.busy)
        if not drained:
            log.warning("drain timed out with %d request(s) in flight",
                        sum(m.inflight for m in self.models.values()))
        return drained


class ModelRegistry(ServedModels):
    """The served models by name, the server's lifecycle over them, and the repository API.

    ``startup``: the models loaded before the server starts (``load_startup``) and the repository that
    ``load`` reads (None: models cannot be loaded at run time)."""

    def __init__(self, server: ServerSettings, metrics: Metrics, startup: Startup) -> None:
        self.server = server
        self.metrics = metrics
        self.repository = startup.repository
        self.decode_threads = server.decode_threads_for(m.settings for m in startup.models)
        self._decode_pool = ThreadPoolExecutor(self.decode_threads, thread_name_prefix="effnet-decode")
        self._budget = QueueBudget(server.max_queue_total)
        self.models: dict[str, ServedModel] = {}
        self._startup: list[ServedModel] = []
        for loaded in startup.models:
            model = self._build(loaded)
            self.models[model.name] = model
            self._startup.append(model)
        self.control = server.model_control
        # While running (phase ready) the server's state is its models' (warming, failed or ready).
        self.lifecycle = Lifecycle(derive=self._derive)
        self.lifecycle.add_listener(lambda state: self.metrics.ready.set(1 if state is State.READY else 0))
        self._models_changed: list[Callable[[], None]] = []
        self._locks: dict[str, asyncio.Lock] = {}
        self._background: set[asyncio.Task[object]] = set()  # loads and retirements under way
        if server.default_model and server.default_model not in self.models:
            raise StartupError(f"EFFNET_DEFAULT_MODEL={server.default_model} is not among the models loaded "
                               f"({', '.join(self.models)})")

    def on_models_changed(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` when a model is loaded, reloaded or unloaded, or a model's state changes."""
        self._models_changed.append(listener)

    def _build(self, loaded: LoadedModel, previous: ServedModel | None = None) -> ServedModel:
        return ServedModel(loaded, self.server, self.metrics, decode_pool=self._decode_pool,
                           statistics=previous.statistics if previous is not None else None,
                           budget=self._budget)

    def in_repository(self, name: str) -> bool:
        return self.repository is not None and name in self.repository

    async def index(self) -> list[dict[str, str]]:
        """The repository index (Triton's): every model the repository holds and every one served, with
        its state (READY, LOADING, UNAVAILABLE) and why it is not ready."""
        known = set(self.models)
        if self.repository is not None:
            known |= set(self.repository.names())
        entries = []
        for name in sorted(known):
            model = self.models.get(name)
            if model is None:
                state, reason = ("LOADING", "") if self._loading(name) else ("UNAVAILABLE", "unloaded")
            elif model.state.ready:
                state, reason = "READY", ""
            elif model.state in (State.STARTING, State.WARMING):
                state, reason = "LOADING", "warming up"
            else:
                state, reason = "UNAVAILABLE", model.failure or model.state.value
            entries.append({"name": name, "version": "1", "state": state, "reason": reason})
        return entries

    def _loading(self, name: str) -> bool:
        lock = self._locks.get(name)
        return lock is not None and lock.locked()

    # -- loading and unloading while serving ----------------------------------------------------------------
    def _check_control(self, action: str) -> None:
        if self.control != "explicit":
            raise ModelControlDisabled(f"models cannot be {action} while serving: EFFNET_MODEL_CONTROL is "
                                       "none (set it to explicit to allow the repository API)")
        if self.repository is None:
            raise ModelControlDisabled(f"models cannot be {action} while serving: the server has no model "
                                       "repository (EFFNET_MODEL_REPOSITORY)")
        if self.lifecycle.phase is not State.READY:
            raise self.state.not_ready_error()

    async def load(self, name: str) -> ServedModel:
        """Load ``name`` from the repository, or reload it if it is loaded: the new model is built and
        warmed beside the old, then takes the new requests while the old answers what it admitted.
        ``ModelLoadFailed`` (and the old model still serving) if the new one cannot be loaded. A caller
        that leaves (a gRPC deadline) does not stop the load halfway: it finishes or fails on its own."""
        self._check_control("loaded")
        assert self.repository is not None
        if name not in self.repository:
            raise ModelNotFound(f"no model '{name}' in the repository (it has: "
                                f"{', '.join(self.repository.names()) or 'nothing'})")
        task = asyncio.get_running_loop().create_task(self._load(name), name=f"effnet-load-{name}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return await asyncio.shield(task)

    async def _load(self, name: str) -> ServedModel:
        assert self.repository is not None
        async with self._locks.setdefault(name, asyncio.Lock()):
            previous = self.models.get(name)
            still = "; the loaded one still serves" if previous is not None else ""
            started = time.perf_counter()
            try:
                spec = self.repository.spec(name)
                loaded = await asyncio.to_thread(load_model, spec)
            except StartupError as exc:
                raise ModelLoadFailed(f"failed to load model '{name}': {exc}{still}") from None
            except Exception as exc:  # anything unforeseen is still this load's failure, in one line
                first = (str(exc).strip().splitlines() or [""])[0]
                log.exception("loading model '%s' failed", name)
                raise ModelLoadFailed(f"failed to load model '{name}': {type(exc).__name__}: {first}{still}") from None
            model = self._build(loaded, previous)
            await model.start()
            await model.warmed_up()
            if not model.state.ready:
                failure = model.failure or model.state.value
                await model.close()
                raise ModelLoadFailed(f"failed to load model '{name}': {failure}{still}")
            if self.lifecycle.phase is not State.READY:  # the server began to shut down meanwhile
                await model.close()
                raise self.state.not_ready_error()
            self.models[name] = model
            model.lifecycle.add_listener(self._model_changed)
            self._set_info(model)
            log.info("model '%s' %s in %.2f s: %s", name, "reloaded" if previous else "loaded",
                     time.perf_counter() - started, loaded.describe())
            if previous is not None:
                self._retire(name, previous)
            self._model_changed()
            return model

    async def unload(self, name: str) -> None:
        """Stop serving ``name``: new requests get 404 at once; returns once its admitted requests are
        answered and it is freed. Unloading a model the repository holds but that is not loaded is a no-op."""
        self._check_control("unloaded")
        assert self.repository is not None
        if name not in self.models and name not in self.repository:  # before a lock is kept for the name
            raise ModelNotFound(f"unknown model '{name}'; this server serves: {', '.join(self.names) or 'none'}")
        async with self._locks.setdefault(name, asyncio.Lock()):
            model = self.models.pop(name, None)
            if model is None:
                return
            self.metrics.remove_model(name)
            log.info("model '%s' unloaded", name)
            self._model_changed()
            task = self._retire(name, model)
            del model  # the retiring task holds the last reference, so the model is freed when it ends
            await asyncio.shield(task)

    def _retire(self, name: str, model: ServedModel) -> asyncio.Task[None]:
        """Let ``model`` (no longer routed to) answer what it admitted, then close and free it."""
        held = [model]
        device = str(model.model.engine.device)

        async def retire() -> None:
            old = held.pop()
            old.lifecycle.enter_lame_duck()  # still admits: requests routed to it just before the switch
            await asyncio.sleep(RETIRE_GRACE_S)
            # Every request it admitted is answered (each within its own deadline), then it is freed.
            await old.drain(old.server.request_timeout_s + 1.0)
            await old.close()
            del old
            await asyncio.to_thread(_release, device)
            log.info("model '%s': the previous instance is drained and freed", name)

        del model
        task = asyncio.get_running_loop().create_task(retire(), name=f"effnet-retire-{name}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # -- lifecycle -------------------------------------------------------------------------------------------
    def _derive(self) -> State:
        if self.lifecycle.failure is not None:
            return State.FAILED
        if any(m.state in (State.STARTING, State.WARMING) for m in self.models.values()):
            return State.WARMING
        return State.READY

    def _model_changed(self, _state: State | None = None) -> None:
        # A start-up model that failed its warm-up fails the server (the process exits non-zero).
        if self.lifecycle.failure is None:
            for model in self._startup:
                if model.state is State.FAILED:
                    multi = len(self._startup) > 1 or self.server.model_repository
                    self.lifecycle.failure = f"model '{model.name}': {model.failure}" if multi else model.failure
                    break
        self.lifecycle.refresh()
        for listener in list(self._models_changed):
            listener()

    def _set_info(self, model: ServedModel) -> None:
        engine = model.model.engine
        self.metrics.set_model(model.name, str(engine.device), str(engine.dtype), engine.backend)

    async def start(self) -> None:
        for model in self.models.values():
            model.lifecycle.add_listener(self._model_changed)
            self._set_info(model)
        self.lifecycle.set(State.READY)  # running: the state is now the models'
        for model in list(self.models.values()):
            await model.start()
        self._model_changed(self.state)

    async def close(self) -> None:
        await self.drain(self.server.shutdown_drain_s)
        await asyncio.gather(*(m.close() for m in self.models.values()))
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        self._decode_pool.shutdown(wait=False, cancel_futures=True)
        self.lifecycle.set(State.STOPPED)


def _release(device: str) -> None:
    """Free a retired model's memory now rather than at the next collection (and its GPU memory)."""
    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


__all__ = ["RETIRE_GRACE_S", "ModelRegistry", "ServedModels", "ServiceError", "Startup", "default_model_name",
           "load_startup"]
