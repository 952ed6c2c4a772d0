"""Security, in-process with a stand-in engine: the API key (compared in constant time), CORS,
no client-chosen server paths, and no stack traces to clients.

Already proven elsewhere, not repeated here: a checkpoint that would run code is refused and the server
exits 1 (tests/integration/test_service_lifecycle.py, case "pickled code"); a configured CORS origin is allowed and
another is not (tests/unit/test_service_app.py); a client's X-Request-ID is echoed and logged
(tests/integration/test_service_http.py; a generated one: tests/integration/test_reliability_input.py).
"""

from __future__ import annotations

import hmac
import sys
import threading
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from model import imagenet_classes
from tests.helpers.fakes import FakeEngine, app_with_engine

KEY = "k3y-with-enough-entropy-0123456789"


def stand_in_app(labels: list[str] | None = None, **settings):
    return app_with_engine(FakeEngine(), labels=labels, warmup=False, **settings)


# -- API key ------------------------------------------------------------------------------------------------
WRONG_CREDENTIALS = {
    "missing": {},
    "wrong key": {"Authorization": "Bearer not-the-key"},
    "key with a suffix": {"Authorization": f"Bearer {KEY}x"},
    "key prefix only": {"Authorization": f"Bearer {KEY[:-1]}"},
    "empty bearer": {"Authorization": "Bearer "},
    "wrong scheme": {"Authorization": f"Basic {KEY}"},
    "no scheme": {"Authorization": KEY},
    "key in another header": {"X-API-Key": KEY},
}


@pytest.fixture(scope="module")
def keyed_client():
    with TestClient(stand_in_app(api_key=KEY)) as client:
        yield client


@pytest.mark.parametrize("path", ["/predict", "/features"])
@pytest.mark.parametrize("case", list(WRONG_CREDENTIALS))
def test_inference_needs_the_bearer_key(keyed_client, jpeg, path, case):
    response = keyed_client.post(path, content=jpeg, headers={"Content-Type": "image/jpeg", **WRONG_CREDENTIALS[case]})
    assert response.status_code == 401, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["error"]["code"] == "unauthorized"
    assert response.headers["www-authenticate"] == "Bearer"
    assert KEY not in response.text


@pytest.mark.parametrize("path", ["/predict", "/features"])
def test_the_right_key_is_let_in(keyed_client, jpeg, path):
    response = keyed_client.post(
        path, content=jpeg, headers={"Content-Type": "image/jpeg", "Authorization": f"Bearer {KEY}"}
    )
    assert response.status_code == 200, response.text


def test_operations_endpoints_stay_open_with_a_key(keyed_client):
    for path in ("/healthz", "/readyz", "/metrics", "/info", "/openapi.json"):
        assert keyed_client.get(path).status_code == 200, path
    assert KEY not in keyed_client.get("/info").text and KEY not in keyed_client.get("/metrics").text
    assert keyed_client.get("/info").json()["auth_required"] is True


def test_the_key_is_compared_with_hmac_compare_digest(keyed_client, jpeg, monkeypatch):
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    headers = {"Content-Type": "image/jpeg"}
    assert (
        keyed_client.post("/predict", content=jpeg, headers={**headers, "Authorization": "Bearer nope"}).status_code
        == 401
    )
    assert (
        keyed_client.post("/predict", content=jpeg, headers={**headers, "Authorization": f"Bearer {KEY}"}).status_code
        == 200
    )
    assert keyed_client.post("/features", content=jpeg, headers=headers).status_code == 401
    assert calls == [(b"nope", KEY.encode()), (KEY.encode(), KEY.encode()), (b"", KEY.encode())]
    # And its verdict is the one that counts: nothing else (no ==, no early length check) decides.
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: True)
    assert (
        keyed_client.post("/predict", content=jpeg, headers={**headers, "Authorization": "Bearer x"}).status_code == 200
    )


# -- CORS -----------------------------------------------------------------------------------------------------
def test_cors_is_closed_by_default_for_preflights_and_plain_requests(jpeg):
    with TestClient(stand_in_app()) as client:
        origin = {"Origin": "https://attacker.example"}
        preflight = client.options(
            "/predict",
            headers={
                **origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization",
            },
        )
        assert not [h for h in preflight.headers if h.startswith("access-control-")], dict(preflight.headers)
        plain = client.post("/predict", content=jpeg, headers={**origin, "Content-Type": "image/jpeg"})
        assert plain.status_code == 200
        assert not [h for h in plain.headers if h.startswith("access-control-")]


def test_cors_allows_a_configured_origin_on_plain_requests_only_for_it(jpeg):
    with TestClient(stand_in_app(cors_origins="https://app.example")) as client:
        allowed = client.get("/healthz", headers={"Origin": "https://app.example"})
        assert allowed.headers["access-control-allow-origin"] == "https://app.example"
        assert "x-request-id" in allowed.headers["access-control-expose-headers"].lower()
        other = client.get("/healthz", headers={"Origin": "https://app.example.attacker.test"})
        assert "access-control-allow-origin" not in other.headers


# -- no server path chosen by a client -------------------------------------------------------------------------
class FileAccessRecorder:
    """Records file-system audit events (open, listdir, remove, ...) while ``active``. Audit hooks cannot be
    removed, so the hook stays installed and simply ignores events outside ``recording()``."""

    EVENTS = {"open", "os.listdir", "os.scandir", "os.remove", "os.rename", "os.mkdir", "os.chmod", "shutil.copyfile"}
    _installed: FileAccessRecorder | None = None

    def __init__(self) -> None:
        self.active = False
        self.events: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    @classmethod
    def get(cls) -> FileAccessRecorder:
        if cls._installed is None:
            cls._installed = cls()
            sys.addaudithook(cls._installed._hook)
        return cls._installed

    def _hook(self, event: str, args: tuple) -> None:
        if self.active and event in self.EVENTS:
            target = args[0] if args else ""
            with self._lock:
                self.events.append((event, str(target)))

    def __enter__(self) -> FileAccessRecorder:
        self.events.clear()
        self.active = True
        return self

    def __exit__(self, *exc: object) -> None:
        self.active = False


@pytest.fixture()
def sentinel(tmp_path) -> Path:
    """An existing file a client might name, holding an image that would be noticed if it were read."""
    path = tmp_path / "sentinel.png"
    Image.new("RGB", (8, 8), (0, 255, 0)).save(path)
    return path


def test_client_filenames_and_query_paths_never_reach_the_file_system(jpeg, tmp_path, sentinel):
    absent = tmp_path / "created-by-a-client.jpg"
    names = [
        "../../etc/passwd",
        "/etc/passwd",
        "..\\..\\windows\\win.ini",
        str(sentinel),
        str(absent),
        "file:///etc/shadow",
        "a" * 300,
    ]
    query = {
        "path": "/etc/passwd",
        "file": "../../etc/passwd",
        "filename": str(sentinel),
        "weights": str(sentinel),
        "labels": "/etc/passwd",
        "url": "file:///etc/passwd",
    }
    with FileAccessRecorder.get() as recorder:  # the recorder does see file access
        sentinel.read_bytes()
    assert ("open", str(sentinel)) in recorder.events
    before = sorted(p.name for p in tmp_path.iterdir())
    with TestClient(stand_in_app()) as client, FileAccessRecorder.get() as recorder:
        files = [("file", (name, jpeg, "image/jpeg")) for name in names]
        predicted = client.post("/predict", files=files, params=query)
        features = client.post("/features", files=files, params=query)
        info = client.get("/info", params=query)
    assert predicted.status_code == 200, predicted.text
    assert features.status_code == 200, features.text
    # The names are only echoed back as strings (at most 255 characters).
    assert [r["filename"] for r in predicted.json()["results"]] == [n[:255] for n in names]
    assert [r["filename"] for r in features.json()["results"]] == [n[:255] for n in names]
    assert all(r["top_k"][0]["label"] == "espresso" for r in predicted.json()["results"])
    assert info.json()["weights_file"] is None
    touched = [
        (event, target)
        for event, target in recorder.events
        if any(part in target for part in ("passwd", "shadow", "win.ini", str(tmp_path)))
    ]
    assert not touched, touched
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "a file appeared"


@pytest.mark.parametrize(
    "path",
    [
        "/docs/assets/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "/docs/assets/..%2f..%2f..%2f..%2f..%2f..%2f..%2fetc%2fpasswd",
        "/docs/assets/%2fetc%2fpasswd",
        "/docs/assets//etc/passwd",
    ],
)
def test_the_static_docs_assets_do_not_escape_their_directory(path):
    app = stand_in_app()
    if not any(getattr(route, "path", "") == "/docs/assets" for route in app.routes):
        pytest.skip("swagger-ui-bundle-v2 not installed: no static assets are served")
    with TestClient(app) as client, FileAccessRecorder.get() as recorder:
        response = client.get(path)
        assert client.get("/docs/assets/swagger-ui.css").status_code == 200  # the mount itself works
    assert response.status_code in (404, 400), (response.status_code, response.text[:200])
    assert "root:" not in response.text
    assert not [e for e in recorder.events if "passwd" in e[1]], recorder.events


def test_no_route_takes_a_path_or_a_free_form_string_parameter():
    app = stand_in_app()
    document = TestClient(app).get("/openapi.json").json()
    parameters = []
    for route, operations in document["paths"].items():
        assert "{" not in route, route
        for operation in operations.values():
            for parameter in operation.get("parameters", []):
                assert parameter["in"] != "path", (route, parameter)
                parameters.append((route, parameter["name"], parameter["schema"]))
    # Every query parameter is a number or a flag, except ``model``: a name only looked up among the served
    # models (a dict, service/core/registry.py) and at most 64 characters; ``format``, one of a fixed set;
    # and /explain's ``class``: at most 64 values of at most 256 characters, each only compared with the
    # model's labels or parsed as an index (service/core/cam.py, parse_classes). Nothing names a file.
    strings = [(route, name, schema) for route, name, schema in parameters
               if schema.get("type") not in ("integer", "boolean")]
    assert parameters and strings
    for route, name, schema in strings:
        if name == "model":
            assert {"type": "string", "maxLength": 64} in schema["anyOf"], (route, schema)
        elif name == "format":
            assert schema["type"] == "string" and schema["enum"], (route, schema)
        else:
            assert (route, name) == ("/explain", "class"), (route, name, schema)
            listed = schema["anyOf"][0]
            assert listed["maxItems"] <= 64 and listed["items"] == {"type": "string", "maxLength": 256}, schema
    # Outside the document, the only templated routes are the Open Inference Protocol's (its spec puts the
    # model name and version in the path): they are only compared with the served models' names and "1"
    # (service/v2/protocol.py, V2Model.check), or, for the repository API, matched against a strict name
    # pattern before any path is formed (service/core/repository.py, NAME_RE); an unknown one is a 404.
    templated = [getattr(r, "path", "") for r in app.routes if "{" in getattr(r, "path", "")]
    assert all(path.startswith(("/v2/models/{model_name}", "/v2/repository/models/{model_name}"))
               for path in templated), templated
    with TestClient(app) as client:
        for name in ("..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd", "efficientnet-lite0%00"):
            response = client.get(f"/v2/models/{name}")
            assert response.status_code == 404 and set(response.json()) == {"error"}, name
            response = client.get(f"/info?model={name}")
            assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found", name


# -- no stack traces to clients --------------------------------------------------------------------------------
class ExplodingLabels(list):
    def __getitem__(self, index):
        raise LookupError(f"labels table corrupt at /srv/secret/labels.json index {index}")


def test_an_unforeseen_error_is_a_json_500_without_internals(jpeg):
    app = stand_in_app(labels=ExplodingLabels(imagenet_classes()))
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.post(
            "/predict", content=jpeg, headers={"Content-Type": "image/jpeg", "X-Request-ID": "boom-1"}
        )
        assert response.status_code == 500
        assert response.headers["content-type"].startswith("application/json")
        assert response.json() == {
            "error": {"code": "internal_error", "message": "internal server error", "request_id": "boom-1"}
        }
        for leak in ("Traceback", 'File "', "LookupError", "/srv/secret", ".py"):
            assert leak not in response.text, leak
        assert client.get("/readyz").status_code == 200  # and the service goes on
