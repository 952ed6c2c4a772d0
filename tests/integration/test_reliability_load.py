"""Load over HTTP against one real server (Lite0, batches of 4, a queue of 8 images): a flood
gets only 200s and 503s with Retry-After, within a bound, all counted; clients that hang up mid-upload
cost nothing afterwards. (A client that gives up while its image is queued: tests/unit/test_reliability_faults.py.)
"""

from __future__ import annotations

import asyncio
import socket
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers.server import rss_bytes

MAX_QUEUE = 8
BATCH = 4
FLOOD = 100
FLOOD_BOUND_S = 90.0  # every flood request must be answered within this (2 busy shared cores)


@pytest.fixture(scope="module")
def service(start_service):
    server = start_service(
        {
            "EFFNET_MAX_QUEUE": str(MAX_QUEUE),
            "EFFNET_MAX_BATCH_SIZE": str(BATCH),
            "EFFNET_MAX_BATCH_DELAY_MS": "5",
            "EFFNET_REQUEST_TIMEOUT_S": "60",
            "EFFNET_DECODE_THREADS": "1",
        }
    )
    yield server
    server.close()


def metrics(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    values = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


def metric(values: dict, name: str, **labels: str) -> float:
    return sum(
        v for (n, lbl), v in values.items() if n == name and all(dict(lbl).get(k) == x for k, x in labels.items())
    )


def test_a_flood_gets_only_200s_and_503s_with_retry_after(service, photos, photo_classes):
    names = sorted(photos)
    before = metrics(service.url)

    async def one(client: httpx.AsyncClient, i: int) -> tuple[str, httpx.Response | Exception, float]:
        name = names[i % len(names)]
        started = time.perf_counter()
        try:
            response = await client.post("/predict", files={"file": (name, photos[name], "image/jpeg")})
        except httpx.HTTPError as exc:  # a transport error is a failure too; keep it for the report
            return name, exc, time.perf_counter() - started
        return name, response, time.perf_counter() - started

    async def flood():
        limits = httpx.Limits(max_connections=FLOOD, max_keepalive_connections=FLOOD)
        async with httpx.AsyncClient(base_url=service.url, timeout=FLOOD_BOUND_S, limits=limits) as client:
            return await asyncio.wait_for(asyncio.gather(*(one(client, i) for i in range(FLOOD))), FLOOD_BOUND_S + 10)

    outcomes = asyncio.run(flood())
    errors = [repr(r) for _, r, _ in outcomes if isinstance(r, Exception)]
    assert not errors, errors
    statuses = [r.status_code for _, r, _ in outcomes]
    assert set(statuses) <= {200, 503}, sorted(set(statuses))
    ok = [(n, r) for n, r, _ in outcomes if r.status_code == 200]
    refused = [r for _, r, _ in outcomes if r.status_code == 503]
    assert refused, "a flood of 100 against a queue of 8 was never refused: the queue is not bounded"
    assert len(ok) >= MAX_QUEUE, "the queue admitted less than it holds"
    for response in refused:
        assert response.headers["retry-after"] == "1"
        assert response.json()["error"]["code"] == "overloaded"
    for name, response in ok:  # the admitted ones got their own, right answer
        (result,) = response.json()["results"]
        assert result["filename"] == name
        if name != "grace_hopper.jpg":
            assert result["top_k"][0]["label"] in photo_classes[name]
    assert max(elapsed for _, _, elapsed in outcomes) < FLOOD_BOUND_S
    after = metrics(service.url)
    assert metric(after, "effnet_rejected_total", reason="queue_full") - metric(
        before, "effnet_rejected_total", reason="queue_full"
    ) == len(refused)
    assert metric(after, "effnet_requests_total", code="500") == metric(before, "effnet_requests_total", code="500")
    assert metric(after, "effnet_queue_depth") == 0


@pytest.mark.parametrize("encoding", ["raw image", "multipart"])
def test_clients_that_disconnect_mid_upload_cost_nothing(service, photos, encoding):
    before = metrics(service.url)
    rss_before = rss_bytes(service.proc.pid)
    photo = photos["grace_hopper.jpg"]
    if encoding == "multipart":
        media = "multipart/form-data; boundary=cut"
        body = (
            b'--cut\r\nContent-Disposition: form-data; name="file"; filename="g.jpg"\r\n'
            b"Content-Type: image/jpeg\r\n\r\n" + photo + b"\r\n--cut--\r\n"
        )
    else:
        media, body = "image/jpeg", photo
    gone = 10
    for i in range(gone):
        # Declare the whole body, send a third of it, hang up.
        with socket.create_connection(("127.0.0.1", service.port), timeout=5) as sock:
            head = (
                f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {media}\r\n"
                f"Content-Length: {len(body)}\r\nX-Request-ID: gone-{i}\r\n\r\n"
            )
            sock.sendall(head.encode() + body[: len(body) // 3])
            time.sleep(0.05)  # the server has read what came, and waits for more
        time.sleep(0.02)
    deadline = time.monotonic() + 5
    while True:
        after = metrics(service.url)
        counted = metric(after, "effnet_rejected_total", reason="client_gone") - metric(
            before, "effnet_rejected_total", reason="client_gone"
        )
        if counted >= gone or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    # Each is counted as a client that went away: not a server error, not a bad request.
    assert counted == gone
    assert metric(after, "effnet_rejected_total", reason="bad_request") == metric(
        before, "effnet_rejected_total", reason="bad_request"
    )
    assert metric(after, "effnet_requests_total", code="500") == metric(before, "effnet_requests_total", code="500")
    assert metric(after, "effnet_queue_depth") == 0
    assert metric(after, "effnet_batch_size_count") == metric(before, "effnet_batch_size_count")
    assert rss_bytes(service.proc.pid) - rss_before < 50 * 2**20
    errors = [line for line in service.logs().splitlines() if '"level": "ERROR"' in line]
    assert not errors, errors[:2]
    with httpx.Client(base_url=service.url, timeout=30) as client:
        assert client.get("/readyz").status_code == 200
        files = [("file", (f"{i}.jpg", photos["chelsea.jpg"])) for i in range(BATCH)]
        assert client.post("/predict", files=files).status_code == 200
