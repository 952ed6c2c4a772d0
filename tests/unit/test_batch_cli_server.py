"""efficientnet-batch --server against a stand-in service that misbehaves on purpose.

The stand-in (a threaded stdlib HTTP server in this process) answers /info, /predict and /features like
the service, but can answer 503 with Retry-After for a while, drop connections without answering, demand
an API key, or refuse some images; it records how many requests were in flight at once. The same command
against the real service is tested in tests/integration/test_batch_cli.py.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from service.cli.main import main
from service.cli.sinks import paths_file


class StandIn:
    """A fake service on a free loopback port. ``unavailable_s``: 503 (``retry_after``) for that long after
    the first inference request; ``always_503``: forever; ``drop_first``: close that many connections
    without answering; ``api_key``: required bearer key; bodies starting with b"bad" get a 400."""

    def __init__(self, *, unavailable_s: float = 0.0, retry_after: str = "1", always_503: bool = False,
                 drop_first: int = 0, api_key: str | None = None, delay_s: float = 0.01) -> None:
        self.unavailable_s = unavailable_s
        self.retry_after = retry_after
        self.always_503 = always_503
        self.drop_first = drop_first
        self.api_key = api_key
        self.delay_s = delay_s
        self.lock = threading.Lock()
        self.inflight = 0
        self.max_inflight = 0
        self.statuses: Counter[int] = Counter()
        self.dropped = 0
        self.events: list[tuple[float, int]] = []  # (time, status) of every inference answer
        self.first_request: float | None = None
        self.auth_seen: set[str | None] = set()
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _send(self, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path.split("?", 1)[0] == "/info":  # a query it does not know is ignored, as FastAPI does
                    self._send(200, {"model": "stand-in", "num_classes": 1000, "num_features": 4,
                                     "limits": {"max_body_bytes": 1 << 20}})
                else:
                    self._send(404, {"error": {"code": "not_found", "message": "Not Found"}})

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with stand_in.lock:
                    stand_in.inflight += 1
                    stand_in.max_inflight = max(stand_in.max_inflight, stand_in.inflight)
                    if stand_in.first_request is None:
                        stand_in.first_request = time.monotonic()
                    drop = stand_in.dropped < stand_in.drop_first
                    stand_in.dropped += drop
                try:
                    time.sleep(stand_in.delay_s)
                    if drop:
                        self.close_connection = True  # no answer at all: the client sees the connection end
                        return
                    status, answer, headers = stand_in.answer(self.path, self.headers.get("Authorization"), body)
                    with stand_in.lock:
                        stand_in.statuses[status] += 1
                        stand_in.events.append((time.monotonic(), status))
                    self._send(status, answer, headers)
                finally:
                    with stand_in.lock:
                        stand_in.inflight -= 1

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def answer(self, path: str, auth: str | None, body: bytes) -> tuple[int, dict, dict]:
        self.auth_seen.add(auth)
        if self.api_key and auth != f"Bearer {self.api_key}":
            return 401, {"error": {"code": "unauthorized", "message": "missing or invalid API key"}}, {}
        assert self.first_request is not None
        if self.always_503 or time.monotonic() - self.first_request < self.unavailable_s:
            return 503, {"error": {"code": "overloaded", "message": "queue full"}}, {"Retry-After": self.retry_after}
        if body.startswith(b"bad"):
            return 400, {"error": {"code": "invalid_image", "message": "image 1: not a supported image",
                                   "image_index": 0, "reason": "not a supported image"}}, {}
        if path.startswith("/features"):
            return 200, {"model": "stand-in", "dim": 4, "results": [{"filename": None,
                                                                     "embedding": [len(body), 1.0, 2.0, 3.0]}]}, {}
        label = body.decode()
        return 200, {"model": "stand-in", "results": [{"filename": None, "top_k": [
            {"index": 7, "label": label, "score": 0.75}]}]}, {}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def stand_in():
    servers: list[StandIn] = []

    def start(**options) -> StandIn:
        servers.append(StandIn(**options))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def make_images(folder: Path, count: int, *, bad: int = 0) -> dict[str, str]:
    """``count`` files named like images whose bytes the stand-in echoes as their label."""
    folder.mkdir(parents=True, exist_ok=True)
    expected = {}
    for i in range(count):
        path = folder / f"img{i:03d}.jpg"
        content = f"{'bad' if i < bad else 'label'}-{i}"
        path.write_text(content)
        expected[str(path)] = content
    return expected


def rows_of(path: Path) -> dict[str, dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    by_path = {row["path"]: row for row in rows}
    assert len(by_path) == len(rows), "one row per path"
    return by_path


@pytest.mark.slow  # waits out a 3 s outage
def test_a_server_answering_503_for_a_while_is_waited_for(stand_in, tmp_path, capsys):
    """503 with Retry-After for 3 s: every image still gets its result, exit 0, and the summary counts the
    retried requests."""
    server = stand_in(unavailable_s=3.0, retry_after="1")
    expected = make_images(tmp_path / "in", 12)
    out = tmp_path / "r.jsonl"
    assert main(["predict", str(tmp_path / "in"), "-o", str(out), "--server", server.url, "--concurrency", "3"]) == 0
    rows = rows_of(out)
    assert {path: row["top_k"][0]["label"] for path, row in rows.items()} == expected
    assert server.statuses[503] >= 3 and server.statuses[200] == 12
    assert f"{server.statuses[503]} requests retried" in capsys.readouterr().err


@pytest.mark.slow  # waits 2 s
def test_retry_after_is_honoured(stand_in, tmp_path):
    """The server asks for 2 s: no retry comes sooner, although the outage itself lasted only 0.3 s."""
    server = stand_in(unavailable_s=0.3, retry_after="2")
    make_images(tmp_path / "in", 3)
    assert main(["predict", str(tmp_path / "in"), "-o", str(tmp_path / "r.jsonl"), "--server", server.url,
                 "--concurrency", "3", "-q"]) == 0
    first_503 = min(t for t, status in server.events if status == 503)
    first_200 = min(t for t, status in server.events if status == 200)
    assert first_200 - first_503 >= 1.9


@pytest.mark.slow  # kept out of `make test-fast`, which must stay under a minute
def test_dropped_connections_are_retried(stand_in, tmp_path, capsys):
    """Connections closed without an answer (a restarting replica) are retried with backoff."""
    server = stand_in(drop_first=4)
    expected = make_images(tmp_path / "in", 8)
    out = tmp_path / "r.jsonl"
    assert main(["predict", str(tmp_path / "in"), "-o", str(out), "--server", server.url, "--concurrency", "2"]) == 0
    assert {p: r["top_k"][0]["label"] for p, r in rows_of(out).items()} == expected
    assert server.dropped == 4
    assert "4 requests retried" in capsys.readouterr().err


@pytest.mark.parametrize("concurrency", [1, 4])
def test_never_more_than_n_requests_in_flight(stand_in, tmp_path, concurrency):
    """--concurrency N bounds the requests in flight, and is used: the server sees exactly N at once."""
    server = stand_in(delay_s=0.05)
    make_images(tmp_path / "in", 4 * concurrency + 4)
    assert main(["predict", str(tmp_path / "in"), "-o", str(tmp_path / "r.jsonl"), "--server", server.url,
                 "--concurrency", str(concurrency), "-q"]) == 0
    assert server.max_inflight == concurrency


@pytest.mark.slow  # kept out of `make test-fast`, which must stay under a minute
def test_a_server_that_stays_down_stops_the_run_resumably(stand_in, tmp_path, capsys):
    """When an image's retries run out the run stops (exit 1) instead of writing an error row for every
    image left; what was written stays valid, and --resume against a healthy server finishes the job."""
    down = stand_in(always_503=True, retry_after="0")
    expected = make_images(tmp_path / "in", 10)
    out = tmp_path / "r.jsonl"
    assert main(["predict", str(tmp_path / "in"), "-o", str(out), "--server", down.url, "--retries", "2"]) == 1
    err = capsys.readouterr().err
    assert "giving up after 2 retries (503 overloaded: queue full)" in err
    assert "--resume" in err
    assert rows_of(out) == {}  # valid (empty): no image was answered
    healthy = stand_in()
    assert main(["predict", str(tmp_path / "in"), "-o", str(out), "--server", healthy.url, "--resume", "-q"]) == 0
    assert {p: r["top_k"][0]["label"] for p, r in rows_of(out).items()} == expected


def test_a_refused_api_key_stops_the_run_at_once(stand_in, tmp_path, capsys):
    """401 is not an image's fault: the run stops at the first answers with a hint; the right key works
    and travels as a bearer token."""
    server = stand_in(api_key="s3cret")
    make_images(tmp_path / "in", 30)
    out = tmp_path / "r.jsonl"
    assert main(["predict", str(tmp_path / "in"), "-o", str(out), "--server", server.url, "--api-key", "wrong",
                 "--concurrency", "2"]) == 1
    assert "answered 401 unauthorized: missing or invalid API key (check --api-key)" in capsys.readouterr().err
    assert server.statuses[401] <= 2
    assert main(["predict", str(tmp_path / "in"), "-o", str(out), "--server", server.url, "--api-key", "s3cret",
                 "--overwrite", "-q"]) == 0
    assert "Bearer s3cret" in server.auth_seen


def test_api_key_from_the_environment(stand_in, tmp_path, monkeypatch):
    server = stand_in(api_key="from-env")
    monkeypatch.setenv("EFFNET_API_KEY", "from-env")
    make_images(tmp_path / "in", 2)
    assert main(["predict", str(tmp_path / "in"), "-o", str(tmp_path / "r.jsonl"), "--server", server.url,
                 "-q"]) == 0


def test_images_the_server_refuses_are_error_rows(stand_in, tmp_path):
    """A 400 is the image's own fault: its row carries the service's code and message, the run goes on."""
    server = stand_in()
    make_images(tmp_path / "in", 6, bad=2)
    out = tmp_path / "r.jsonl"
    assert main(["predict", str(tmp_path / "in"), "-o", str(out), "--server", server.url, "-q"]) == 1
    rows = rows_of(out)
    errors = [row["error"] for row in rows.values() if "error" in row]
    assert errors == [{"code": "invalid_image", "message": "not a supported image"}] * 2
    assert sum("top_k" in row for row in rows.values()) == 4


def test_features_from_a_server_into_npy(stand_in, tmp_path):
    """The embedding size comes from the server's /info; rows land in the .npy with their paths beside."""
    server = stand_in()
    expected = make_images(tmp_path / "in", 5)
    out = tmp_path / "e.npy"
    assert main(["features", str(tmp_path / "in"), "-o", str(out), "--server", server.url, "-q"]) == 0
    matrix = np.load(out)
    listed = paths_file(out).read_text().splitlines()
    assert matrix.shape == (5, 4) and sorted(listed) == sorted(expected)
    for row, path in zip(matrix, listed, strict=True):
        assert row.tolist() == [len(expected[path]), 1.0, 2.0, 3.0]


def test_a_url_that_is_not_the_service_is_a_clear_error(stand_in, tmp_path, capsys):
    server = stand_in()
    make_images(tmp_path / "in", 1)
    assert main(["predict", str(tmp_path / "in"), "-o", str(tmp_path / "r.jsonl"),
                 "--server", server.url + "/elsewhere", "-q"]) == 1
    assert "is this the service?" in capsys.readouterr().err


def test_an_unreachable_server_is_reported_after_the_retries(tmp_path, capsys):
    from tests.helpers.server import free_port

    make_images(tmp_path / "in", 1)
    assert main(["predict", str(tmp_path / "in"), "-o", str(tmp_path / "r.jsonl"),
                 "--server", f"http://127.0.0.1:{free_port()}", "--retries", "1"]) == 1
    assert "GET /info: giving up after 1 retry (ConnectError" in capsys.readouterr().err


def test_a_server_that_ignores_model_is_not_used_for_another_model(stand_in, tmp_path, capsys):
    """A server from before ?model= answers /info for its own model: --model names another, so the run
    stops before sending any image rather than classify with the wrong model."""
    server = stand_in()
    make_images(tmp_path / "in", 3)
    assert main(["predict", str(tmp_path / "in"), "-o", str(tmp_path / "r.jsonl"), "--server", server.url,
                 "--model", "birds"]) == 1
    assert "answered for model 'stand-in', not 'birds': this server cannot choose a model by name" in \
        capsys.readouterr().err
    assert not server.statuses
