"""The models one server serves, by name, and the server's lifecycle over them.

Each model is an ``InferenceService`` of its own (engine, dynamic batcher, queue bound, statistics), so a
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
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from service.core.errors import (
    ModelControlDisabled,
    ModelLoadFailed,
    ModelNotFound,
    ServiceError,
    StartupError,
)
from service.core.loading import LoadedModel, load_model
from service.core.metrics import Metrics
from service.core.repository import ModelRepository
from service.core.runtime import AdmissionBudget, InferenceService, Lifecycle
from service.core.settings import Settings

log = logging.getLogger("service.core.registry")

# After a reload or an unload, how long the old model still admits requests: those that were routed to it
# just before the switch (a front-end looks the model up, then admits) are answered, not refused.
RETIRE_GRACE_S = 0.5


@dataclass(frozen=True)
class StartupModel:
    """A model loaded before the server starts: its name (None: the variant's), settings and engine."""

    name: str | None
    settings: Settings
    loaded: LoadedModel


def load_startup_models(settings: Settings) -> list[StartupModel]:
    """Every model the server starts with, loaded (``StartupError`` naming the model that failed): the
    repository's (or ``EFFNET_MODELS``), or the one of ``EFFNET_MODEL`` / ``EFFNET_WEIGHTS``."""
    if not settings.model_repository:
        return [StartupModel(None, settings, load_model(settings))]
    repository = ModelRepository(settings.model_repository, settings)
    names = repository.startup_names(settings.models)
    if settings.default_model and settings.default_model not in names:
        raise StartupError(f"EFFNET_DEFAULT_MODEL={settings.default_model} is not among the models loaded at "
                           f"start ({', '.join(names)})")
    models = []
    for name in names:
        spec = repository.spec(name)
        started = time.perf_counter()
        try:
            loaded = load_model(spec.settings)
        except StartupError as exc:
            raise StartupError(f"model '{name}' ({spec.source}): {exc}") from None
        log.info("model '%s' loaded in %.2f s: %s", name, time.perf_counter() - started, _describe(loaded))
        models.append(StartupModel(name, spec.settings, loaded))
    return models


def _describe(loaded: LoadedModel) -> str:
    engine = loaded.engine
    head = f"{loaded.num_classes} classes" if loaded.has_classifier else "features only"
    return f"{loaded.variant.name}, {head}, {engine.backend} on {engine.device} ({engine.dtype})"


class ModelRegistry:
    def __init__(self, settings: Settings, metrics: Metrics, models: Iterable[StartupModel]) -> None:
        self.settings = settings = settings.resolved()
        self.metrics = metrics
        self.repository: ModelRepository | None = None
        self._decode_pool = ThreadPoolExecutor(settings.effective_decode_threads, thread_name_prefix="effnet-decode")
        self._budget = AdmissionBudget(settings.max_queue_total)
        self.services: dict[str, InferenceService] = {}
        self._startup: list[InferenceService] = []
        for model in models:
            service = self._build(model.name, model.settings, model.loaded)
            self.services[service.name] = service
            self._startup.append(service)
        self.control = settings.model_control
        self._phase = Lifecycle.STARTING  # STARTING, READY (running: the models decide), or on the way out
        self._state = Lifecycle.STARTING
        self._listeners: list[Callable[[Lifecycle], None]] = []
        self._locks: dict[str, asyncio.Lock] = {}
        self._background: set[asyncio.Task[object]] = set()  # loads and retirements under way
        self.failure: str | None = None
        if settings.default_model and settings.default_model not in self.services:
            raise StartupError(f"EFFNET_DEFAULT_MODEL={settings.default_model} is not among the models loaded "
                               f"({', '.join(self.services)})")

    def use_repository(self, repository: ModelRepository | None) -> None:
        """The repository that ``load`` reads (None: models cannot be loaded at run time)."""
        self.repository = repository

    def _build(self, name: str | None, settings: Settings, loaded: LoadedModel,
               previous: InferenceService | None = None) -> InferenceService:
        return InferenceService(settings, loaded, self.metrics, name=name, decode_pool=self._decode_pool,
                                statistics=previous.statistics if previous is not None else None,
                                budget=self._budget)

    # -- choosing a model ---------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return sorted(self.services)

    @property
    def default_name(self) -> str | None:
        """The model a request that names none gets: ``EFFNET_DEFAULT_MODEL``, else the only one."""
        if self.settings.default_model:
            return self.settings.default_model
        return next(iter(self.services)) if len(self.services) == 1 else None

    def get(self, name: str | None = None) -> InferenceService:
        """The model called ``name`` (None or "": the default model); ``ModelNotFound`` (404) listing the
        served names otherwise."""
        if not name:
            default = self.default_name
            if default is None:
                raise ModelNotFound(f"this server serves several models ({', '.join(self.names)}); name one "
                                    "with ?model=NAME")
            name = default
        service = self.services.get(name)
        if service is None:
            served = ", ".join(self.names) or "none"
            if self.repository is not None and name in self.repository:
                raise ModelNotFound(f"model '{name}' is not loaded; this server serves: {served}")
            raise ModelNotFound(f"unknown model '{name}'; this server serves: {served}")
        return service

    def index(self) -> list[dict[str, str]]:
        """The repository index (Triton's): every model the repository holds and every one served, with
        its state (READY, LOADING, UNAVAILABLE) and why it is not ready."""
        known = set(self.services)
        if self.repository is not None:
            known |= set(self.repository.names())
        entries = []
        for name in sorted(known):
            service = self.services.get(name)
            if service is None:
                state, reason = ("LOADING", "") if self._loading(name) else ("UNAVAILABLE", "unloaded")
            elif service.state.ready:
                state, reason = "READY", ""
            elif service.state in (Lifecycle.STARTING, Lifecycle.WARMING):
                state, reason = "LOADING", "warming up"
            else:
                state, reason = "UNAVAILABLE", service.failure or service.state.value
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
        if self._phase is not Lifecycle.READY:
            raise self.state.not_ready_error()

    async def load(self, name: str) -> InferenceService:
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

    async def _load(self, name: str) -> InferenceService:
        assert self.repository is not None
        async with self._locks.setdefault(name, asyncio.Lock()):
            previous = self.services.get(name)
            still = "; the loaded one still serves" if previous is not None else ""
            started = time.perf_counter()
            try:
                spec = self.repository.spec(name)
                loaded = await asyncio.to_thread(load_model, spec.settings)
            except StartupError as exc:
                raise ModelLoadFailed(f"failed to load model '{name}': {exc}{still}") from None
            except Exception as exc:  # anything unforeseen is still this load's failure, in one line
                first = (str(exc).strip().splitlines() or [""])[0]
                log.exception("loading model '%s' failed", name)
                raise ModelLoadFailed(f"failed to load model '{name}': {type(exc).__name__}: {first}{still}") from None
            service = self._build(name, spec.settings, loaded, previous)
            await service.start()
            await service.warmed_up()
            if not service.state.ready:
                failure = service.failure or service.state.value
                await service.close()
                raise ModelLoadFailed(f"failed to load model '{name}': {failure}{still}")
            if self._phase is not Lifecycle.READY:  # the server began to shut down meanwhile
                await service.close()
                raise self.state.not_ready_error()
            self.services[name] = service
            service.add_state_listener(lambda _state: self._notify())
            self._set_info(service)
            log.info("model '%s' %s in %.2f s: %s", name, "reloaded" if previous else "loaded",
                     time.perf_counter() - started, _describe(loaded))
            if previous is not None:
                self._retire(name, previous)
            self._notify()
            return service

    async def unload(self, name: str) -> None:
        """Stop serving ``name``: new requests get 404 at once; returns once its admitted requests are
        answered and it is freed. Unloading a model the repository holds but that is not loaded is a no-op."""
        self._check_control("unloaded")
        assert self.repository is not None
        if name not in self.services and name not in self.repository:  # before a lock is kept for the name
            raise ModelNotFound(f"unknown model '{name}'; this server serves: {', '.join(self.names) or 'none'}")
        async with self._locks.setdefault(name, asyncio.Lock()):
            service = self.services.pop(name, None)
            if service is None:
                return
            self.metrics.remove_model(name)
            log.info("model '%s' unloaded", name)
            self._notify()
            task = self._retire(name, service)
            del service  # the retiring task holds the last reference, so the model is freed when it ends
            await asyncio.shield(task)

    def _retire(self, name: str, service: InferenceService) -> asyncio.Task[None]:
        """Let ``service`` (no longer routed to) answer what it admitted, then close and free it."""
        held = [service]
        device = str(service.model.engine.device)

        async def retire() -> None:
            old = held.pop()
            old.enter_lame_duck()  # still admits: requests routed to it just before the switch
            await asyncio.sleep(RETIRE_GRACE_S)
            # Every request it admitted is answered (each within its own deadline), then it is freed.
            await old.drain(old.settings.request_timeout_s + 1.0)
            await old.close()
            del old
            await asyncio.to_thread(_release, device)
            log.info("model '%s': the previous instance is drained and freed", name)

        del service
        task = asyncio.get_running_loop().create_task(retire(), name=f"effnet-retire-{name}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # -- lifecycle -------------------------------------------------------------------------------------------
    @property
    def state(self) -> Lifecycle:
        return self._state

    @property
    def ready(self) -> bool:
        return self._state.ready

    def add_state_listener(self, listener: Callable[[Lifecycle], None]) -> None:
        self._listeners.append(listener)

    def remove_state_listener(self, listener: Callable[[Lifecycle], None]) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def _compute(self) -> Lifecycle:
        if self._phase is not Lifecycle.READY:
            return self._phase
        if self.failure is not None:
            return Lifecycle.FAILED
        states = [s.state for s in self.services.values()]
        if any(s in (Lifecycle.STARTING, Lifecycle.WARMING) for s in states):
            return Lifecycle.WARMING
        return Lifecycle.READY

    def _notify(self) -> None:
        # A start-up model that failed its warm-up fails the server (the process exits non-zero).
        if self.failure is None:
            for service in self._startup:
                if service.state is Lifecycle.FAILED:
                    multi = len(self._startup) > 1 or self.settings.model_repository
                    self.failure = f"model '{service.name}': {service.failure}" if multi else service.failure
                    break
        state = self._compute()
        if state is self._state:
            return
        self._state = state
        self.metrics.ready.set(1 if state is Lifecycle.READY else 0)
        log.info("state: %s", state.value)
        for listener in list(self._listeners):
            try:
                listener(state)
            except Exception:  # a front-end's hook must not break the lifecycle
                log.exception("state listener failed")

    def _set_info(self, service: InferenceService) -> None:
        engine = service.model.engine
        self.metrics.set_model(service.name, str(engine.device), str(engine.dtype), engine.backend)

    async def start(self) -> None:
        for service in self.services.values():
            service.add_state_listener(lambda _state: self._notify())
            self._set_info(service)
        self._phase = Lifecycle.READY
        for service in list(self.services.values()):
            await service.start()
        self._notify()

    def enter_lame_duck(self) -> bool:
        """SIGTERM's first step (see ``Lifecycle``); False if the server was not ready."""
        if self._state is not Lifecycle.READY:
            return False
        self._phase = Lifecycle.LAME_DUCK
        for service in self.services.values():
            service.enter_lame_duck()  # each still admits; its V2 ready turns false with the server's
        self._notify()
        return True

    async def drain(self, timeout: float) -> bool:
        """Stop admitting work on every model and wait (up to ``timeout``) for what each admitted."""
        if self._phase not in (Lifecycle.DRAINING, Lifecycle.STOPPED):
            self._phase = Lifecycle.DRAINING
            self._notify()
        results = await asyncio.gather(*(s.drain(timeout) for s in self.services.values()))
        return all(results)

    async def close(self) -> None:
        await self.drain(self.settings.shutdown_drain_s)
        await asyncio.gather(*(s.close() for s in self.services.values()))
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        self._decode_pool.shutdown(wait=False, cancel_futures=True)
        self._phase = Lifecycle.STOPPED
        self._notify()


def _release(device: str) -> None:
    """Free a retired model's memory now rather than at the next collection (and its GPU memory)."""
    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


__all__ = ["RETIRE_GRACE_S", "ModelRegistry", "ServiceError", "StartupModel", "load_startup_models"]
