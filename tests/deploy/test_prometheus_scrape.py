"""A real Prometheus server scrapes a real service with the project's own scrape configuration."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import httpx
import yaml

from tests.helpers.components import missing_component
from tests.helpers.server import REPO, free_port

PROMETHEUS = shutil.which("prometheus")
if PROMETHEUS is None:
    missing_component("the prometheus binary (Debian package 'prometheus') is not installed")


def _config_for(target: str, workdir: Path) -> Path:
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


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}; last answer: {last!r}")


def test_prometheus_scrapes_the_service(lite0_service, photos, tmp_path):
    # Traffic first, so the counter exists before the first scrape.
    with httpx.Client(base_url=lite0_service.url, timeout=30) as client:
        r = client.post("/predict", content=photos["coffee.jpg"], headers={"Content-Type": "image/jpeg"})
        assert r.status_code == 200

    target = lite0_service.url.removeprefix("http://")
    config = _config_for(target, tmp_path)
    port = free_port()
    proc = subprocess.Popen(
        [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    api = f"http://127.0.0.1:{port}/api/v1"
    try:
        with httpx.Client(timeout=5) as prom:
            def effnet_target_up():
                try:
                    targets = prom.get(f"{api}/targets").json()["data"]["activeTargets"]
                except (httpx.TransportError, ValueError, KeyError):
                    return None
                mine = [t for t in targets if t["labels"].get("job") == "effnet"]
                return mine if mine and mine[0]["health"] == "up" else None

            up = _wait_for(effnet_target_up, 60, "the effnet target to be up")
            assert up[0]["scrapeUrl"] == f"{lite0_service.url}/metrics"

            def scraped():
                query = 'effnet_requests_total{endpoint="/predict",code="200"}'
                result = prom.get(f"{api}/query", params={"query": query}).json()["data"]["result"]
                return result or None

            result = _wait_for(scraped, 30, "effnet_requests_total to be scraped")
            assert float(result[0]["value"][1]) >= 1
            assert result[0]["metric"]["service"] == "effnet-serve"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
