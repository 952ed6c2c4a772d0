"""docker-compose.yml for real: the two replicas (the session's image) behind HAProxy and Prometheus, with
podman-compose or docker compose. Each replica runs as compose says, an engine process and EFFNET_WORKERS
front-end workers under the server as PID 1; Prometheus scrapes both replicas, a rolling restart as the
compose file describes it answers every request through HAProxy with 200, and `down` leaves nothing behind.

Grafana is not started: there is neither an image nor a Debian package for it here (it stays validated
statically). tests/container/compose.override.yml holds the only differences from docker-compose.yml.
"""

from __future__ import annotations

import csv
import io
import os
import re
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from tests.container.engine import (
    HERE,
    REPO,
    Engine,
    compose_command,
    compose_project_label,
    container_processes,
    server_processes,
    service_image,
)
from tests.helpers.server import free_port

# The first test also builds the image (and on a fresh machine the stand-in base): minutes on 2 busy cores.
pytestmark = [pytest.mark.container, pytest.mark.timeout(1800)]

SERVICES = ["effnet-1", "effnet-2", "haproxy", "prometheus"]
REPLICAS = ["effnet-1", "effnet-2"]


@dataclass
class Stack:
    engine: Engine
    command: list[str]
    project: str
    env: dict[str, str]
    ports: dict[str, int]
    override: Path

    def compose(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
        files = ["-f", str(REPO / "docker-compose.yml"), "-f", str(self.override)]
        proc = subprocess.run(
            [*self.command, "-p", self.project, *files, *args],
            cwd=REPO, env=self.env, capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
        if check and proc.returncode != 0:
            raise AssertionError(
                f"compose {' '.join(args)} -> {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
            )
        return proc

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports['http']}"

    def replica_states(self) -> dict[str, str]:
        """HAProxy's view of each replica (UP, DOWN, ...), from its status page's CSV."""
        text = httpx.get(f"http://127.0.0.1:{self.ports['stats']}/stats;csv", timeout=5).text
        rows = csv.DictReader(io.StringIO(text.lstrip("# ")))
        return {r["svname"]: r["status"] for r in rows if r["pxname"] == "effnet-replicas" and r["svname"] in REPLICAS}

    def wait_up(self, replicas: list[str], timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            try:
                states = self.replica_states()
            except httpx.TransportError:
                states = {}
            if all(states.get(r, "").startswith("UP") for r in replicas):
                return
            time.sleep(0.5)
        logs = self.compose("logs", "--tail", "30", check=False)
        raise AssertionError(f"not UP in HAProxy after {timeout} s: {states}\n{logs.stdout[-6000:]}")

    def containers(self, *, running_only: bool) -> list[str]:
        args = ["ps", "-q", "--filter", f"label={compose_project_label(self.engine)}={self.project}"]
        return self.engine.run(*args, *([] if running_only else ["-a"])).stdout.split()

    def container_of(self, service: str) -> str:
        """The running container of one compose service (both engines label it com.docker.compose.service)."""
        args = ["ps", "-q", "--filter", f"label={compose_project_label(self.engine)}={self.project}",
                "--filter", f"label=com.docker.compose.service={service}"]
        (found,) = self.engine.run(*args).stdout.split()
        return found


@pytest.fixture(scope="module")
def stack(engine: Engine, cpu_image: str, tmp_path_factory):
    command = compose_command(engine)
    images = {
        name: spec["image"]
        for name, spec in yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"].items()
    }
    ports = {"http": free_port(), "stats": free_port(), "prometheus": free_port()}
    env = {
        **engine.env,
        "EFFNET_TEST_IMAGE": cpu_image,
        "EFFNET_TEST_HAPROXY_IMAGE": service_image(engine, images["haproxy"], "haproxy"),
        "EFFNET_TEST_PROMETHEUS_IMAGE": service_image(engine, images["prometheus"], "prometheus"),
        "EFFNET_TEST_HTTP_PORT": str(ports["http"]),
        "EFFNET_TEST_STATS_PORT": str(ports["stats"]),
        "EFFNET_TEST_PROMETHEUS_PORT": str(ports["prometheus"]),
    }
    env.pop("EFFNET_API_KEY", None)  # passed through by the compose file when set
    # podman-compose 1.6.0 does not interpolate variables under `!override`: the values go in here.
    override = tmp_path_factory.mktemp("compose") / "compose.override.yml"
    template = (HERE / "compose.override.yml").read_text()
    override.write_text(re.sub(r"\$\{(\w+):\?\}", lambda m: env[m.group(1)], template))
    up = Stack(engine, command, f"effnet-test-{os.getpid()}", env, ports, override)
    started = time.monotonic()
    try:
        up.compose("up", "-d", "--no-build", *SERVICES)
        up.wait_up(REPLICAS)
        engine.timings["compose up until both replicas UP in HAProxy"] = time.monotonic() - started
        yield up
    finally:
        up.compose("down", "-v", "-t", "40", check=False)


def test_each_replica_runs_an_engine_process_and_the_compose_workers(stack: Stack):
    """docker-compose.yml's EFFNET_WORKERS for real: in each replica PID 1 is the server, supervising one
    effnet-engine and that many effnet-worker-N, and both replicas answer through HAProxy."""
    workers = int(yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]["effnet-1"]["environment"]
                  ["EFFNET_WORKERS"])
    assert workers > 1, "compose runs one process per replica: nothing to see here"
    for replica in REPLICAS:
        roles = server_processes(container_processes(stack.engine, stack.container_of(replica)))
        assert "efficientnet-serve" in roles["supervisor"][0]["cmdline"], (replica, roles)
        assert len(roles["engine"]) == 1 and roles["other"] == [], (replica, roles)
        assert [p["comm"] for p in roles["workers"]] == [f"effnet-worker-{n}" for n in range(workers)], (replica, roles)


def test_prometheus_scrapes_both_replicas(stack: Stack):
    url = f"http://127.0.0.1:{stack.ports['prometheus']}/api/v1/query"
    deadline = time.monotonic() + 120  # scrape_interval is 15 s
    seen: dict[str, str] = {}
    while time.monotonic() < deadline:
        try:
            body = httpx.get(url, params={"query": 'up{job="effnet"}'}, timeout=5).json()
            seen = {r["metric"]["instance"]: r["value"][1] for r in body["data"]["result"]}
        except (httpx.TransportError, ValueError, KeyError):
            seen = {}
        if seen == {"effnet-1:8000": "1", "effnet-2:8000": "1"}:
            break
        time.sleep(2)
    assert seen == {"effnet-1:8000": "1", "effnet-2:8000": "1"}, seen
    # And what it scraped is the service's own metrics.
    body = httpx.get(url, params={"query": "effnet_model_info"}, timeout=5).json()
    assert {r["metric"]["instance"] for r in body["data"]["result"]} == {"effnet-1:8000", "effnet-2:8000"}


def test_rolling_restart_through_haproxy_answers_every_request(stack: Stack, photos):
    """docker-compose.yml's procedure: restart one replica, wait until HAProxy has it UP, then the other,
    with clients sending /predict through HAProxy the whole time."""
    statuses: list[int | str] = []
    done = threading.Event()

    def client() -> None:
        files = {"file": ("coffee.jpg", photos["coffee.jpg"], "image/jpeg")}
        with httpx.Client(base_url=stack.url, timeout=30) as http:
            for _ in range(3000):  # bounded; ends when the restart is over
                if done.is_set():
                    return
                try:
                    response = http.post("/predict", files=files)
                    ok = response.status_code != 200 or response.json()["results"][0]["top_k"][0]["label"] == "espresso"
                    statuses.append(response.status_code if ok else "200 with a wrong answer")
                except httpx.HTTPError as exc:
                    statuses.append(type(exc).__name__)
                time.sleep(0.05)

    clients = [threading.Thread(target=client) for _ in range(2)]
    for thread in clients:
        thread.start()
    started = time.monotonic()
    try:
        for replica in REPLICAS:
            stack.compose("restart", replica)
            stack.wait_up(REPLICAS)
    finally:
        done.set()
        for thread in clients:
            thread.join(timeout=60)
    stack.engine.timings["rolling restart of both replicas"] = time.monotonic() - started
    failed = [s for s in statuses if s != 200]
    assert len(statuses) > 20 and not failed, (len(statuses), failed[:20])
    stack.engine.note(f"rolling restart: {len(statuses)} requests through HAProxy, all 200")


def test_down_leaves_nothing(stack: Stack):
    assert len(stack.containers(running_only=True)) == len(SERVICES)
    stack.compose("down", "-v", "-t", "40")
    assert stack.containers(running_only=False) == []
    label = f"label={compose_project_label(stack.engine)}={stack.project}"
    assert stack.engine.run("network", "ls", "-q", "--filter", label).stdout.split() == []
    assert stack.engine.run("volume", "ls", "-q", "--filter", label).stdout.split() == []
