"""Settings from EFFNET_* variables, and small pure helpers."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.core.metrics import batch_size_buckets
from service.core.settings import ModelSettings, ServerSettings
from tests.helpers.fakes import split_settings


def test_defaults(monkeypatch):
    for name in list(__import__("os").environ):
        if name.startswith("EFFNET_"):
            monkeypatch.delenv(name)
    settings, server = ModelSettings(), ServerSettings()
    assert settings.model == "efficientnet-lite0"
    assert settings.weights is None and not settings.random_weights
    assert settings.device == "auto" and settings.dtype == "auto" and settings.backend == "auto"
    assert settings.max_queue >= settings.max_batch_size
    assert server.cors_origin_list == []
    assert server.api_key is None
    assert settings.effective_num_threads >= 1 and server.decode_threads_for([settings]) >= 1


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
    settings, server = ModelSettings(), ServerSettings()
    assert settings.model == "efficientnet-b3" and settings.random_weights
    assert settings.device == "cuda:1"
    assert settings.max_batch_size == 16
    assert server.cors_origin_list == ["https://a.example", "https://b.example"]
    assert server.api_key is not None and server.api_key.get_secret_value() == "key-XYZZY"
    assert "XYZZY" not in repr(server)
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
        split_settings(**overrides)


def test_batch_size_buckets():
    assert batch_size_buckets(1) == (1.0,)
    assert batch_size_buckets(8) == (1.0, 2.0, 4.0, 8.0)
    assert batch_size_buckets(12) == (1.0, 2.0, 4.0, 8.0, 12.0)


def test_each_setting_belongs_to_one_type():
    assert set(ServerSettings.model_fields).isdisjoint(ModelSettings.model_fields)


def _readme_table_variables(text: str) -> list[str]:
    from scripts.settings_table import END, START

    block = text[text.index(START):text.index(END)]
    return [line.split("`")[1] for line in block.splitlines() if line.startswith("| `EFFNET_")]


def test_the_readme_settings_table_is_the_settings_own():
    """README "Configuration" is generated from the fields' descriptions (make docs): every setting of both
    types has exactly one row, and a setting added, renamed or re-described without regenerating the
    table fails the check."""
    import subprocess
    import sys
    from pathlib import Path

    from scripts import settings_table

    root = Path(__file__).resolve().parents[2]
    check = subprocess.run([sys.executable, "scripts/settings_table.py", "--check"], cwd=root,
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    readme = (root / "README.md").read_text()
    rows = _readme_table_variables(readme)
    fields = [f"EFFNET_{name.upper()}" for kind in (ServerSettings, ModelSettings) for name in kind.model_fields]
    assert sorted(rows) == sorted(fields) and len(set(rows)) == len(rows)
    # The check sees a description edited by hand and a row removed.
    edited = readme.replace("Largest request body, enforced while reading it", "Largest body", 1)
    assert edited != readme and settings_table.render(edited) != edited
    row = next(line for line in readme.splitlines() if line.startswith("| `EFFNET_MAX_QUEUE_TOTAL`"))
    removed = readme.replace(row + "\n", "", 1)
    assert settings_table.render(removed) != removed


def test_an_effnet_variable_no_setting_reads_is_named():
    from service.core.settings import unknown_settings

    environ = {"EFFNET_MODLE": "efficientnet-b0", "EFFNET_MODEL": "efficientnet-lite0", "PATH": "/bin",
               "effnet_max_queue": "8"}
    assert unknown_settings(environ) == ["EFFNET_MODLE"]


def test_the_cpu_limit_of_the_cgroup_caps_the_cpus(tmp_path):
    """``docker run --cpus 2`` or a Kubernetes limit of 1500m on a large host: the CPUs the defaults (and
    EFFNET_WORKERS=auto) count are the limit, rounded up, not the host's."""
    from service.core.settings import available_cpus, cgroup_cpu_quota

    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("200000 100000\n")
    assert cgroup_cpu_quota(str(v2)) == 2
    (v2 / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_quota(str(v2)) == 2  # 1.5 CPUs: two threads may run, half the time each
    assert available_cpus(str(v2)) == min(2, available_cpus(str(tmp_path / "none")))
    (v2 / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_quota(str(v2)) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("50000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_quota(str(v1)) == 1
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_quota(str(v1)) is None
    assert cgroup_cpu_quota(str(tmp_path / "none")) is None


def test_workers_auto_is_the_cpus_less_one_for_the_engine(monkeypatch):
    import service.core.settings as settings

    monkeypatch.setattr(settings, "available_cpus", lambda: 16)
    assert ServerSettings(workers="auto").effective_workers == 15
    monkeypatch.setattr(settings, "available_cpus", lambda: 1)
    assert ServerSettings(workers="auto").effective_workers == 1
    assert ServerSettings(workers=3).effective_workers == 3
    with pytest.raises(ValidationError):
        ServerSettings(workers=0)
