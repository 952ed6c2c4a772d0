"""The compose stack holds what running the service needs: a stop grace that lets the lame duck and the
drain finish, a lame duck longer than HAProxy needs to notice, both replicas alike behind HAProxy checking
/readyz, the CPU service hardened and the GPU override reserving a GPU. Files only (tests/container runs
the stack for real)."""

from __future__ import annotations

import re

import pytest

from tests.deploy.artefacts import (
    COMPOSE_REPLICAS,
    PORT,
    REPO,
    compose_services,
    haproxy_config,
    haproxy_detection_s,
    load_yaml,
)


@pytest.mark.parametrize("replica", COMPOSE_REPLICAS)
def test_compose_stop_grace_covers_lame_duck_and_drain(replica):
    service = compose_services()[replica]
    grace = service["stop_grace_period"]
    match = re.fullmatch(r"(\d+)s", grace)
    assert match, f"write stop_grace_period in seconds, got {grace!r}"
    delay = float(service["environment"]["EFFNET_SHUTDOWN_DELAY_S"])
    drain = float(service["environment"]["EFFNET_SHUTDOWN_DRAIN_S"])
    assert int(match.group(1)) >= delay + drain + 5
    assert service.get("stop_signal", "SIGTERM") == "SIGTERM"


def test_compose_lame_duck_outlasts_the_haproxy_health_checks():
    """The replicas keep serving until HAProxy has surely taken them out, with a margin of 2x."""
    detection = haproxy_detection_s()
    for replica in COMPOSE_REPLICAS:
        delay = float(compose_services()[replica]["environment"]["EFFNET_SHUTDOWN_DELAY_S"])
        assert delay >= 2 * detection, (replica, delay, detection)


def test_compose_puts_both_replicas_behind_haproxy_checking_readyz():
    services = compose_services()
    replicas = [services[name] for name in COMPOSE_REPLICAS]
    assert replicas[0] == replicas[1], "the two replicas must be configured alike"
    assert all("ports" not in r for r in replicas), "clients reach the replicas only through HAProxy"
    haproxy = services["haproxy"]
    assert "./deploy/haproxy/haproxy.cfg:/usr/local/etc/haproxy/haproxy.cfg:ro" in haproxy["volumes"]
    assert f"{PORT}:{PORT}" in haproxy["ports"]
    assert set(COMPOSE_REPLICAS) <= set(haproxy["depends_on"])
    config = haproxy_config()
    servers = {line[1]: line[2] for line in config if line[0] == "server"}
    assert servers == {name: f'"${{{name.upper().replace("-", "_")}_ADDR-{name}:{PORT}}}"' for name in COMPOSE_REPLICAS}
    assert ["option", "httpchk"] in config
    check = next(line for line in config if line[:2] == ["http-check", "send"])
    assert check[check.index("uri") + 1] == "/readyz" and check[check.index("meth") + 1] == "GET"
    assert ["http-check", "expect", "status", "200"] in config
    default_server = next(line for line in config if line[0] == "default-server")
    assert "check" in default_server
    bind = next(line for line in config if line[0] == "bind")
    assert bind[1].endswith(f':{PORT}}}"')


@pytest.mark.parametrize("replica", COMPOSE_REPLICAS)
def test_compose_gpu_override_reserves_an_nvidia_gpu(replica):
    service = load_yaml(REPO / "docker-compose.gpu.yml")["services"][replica]
    assert service["build"]["target"] == "gpu"
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert any(
        d.get("driver") == "nvidia"
        and "gpu" in d.get("capabilities", [])
        and (d.get("count") or d.get("device_ids"))
        for d in devices
    )
    assert service["environment"]["EFFNET_DEVICE"].startswith("cuda")


@pytest.mark.parametrize("replica", COMPOSE_REPLICAS)
def test_compose_cpu_service_is_hardened(replica):
    service = compose_services()[replica]
    assert service["build"]["target"] == "cpu"
    assert service["read_only"] is True
    assert any(t.split(":")[0] == "/tmp" for t in service["tmpfs"])
    assert service["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in service["security_opt"]
    haproxy = compose_services()["haproxy"]
    assert haproxy["read_only"] is True and haproxy["cap_drop"] == ["ALL"]
