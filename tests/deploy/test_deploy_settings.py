"""Every EFFNET_* setting the deployment files give (Kubernetes env files, compose, the Dockerfile) is a
name the service reads, with a value its settings accept."""

from __future__ import annotations

import pytest

from tests.deploy.artefacts import REPO, base_settings, compose_services, gpu_settings, load_yaml, settings_classes


def settings_sources() -> dict[str, dict[str, str]]:
    compose = compose_services()["effnet-1"]["environment"]
    gpu_override = load_yaml(REPO / "docker-compose.gpu.yml")["services"]["effnet-1"]["environment"]
    compose_gpu = {**compose, **gpu_override}
    return {
        "k8s/base/settings.env": base_settings(),
        "k8s gpu overlay": gpu_settings(),
        "docker-compose.yml": {k: v for k, v in compose.items() if v is not None},
        "docker-compose.yml + gpu": {k: v for k, v in compose_gpu.items() if v is not None},
    }


@pytest.mark.parametrize("source", list(settings_sources()))
def test_settings_are_known_and_valid(source, monkeypatch):
    """pydantic-settings ignores unknown EFFNET_* variables: a typo would silently do nothing."""
    server_cls, model_cls = settings_classes()
    prefix = server_cls.model_config.get("env_prefix", "")
    known = {prefix + name.upper() for kind in (server_cls, model_cls) for name in kind.model_fields}
    # OTEL_* variables are the OpenTelemetry SDK's (tests/deploy/test_tracing_deploy.py checks them).
    values = {k: v for k, v in settings_sources()[source].items() if not k.startswith("OTEL_")}
    unknown = sorted(set(values) - known)
    assert not unknown, f"{source}: the service has no such setting: {unknown}"
    for name in [n for n in list(__import__("os").environ) if n.startswith(prefix)]:
        monkeypatch.delenv(name)
    for name, value in values.items():
        monkeypatch.setenv(name, str(value))
    server_cls()  # raises on an invalid value
    settings = model_cls()
    assert settings.max_queue >= settings.max_batch_size
