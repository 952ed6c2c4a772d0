"""The page at ``/`` over plain HTTP (no browser): headers, caching, auth, metrics, OpenAPI and packaging."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterator

import httpx
import pytest

from service.web import ASSETS, CONTENT_SECURITY_POLICY
from tests.helpers.server import REPO, ServiceProcess

KEY = "page-http-key"
STATIC = REPO / "service" / "web" / "static"


@pytest.fixture(scope="module")
def keyed_service(start_service) -> Iterator[ServiceProcess]:
    service = start_service({"EFFNET_MODEL": "efficientnet-lite0", "EFFNET_API_KEY": KEY})
    yield service
    service.close()


def test_the_page_and_its_assets_are_served_with_their_types_and_security_headers(keyed_service):
    """/, /web/app.js and /web/app.css answer 200 with the package's files, their media types, nosniff and
    an ETag, without the API key the inference endpoints require; the page itself carries the CSP that
    allows this origin only, and refuses framing."""
    for path, (name, media_type) in ASSETS.items():
        response = httpx.get(keyed_service.url + path, timeout=10)
        assert response.status_code == 200, (path, response.text[:200])
        assert response.content == (STATIC / name).read_bytes()
        assert response.headers["content-type"] == media_type
        assert response.headers["x-content-type-options"] == "nosniff"
        assert re.fullmatch(r'"[0-9a-f]{32}"', response.headers["etag"])
    page = httpx.get(keyed_service.url + "/", timeout=10)
    csp = page.headers["content-security-policy"]
    assert csp == CONTENT_SECURITY_POLICY
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "script-src 'self'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp and "http" not in csp
    assert page.headers["x-frame-options"] == "DENY"
    # ... while the API itself still wants the key.
    assert httpx.post(keyed_service.url + "/predict", content=b"x", timeout=10).status_code == 401


def test_the_page_refers_to_nothing_outside_its_own_origin():
    """No absolute URL (http:, https:, protocol-relative //) in the page, its script or its stylesheet:
    everything it loads or calls is relative to where it is served."""
    for name, _ in ASSETS.values():
        text = (STATIC / name).read_text()
        assert not re.search(r"""(?:src|href|url|fetch)\s*[=(]\s*["'`]?(?:https?:)?//""", text), name
        assert "@import" not in text


def test_an_unchanged_asset_is_not_sent_again(keyed_service):
    """A browser revalidating with the ETag it has gets 304 and no body; HEAD answers without a body."""
    first = httpx.get(keyed_service.url + "/web/app.js", timeout=10)
    again = httpx.get(keyed_service.url + "/web/app.js", headers={"If-None-Match": first.headers["etag"]}, timeout=10)
    assert again.status_code == 304 and again.content == b""
    head = httpx.head(keyed_service.url + "/", timeout=10)
    assert head.status_code == 200 and head.content == b""


def test_the_page_is_not_in_the_openapi_document_and_unknown_assets_are_404(keyed_service):
    """The page is not part of the API contract; a path under /web/ that is not one of its files is a JSON
    404, also when it tries to climb out of the folder."""
    paths = httpx.get(keyed_service.url + "/openapi.json", timeout=10).json()["paths"]
    assert "/" not in paths and not [p for p in paths if p.startswith("/web")]
    for path in ("/web/", "/web/index.html", "/web/%2e%2e/%2e%2e/pyproject.toml", "/web/..%2f..%2fpyproject.toml"):
        response = httpx.get(keyed_service.url + path, timeout=10)
        assert response.status_code == 404, path
        assert "error" in response.json()


def test_page_requests_are_counted_under_bounded_endpoint_labels(keyed_service):
    """Requests for the page and its assets count under their own routes ("/", "/web/app.css"); any other
    /web/ path a client makes up counts as "other": no label per made-up path."""
    for path in ("/", "/web/app.css", "/web/made-up-1", "/web/made-up-2"):
        httpx.get(keyed_service.url + path, timeout=10)
    metrics = httpx.get(keyed_service.url + "/metrics", timeout=10).text
    endpoints = set(re.findall(r'effnet_requests_total\{[^}]*endpoint="([^"]*)"', metrics))
    assert {"/", "/web/app.css", "other"} <= endpoints
    assert not [e for e in endpoints if "made-up" in e], endpoints


def test_every_static_file_is_declared_as_package_data():
    """The wheel (and so the container image, which pip-installs the project) ships every file the page
    serves: pyproject's package-data for ``service`` matches each of them."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["service"]
    files = [p.relative_to(REPO / "service").as_posix() for p in STATIC.iterdir() if p.is_file()]
    assert sorted(files) == sorted(f"web/static/{name}" for name, _ in ASSETS.values())
    for file in files:
        assert any(fnmatch.fnmatch(file, pattern) for pattern in patterns), file
