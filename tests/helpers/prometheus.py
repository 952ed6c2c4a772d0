"""A real Prometheus server for the tests: the project's scrape configuration pointed at one service,
started on a free loopback port, stopped afterwards. Fails in CI (skips elsewhere) without the binary."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from tests.helpers.components import missing_component
from tests.helpers.server import REPO, free_port
from tests.helpers.waiting import wait_until


def prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        missing_component("the prometheus binary (Debian package 'prometheus') is not installed")
    assert path is not None
    return path


def config_for(target: str, workdir: Path) -> Path:
    """deploy/prometheus/prometheus.yml with the effnet job pointed at ``target`` and a 1 s interval."""
    source = REPO / "deploy" / "prometheus"
    config = yaml.safe_load((source / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = "1s"
    config["global"]["scrape_timeout"] = "1s"
    jobs = [job for job in config["scrape_configs"] if job["job_name"] == "effnet"]
    assert len(jobs) == 1, "the project's Prometheus config must have exactly one 'effnet' job"
    for static in jobs[0]["static_configs"]:
        static["targets"] = [target]
    for rule_file in config.get("rule_files", []):
        shutil.copy(source / rule_file, workdir / rule_file)
    path = workdir / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``predicate`` every 0.5 s (Prometheus' own pace) until it answers something truthy; that answer."""
    return wait_until(predicate, what, timeout, every=0.5)


@contextmanager
def prometheus_server(service_url: str, workdir: Path, flags: tuple[str, ...] = ()) -> Iterator[str]:
    """Prometheus scraping ``service_url`` with the project's configuration (plus ``flags``); yields its
    API base URL (``http://127.0.0.1:PORT/api/v1``)."""
    config = config_for(service_url.removeprefix("http://"), workdir)
    port = free_port()
    proc = subprocess.Popen(
        [prometheus_binary(), f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", *flags],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        yield f"http://127.0.0.1:{port}/api/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
