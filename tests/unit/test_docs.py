"""The README's configuration and metrics tables cover what the code defines."""

from __future__ import annotations

from pathlib import Path

from service.core.metrics import Metrics
from service.core.settings import ModelSettings, ServerSettings

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_every_setting_is_documented():
    names = [*ServerSettings.model_fields, *ModelSettings.model_fields]
    missing = [f"EFFNET_{name.upper()}" for name in names if f"`EFFNET_{name.upper()}`" not in README]
    assert not missing, f"settings missing from the README table: {missing}"


def test_every_effnet_metric_is_documented():
    registry = Metrics(max_batch_size=8, process_metrics=False).registry
    names = {
        metric.name + ("_total" if metric.type == "counter" else "")
        for metric in registry.collect()
        if metric.name.startswith("effnet_")
    }
    assert names, "no effnet_ metric found: the test is not looking at the service's registry"
    missing = sorted(n for n in names if f"`{n}`" not in README)
    assert not missing, f"metrics missing from the README table: {missing}"
