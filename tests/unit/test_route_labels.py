"""Every route the app serves is counted under its own label: the labels come from the routes themselves
(``service.server.routes``), so a route a door adds can never be counted under another's name or as
``other``, and no path a client makes up becomes a label."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

from service.server.routes import route_label, served_routes
from tests.helpers.fakes import FakeEngine, app_with_engine

MODEL = "efficientnet-lite0"


def _concrete(path: str) -> str:
    """A path the route matches: its parameters filled in (a mount: a file under it)."""
    return path.replace("{model_name}", MODEL).replace("{model_version}", "1")


def _endpoints(metrics: str) -> set[str]:
    return set(re.findall(r'effnet_requests_total\{[^}]*endpoint="([^"]*)"', metrics))


def test_every_served_route_is_counted_under_its_own_label():
    app = app_with_engine(FakeEngine(), warmup=False)
    with TestClient(app) as client:
        routes = list(served_routes(app.routes))
        assert len(routes) > 20, "the walk must see the included routers' routes"
        expected = set()
        for route in routes:
            label = route_label(route)
            expected.add(label)
            if label.endswith("/*"):  # a mounted folder: any file under it
                client.get(label.removesuffix("*") + "swagger-ui.css")
                continue
            method = "POST" if "POST" in (route.methods or ()) else "GET"
            client.request(method, _concrete(route.path))
        client.get("/made-up/path")
        client.get("/v2/models/x/not-a-route")
        endpoints = _endpoints(client.get("/metrics").text)
    assert expected <= endpoints, sorted(expected - endpoints)
    # What no route serves is "other", never its path; the two stats routes are told apart.
    assert "other" in endpoints and not [e for e in endpoints if "made-up" in e or "not-a-route" in e]
    assert {"/v2/models/stats", "/v2/models/{model_name}/stats"} <= endpoints


def test_a_request_refused_before_routing_is_counted_under_its_route():
    """A body over the limit is refused by the middleware before the router runs; it still counts under
    the route it was sent to."""
    app = app_with_engine(FakeEngine(), warmup=False, max_body_bytes=1024)
    with TestClient(app) as client:
        refused = client.post("/predict", content=b"x" * 4096, headers={"Content-Type": "image/jpeg"})
        assert refused.status_code == 413
        v2 = client.post(f"/v2/models/{MODEL}/infer", content=b"x" * 4096)
        assert v2.status_code == 413 and v2.json() == {"error": v2.json()["error"]}
        metrics = client.get("/metrics").text
    assert 'effnet_requests_total{code="413",endpoint="/predict"} 1.0' in metrics
    assert 'effnet_requests_total{code="413",endpoint="/v2/models/{model_name}/infer"} 1.0' in metrics
