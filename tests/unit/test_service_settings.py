"""Settings from EFFNET_* variables, and small pure helpers."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.core.metrics import batch_size_buckets, endpoint_label
from service.core.settings import Settings


def test_defaults(monkeypatch):
    for name in list(__import__("os").environ):
        if name.startswith("EFFNET_"):
            monkeypatch.delenv(name)
    settings = Settings()
    assert settings.model == "efficientnet-lite0"
    assert settings.weights is None and not settings.random_weights
    assert settings.device == "auto" and settings.dtype == "auto" and settings.backend == "auto"
    assert settings.max_queue >= settings.max_batch_size
    assert settings.cors_origin_list == []
    assert settings.api_key is None
    assert settings.effective_num_threads >= 1 and settings.effective_decode_threads >= 1


def test_environment_is_read(monkeypatch):
    monkeypatch.setenv("EFFNET_MODEL", "efficientnet-b3")
    monkeypatch.setenv("EFFNET_WEIGHTS", "random")
    monkeypatch.setenv("EFFNET_DEVICE", "CUDA:1")
    monkeypatch.setenv("EFFNET_MAX_BATCH_SIZE", "16")
    monkeypatch.setenv("EFFNET_MAX_QUEUE", "64")
    monkeypatch.setenv("EFFNET_CORS_ORIGINS", "https://a.example, https://b.example")
    monkeypatch.setenv("EFFNET_API_KEY", "key-XYZZY")
    monkeypatch.setenv("EFFNET_LABELS", "")
    monkeypatch.setenv("EFFNET_WARMUP", "false")
    settings = Settings()
    assert settings.model == "efficientnet-b3" and settings.random_weights
    assert settings.device == "cuda:1"
    assert settings.max_batch_size == 16
    assert settings.cors_origin_list == ["https://a.example", "https://b.example"]
    assert settings.api_key is not None and settings.api_key.get_secret_value() == "key-XYZZY"
    assert "XYZZY" not in repr(settings)
    assert settings.labels is None and settings.warmup is False


@pytest.mark.parametrize(
    "overrides",
    [
        {"device": "gpu"},
        {"dtype": "float64"},
        {"backend": "tensorrt"},
        {"max_batch_size": 0},
        {"max_batch_size": 8, "max_queue": 4},
        {"request_timeout_s": 0},
    ],
)
def test_invalid_settings_are_refused(overrides):
    with pytest.raises(ValidationError):
        Settings(**overrides)


def test_batch_size_buckets_and_endpoint_labels():
    assert batch_size_buckets(1) == (1.0,)
    assert batch_size_buckets(8) == (1.0, 2.0, 4.0, 8.0)
    assert batch_size_buckets(12) == (1.0, 2.0, 4.0, 8.0, 12.0)
    assert endpoint_label("/predict") == "/predict"
    assert endpoint_label("/predict/../../etc/passwd") == "other"


def test_the_readme_settings_table_is_the_settings_own():
    """README "Configuration" is generated from the fields' descriptions (make docs): a setting added,
    renamed or re-described without regenerating it fails here."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    check = subprocess.run([sys.executable, "scripts/settings_table.py", "--check"], cwd=root,
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    from service.core.settings import Settings, settings_table

    table = settings_table()
    assert all(f"`EFFNET_{name.upper()}`" in table for name in Settings.model_fields)


def test_an_effnet_variable_no_setting_reads_is_named():
    from service.core.settings import unknown_settings

    environ = {"EFFNET_MODLE": "efficientnet-b0", "EFFNET_MODEL": "efficientnet-lite0", "PATH": "/bin",
               "effnet_max_queue": "8"}
    assert unknown_settings(environ) == ["EFFNET_MODLE"]
