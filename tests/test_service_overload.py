"""Overload over HTTP against a real server: a full queue answers 503 at once, a late request 504.

The server is configured so the outcome is deterministic, not a race: batches of 2, a queue of 2 images,
a batch delay (3 s) longer than the request timeout (1 s). A lone image therefore waits in the queue
until its deadline, while a second single image completes its batch at once.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families


@pytest.fixture(scope="module")
def service(start_service):
    server = start_service(
        {
            "EFFNET_MAX_BATCH_SIZE": "2",
            "EFFNET_MAX_QUEUE": "2",
            "EFFNET_MAX_BATCH_DELAY_MS": "3000",
            "EFFNET_REQUEST_TIMEOUT_S": "1.0",
        }
    )
    yield server
    server.close()


def metric(url: str, name: str, **labels) -> float:
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    raise KeyError(name)


def test_full_queue_answers_503_with_retry_after_at_once(service, photos):
    coffee, cat = photos["coffee.jpg"], photos["chelsea.jpg"]

    async def scenario():
        async with httpx.AsyncClient(base_url=service.url, timeout=30.0) as client:
            first = asyncio.ensure_future(client.post("/predict", files={"file": ("a.jpg", coffee)}))
            await asyncio.sleep(0.3)  # `first` now holds 1 of the 2 queue slots, waiting for a partner
            started = time.perf_counter()
            refused = await client.post(
                "/predict", files=[("file", ("b1.jpg", cat)), ("file", ("b2.jpg", cat))]
            )
            refused_after = time.perf_counter() - started
            partner = await client.post("/predict", files={"file": ("c.jpg", cat)})
            return await first, refused, refused_after, partner

    first, refused, refused_after, partner = asyncio.run(scenario())
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["code"] == "overloaded"
    assert refused_after < 0.5  # answered at once, not queued
    assert first.status_code == 200 and partner.status_code == 200
    assert first.json()["results"][0]["top_k"][0]["label"] == "espresso"
    assert metric(service.url, "effnet_rejected_total", reason="queue_full") >= 1


def test_request_past_its_deadline_gets_504_and_frees_its_slot(service, photos):
    with httpx.Client(base_url=service.url, timeout=30.0) as client:
        started = time.perf_counter()
        late = client.post("/predict", files={"file": ("a.jpg", photos["coffee.jpg"])})
        elapsed = time.perf_counter() - started
        assert late.status_code == 504, late.text
        assert late.json()["error"]["code"] == "timeout"
        assert 0.9 <= elapsed < 2.5
        assert metric(service.url, "effnet_queue_depth") == 0
        # Both slots are free again: a two-image request fills a batch and is answered at once.
        both = client.post(
            "/predict",
            files=[("file", ("x.jpg", photos["coffee.jpg"])), ("file", ("y.jpg", photos["chelsea.jpg"]))],
        )
        assert both.status_code == 200
        assert len(both.json()["results"]) == 2
    assert metric(service.url, "effnet_rejected_total", reason="timeout") >= 1


def test_a_client_that_disconnects_frees_its_slot_at_once(service, photos):
    with httpx.Client(base_url=service.url, timeout=0.3) as client:
        with pytest.raises(httpx.ReadTimeout):
            client.post("/predict", files={"file": ("gone.jpg", photos["coffee.jpg"])})
    # Well before the 1 s request timeout, the abandoned image has left the queue.
    deadline = time.monotonic() + 0.5
    while metric(service.url, "effnet_queue_depth") != 0:
        assert time.monotonic() < deadline, "the abandoned image still holds its slot"
        time.sleep(0.02)
    assert metric(service.url, "effnet_rejected_total", reason="client_gone") >= 1
