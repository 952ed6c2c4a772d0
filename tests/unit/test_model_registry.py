"""The model repository's files and the registry's rules, without networks: reading model.toml (and every
way it can be wrong), choosing a model by name, the bound across models, and a reload or unload that
answers what the old model admitted."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from service.core.errors import ModelControlDisabled, ModelNotFound, QueueFull, StartupError
from service.core.lifecycle import State
from service.core.loading import LoadedModel
from service.core.metrics import Metrics
from service.core.registry import ModelRegistry, Startup
from service.core.repository import ModelRepository
from service.core.runtime import InferenceRequest
from service.core.settings import ModelSettings
from tests.helpers.fakes import FakeEngine, fake_model, split_settings
from tests.helpers.repository import write_model


def test_a_model_toml_sets_its_model_and_paths_are_relative_to_its_folder(tmp_path):
    folder = write_model(tmp_path, "birds", 'variant = "efficientnet-b0"\nweights = "w.pth"\nlabels = "labels.txt"\n'
                   'mean = [0.5, 0.5, 0.5]\nmax_batch_size = 4\n')
    write_model(tmp_path, "lite0", 'variant = "efficientnet-lite0"\n')
    (tmp_path / "notes").mkdir()  # no model.toml: not a model
    repository = ModelRepository(tmp_path, ModelSettings(max_batch_delay_ms=7))
    assert repository.names() == ["birds", "lite0"]
    spec = repository.spec("birds")
    s = spec.settings
    assert (s.model, s.weights, s.labels) == ("efficientnet-b0", str(folder / "w.pth"), str(folder / "labels.txt"))
    assert (s.mean, s.max_batch_size, s.max_batch_delay_ms) == ("0.5,0.5,0.5", 4, 7)  # the server's delay
    lite0 = repository.spec("lite0").settings
    assert (lite0.model, lite0.weights, lite0.labels) == ("efficientnet-lite0", None, None)


@pytest.mark.parametrize(("text", "problem"), [
    ('variant = "efficientnet-b0"\nmax_batch = 4\n', "unknown key(s) max_batch"),
    ('weights = "w.pth"\n', "no 'variant'"),
    ('variant = "efficientnet-b0"\nmax_batch_size = "many"\n', "max_batch_size"),
    ('variant = "efficientnet-b0"\nmax_batch_size = 128\nmax_queue = 64\n', "max_queue (64) must be >="),
    ('variant = "efficientnet-b0\n', "not valid TOML"),
    ('variant = "efficientnet-b0"\napi_key = "x"\n', "unknown key(s) api_key"),
])
def test_a_broken_model_toml_is_refused_naming_the_model_and_the_problem(tmp_path, text, problem):
    write_model(tmp_path, "birds", text)
    with pytest.raises(StartupError) as refused:
        ModelRepository(tmp_path, ModelSettings()).spec("birds")
    assert str(refused.value).startswith(f"model 'birds' ({tmp_path / 'birds' / 'model.toml'}): ")
    assert problem in str(refused.value)


def test_single_model_settings_are_refused_beside_a_repository(tmp_path):
    with pytest.raises(StartupError, match="EFFNET_WEIGHTS.*cannot be combined with EFFNET_MODEL_REPOSITORY"):
        ModelRepository(tmp_path, ModelSettings(weights="w.pth"))
    with pytest.raises(StartupError, match="not a folder"):
        ModelRepository(tmp_path / "absent", ModelSettings())


def test_models_to_load_at_start(tmp_path):
    write_model(tmp_path, "a", 'variant = "efficientnet-lite0"\n')
    write_model(tmp_path, "b", 'variant = "efficientnet-lite0"\n')
    repository = ModelRepository(tmp_path, ModelSettings())
    assert repository.startup_names(None) == ["a", "b"]
    assert repository.startup_names("b") == ["b"]
    with pytest.raises(StartupError, match="EFFNET_MODELS names c, not in the repository"):
        repository.startup_names("b,c")
    assert "../a" not in repository and "a" in repository
    with pytest.raises(StartupError, match="holds no model"):
        ModelRepository(tmp_path / "a", ModelSettings()).startup_names(None)


# -- the registry, around stand-in engines ----------------------------------------------------------------
def loaded(engine: FakeEngine, name: str | None = None, classes: int = 1000, **settings) -> LoadedModel:
    labels = None if classes == 1000 else [f"c{i}" for i in range(classes)]
    return fake_model(engine, labels=labels, name=name, warmup=False, **settings)


def pixels(n: int = 1) -> InferenceRequest:
    return InferenceRequest(pixels=np.zeros((n, 3, 224, 224), dtype=np.uint8))


def registry(engines: dict[str, FakeEngine], **settings) -> ModelRegistry:
    server, model = split_settings(**settings)
    values = model.model_dump(include=model.model_fields_set)
    return ModelRegistry(server, Metrics(8, process_metrics=False),
                         Startup(None, [loaded(engine, name, **values) for name, engine in engines.items()]))


def test_choosing_a_model_by_name():
    async def main():
        models = registry({"a": FakeEngine(top_class=1), "b": FakeEngine(top_class=2)})
        await models.start()
        assert models.state is State.READY
        (_, logits_a), = await models.get("a").serve(pixels())
        (_, logits_b), = await models.get("b").serve(pixels())
        assert (logits_a.argmax(), logits_b.argmax()) == (1, 2)
        with pytest.raises(ModelNotFound, match="several models .*name one with"):
            models.get(None)
        with pytest.raises(ModelNotFound, match="unknown model 'c'; this server serves: a, b"):
            models.get("c")
        with pytest.raises(ModelControlDisabled, match="EFFNET_MODEL_CONTROL is none"):
            await models.unload("a")
        await models.close()
        assert models.state is State.STOPPED

    asyncio.run(main())


def test_the_bound_across_models_refuses_at_once_with_503():
    async def main():
        held = FakeEngine(hold=True)
        models = registry({"a": held, "b": FakeEngine()}, max_queue_total=3, max_batch_size=2, max_queue=8)
        await models.start()
        first = asyncio.ensure_future(models.get("a").serve(pixels(2)))
        while not held.batch_running.is_set():
            await asyncio.sleep(0.01)
        with pytest.raises(QueueFull, match="2 of 3 images admitted across all models"):
            await models.get("b").serve(pixels(2))  # b's own queue has room; the server's does not
        (_, logits), = await models.get("b").serve(pixels(1))
        held.gate.set()
        assert len(await first) == 2 and logits.shape == (1000,)
        await models.close()

    asyncio.run(main())


def test_a_reload_answers_what_the_old_model_admitted_and_routes_new_requests_to_the_new(tmp_path, monkeypatch):
    write_model(tmp_path, "a", 'variant = "efficientnet-lite0"\n')
    old_engine, new_engine = FakeEngine(top_class=1, hold=True), FakeEngine(top_class=2)
    monkeypatch.setattr("service.core.registry.load_model", lambda spec: loaded(new_engine, spec.name))

    async def main():
        server, _ = split_settings(model_control="explicit", model_repository=str(tmp_path))
        repository = ModelRepository(tmp_path, ModelSettings(warmup=False))
        models = ModelRegistry(server, Metrics(8, process_metrics=False),
                               Startup(repository, [loaded(old_engine, "a")]))
        await models.start()
        old = models.get("a")
        admitted = asyncio.ensure_future(old.serve(pixels()))
        while not old_engine.batch_running.is_set():
            await asyncio.sleep(0.01)
        await models.load("a")  # returns once the new one serves; the old one still holds a request
        assert models.get("a") is not old and models.state is State.READY
        (_, logits), = await models.get("a").serve(pixels())
        assert logits.argmax() == 2
        assert old.state is State.LAME_DUCK  # still answering what it admitted
        old_engine.gate.set()
        (_, logits), = await admitted
        assert logits.argmax() == 1
        started = time.monotonic()
        while old.state is not State.STOPPED:
            assert time.monotonic() - started < 10, "the old model was never freed"
            await asyncio.sleep(0.02)
        await models.unload("a")
        with pytest.raises(ModelNotFound, match="model 'a' is not loaded"):
            models.get("a")
        assert await models.index() == [{"name": "a", "version": "1", "state": "UNAVAILABLE", "reason": "unloaded"}]
        assert models.ready  # no model is meant to be loaded now
        await models.close()

    asyncio.run(main())
