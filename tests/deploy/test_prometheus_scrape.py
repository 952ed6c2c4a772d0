"""A real Prometheus server scrapes a real service with the project's own scrape configuration."""

from __future__ import annotations

import httpx

from tests.helpers.prometheus import prometheus_binary, prometheus_server, wait_for

prometheus_binary()  # fails in CI, skips elsewhere, without it


def test_prometheus_scrapes_the_service(lite0_service, photos, tmp_path):
    # Traffic first, so the counter exists before the first scrape.
    with httpx.Client(base_url=lite0_service.url, timeout=30) as client:
        r = client.post("/predict", content=photos["coffee.jpg"], headers={"Content-Type": "image/jpeg"})
        assert r.status_code == 200

    with prometheus_server(lite0_service.url, tmp_path) as api, httpx.Client(timeout=5) as prom:
        def effnet_target_up():
            try:
                targets = prom.get(f"{api}/targets").json()["data"]["activeTargets"]
            except (httpx.TransportError, ValueError, KeyError):
                return None
            mine = [t for t in targets if t["labels"].get("job") == "effnet"]
            return mine if mine and mine[0]["health"] == "up" else None

        up = wait_for(effnet_target_up, 60, "the effnet target to be up")
        assert up[0]["scrapeUrl"] == f"{lite0_service.url}/metrics"

        def scraped():
            query = 'effnet_requests_total{endpoint="/predict",code="200"}'
            result = prom.get(f"{api}/query", params={"query": query}).json()["data"]["result"]
            return result or None

        result = wait_for(scraped, 30, "effnet_requests_total to be scraped")
        assert float(result[0]["value"][1]) >= 1
        assert result[0]["metric"]["service"] == "effnet-serve"
