"""Several models in one server: a model repository of the packaged Lite0 and a 10-class fine-tuned head.

Each model answers what a single-model service of it answers; concurrent requests to both never share a
batch; tritonclient's repository calls list, unload, load and reload them; a reload under load fails no
request, and what follows it comes from the new weights; a broken model fails the start naming the model,
and a broken reload leaves the old one serving.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as thttp
from fastapi.testclient import TestClient
from tritonclient.utils import InferenceServerException

from tests.helpers.fakes import app_from_settings
from tests.helpers.metrics import metric as scrape
from tests.helpers.repository import save_fine_tuned_lite0, write_model
from tests.helpers.server import ServiceProcess

BIRDS = [f"bird {i}" for i in range(10)]


def write_repository(root: Path) -> Path:
    write_model(root, "lite0", 'variant = "efficientnet-lite0"\n')
    birds = write_model(root, "birds", 'variant = "efficientnet-lite0"\nweights = "birds.pth"\n'
                        'labels = "labels.txt"\nmax_batch_size = 4\n')
    save_fine_tuned_lite0(birds / "birds.pth", len(BIRDS), seed=1)
    (birds / "labels.txt").write_text("\n".join(BIRDS) + "\n")
    return root


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    return write_repository(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def server(repository):
    env = {"EFFNET_MODEL_REPOSITORY": str(repository), "EFFNET_MODEL_CONTROL": "explicit",
           "EFFNET_DEFAULT_MODEL": "lite0", "EFFNET_BACKEND": "torch", "EFFNET_MAX_BATCH_DELAY_MS": "20"}
    with ServiceProcess(env, threads=1) as service:
        yield service


@pytest.fixture(scope="module")
def triton(server):
    client = thttp.InferenceServerClient(server.url.removeprefix("http://"))
    yield client
    client.close()


def single_model_logits(photo: bytes, **settings) -> np.ndarray:
    """What a one-model service of these settings answers for ``photo`` (all logits)."""
    app = app_from_settings(backend="torch", warmup=False, grpc_port=0, **settings)
    with TestClient(app) as client:
        response = client.post("/predict?logits=true", files={"file": ("p.jpg", photo)})
        assert response.status_code == 200, response.text
        return np.array(response.json()["results"][0]["logits"])


def logits(server, model: str | None, photo: bytes) -> np.ndarray:
    query = f"?logits=true&model={model}" if model else "?logits=true"
    response = httpx.post(f"{server.url}/predict{query}", files={"file": ("p.jpg", photo)}, timeout=60)
    assert response.status_code == 200, response.text
    return np.array(response.json()["results"][0]["logits"])


def metric(server, name: str, **labels: str) -> float:
    return scrape(server.url, name, **labels)


def test_each_model_answers_as_a_single_model_service_of_it(server, repository, photos):
    coffee = photos["coffee.jpg"]
    alone_lite0 = single_model_logits(coffee)
    alone_birds = single_model_logits(coffee, weights=str(repository / "birds" / "birds.pth"),
                                      labels=str(repository / "birds" / "labels.txt"), max_batch_size=4)
    assert alone_birds.shape == (10,) and alone_lite0.shape == (1000,)
    np.testing.assert_allclose(logits(server, "lite0", coffee), alone_lite0, atol=1e-4, rtol=0)
    np.testing.assert_allclose(logits(server, None, coffee), alone_lite0, atol=1e-4, rtol=0)  # the default
    np.testing.assert_allclose(logits(server, "birds", coffee), alone_birds, atol=1e-4, rtol=0)
    birds = httpx.post(f"{server.url}/predict?model=birds&top_k=3", files={"file": ("p.jpg", coffee)}).json()
    assert birds["model"] == "birds" and all(c["label"] in BIRDS for c in birds["results"][0]["top_k"])
    info = httpx.get(f"{server.url}/info?model=birds").json()
    assert (info["model"], info["variant"], info["num_classes"], info["labels_source"]) == (
        "birds", "efficientnet-lite0", 10, "file")
    assert info["batching"]["max_batch_size"] == 4  # its own model.toml's
    summary = {m["name"]: m for m in info["models"]}
    assert set(summary) == {"lite0", "birds"} and summary["lite0"]["default"] and not summary["birds"]["default"]
    assert summary["birds"]["parameters"] == info["parameters"] and summary["birds"]["weights_bytes"] > 0
    unknown = httpx.post(f"{server.url}/predict?model=owls", files={"file": ("p.jpg", coffee)})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    assert "birds" in unknown.json()["error"]["message"] and "lite0" in unknown.json()["error"]["message"]


def test_concurrent_requests_to_both_models_never_share_a_batch(server, photos):
    names = sorted(photos)
    expected = {(m, n): logits(server, m, photos[n]) for m in ("lite0", "birds") for n in names}
    images_before = {m: metric(server, "effnet_images_total", model=m) for m in ("lite0", "birds")}
    jobs = [(m, n) for _ in range(4) for m in ("lite0", "birds") for n in names]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda job: logits(server, job[0], photos[job[1]]), jobs))
    for job, answer in zip(jobs, answers, strict=True):
        # An image run in the other model's batch would come back with the other model's head.
        np.testing.assert_allclose(answer, expected[job], atol=1e-4, rtol=0)
    for m in ("lite0", "birds"):
        sent = sum(1 for job in jobs if job[0] == m)
        assert metric(server, "effnet_images_total", model=m) - images_before[m] == sent
    assert metric(server, "effnet_batch_size_count", model="birds") > 0
    assert metric(server, "effnet_model_info", model="birds") == 1


def test_tritonclient_lists_unloads_and_loads(server, triton, photos):
    index = {m["name"]: m for m in triton.get_model_repository_index()}
    assert {n: m["state"] for n, m in index.items()} == {"birds": "READY", "lite0": "READY"}
    assert triton.is_model_ready("birds") and triton.is_server_ready()

    triton.unload_model("birds")
    assert triton.is_model_ready("lite0")  # the other model still serves
    gone = httpx.post(f"{server.url}/predict?model=birds", files={"file": ("p.jpg", photos["coffee.jpg"])})
    assert gone.status_code == 404 and "not loaded" in gone.json()["error"]["message"]
    with pytest.raises(InferenceServerException) as refused:
        triton.get_model_metadata("birds")
    assert refused.value.status() == "404"
    assert logits(server, "lite0", photos["coffee.jpg"]).shape == (1000,)
    assert {m["name"]: m["state"] for m in triton.get_model_repository_index()}["birds"] == "UNAVAILABLE"
    assert httpx.get(f"{server.url}/readyz").status_code == 200  # ready: every model meant to be loaded is
    assert metric(server, "effnet_model_info", model="birds") == 0

    triton.load_model("birds")
    assert triton.is_model_ready("birds")
    assert logits(server, "birds", photos["coffee.jpg"]).shape == (10,)


def test_a_reload_under_load_fails_no_request_and_serves_the_new_weights(server, repository, triton, photos):
    coffee = photos["coffee.jpg"]
    old = logits(server, "birds", coffee)
    stop = threading.Event()
    statuses: list[int] = []
    lock = threading.Lock()

    def client() -> None:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            while not stop.is_set():
                response = http.post("/predict?model=birds&top_k=1", files={"file": ("p.jpg", coffee)})
                with lock:
                    statuses.append(response.status_code)

    threads = [threading.Thread(target=client) for _ in range(8)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1.0)
        # The new weights, then the reload.
        save_fine_tuned_lite0(repository / "birds" / "birds.pth", len(BIRDS), seed=2)
        triton.load_model("birds")
        after = logits(server, "birds", coffee)
        time.sleep(1.0)
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    assert len(statuses) > 16 and set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}
    new = single_model_logits(coffee, weights=str(repository / "birds" / "birds.pth"),
                              labels=str(repository / "birds" / "labels.txt"))
    assert not np.allclose(old, new, atol=1e-3)
    np.testing.assert_allclose(after, new, atol=1e-4, rtol=0)
    info = httpx.get(f"{server.url}/info?model=birds").json()
    assert info["weights_sha256"] is not None


def test_a_broken_reload_leaves_the_old_model_serving(server, repository, triton, photos):
    coffee = photos["coffee.jpg"]
    before = logits(server, "birds", coffee)
    toml = repository / "birds" / "model.toml"
    good = toml.read_text()
    toml.write_text(good.replace('labels = "labels.txt"', 'labels = "missing.txt"'))
    try:
        with pytest.raises(InferenceServerException) as failed:
            triton.load_model("birds")
        assert failed.value.status() == "400" and "birds" in failed.value.message()
        assert "still serves" in failed.value.message()
    finally:
        toml.write_text(good)
    np.testing.assert_allclose(logits(server, "birds", coffee), before, atol=1e-6, rtol=0)
    assert httpx.get(f"{server.url}/readyz").status_code == 200


def test_a_broken_model_fails_the_start_naming_it(tmp_path):
    write_model(tmp_path, "lite0", 'variant = "efficientnet-lite0"\n')
    write_model(tmp_path, "owls", 'variant = "efficientnet-lite0"\nweights = "owls.pth"\n')
    service = ServiceProcess({"EFFNET_MODEL_REPOSITORY": str(tmp_path)})
    try:
        assert service.wait_exit(120) == 1
        log = service.logs()
    finally:
        service.close()
    errors = [line for line in log.splitlines() if '"level": "ERROR"' in line]
    assert len(errors) == 1 and "startup failed: model 'owls'" in errors[0] and "owls.pth" in errors[0], log


def test_repository_calls_refuse_what_they_cannot_honour_over_rest(server):
    """Each answered in the protocol's error shape, and nothing loaded or unloaded by them."""
    base = f"{server.url}/v2/repository"
    cases = {
        "index ready not a boolean": (httpx.post(f"{base}/index", json={"ready": "yes"}), 400, "'ready'"),
        "body not an object": (httpx.post(f"{base}/index", json=[1]), 400, "JSON object"),
        "Triton's config override": (httpx.post(f"{base}/models/birds/load",
                                                json={"parameters": {"config": "{}"}}), 400, "model.toml"),
        "unknown load parameter": (httpx.post(f"{base}/models/birds/load", json={"parameters": {"x": 1}}),
                                   400, "unknown parameter 'x'"),
        "unload_dependents not a boolean": (httpx.post(f"{base}/models/birds/unload",
                                                       json={"parameters": {"unload_dependents": "no"}}),
                                            400, "unload_dependents"),
        "a model the repository lacks": (httpx.post(f"{base}/models/owls/load"), 404, "no model 'owls'"),
        "a path as a name": (httpx.post(f"{base}/models/..%2Flite0/load"), 404, ""),
    }
    for case, (response, status, words) in cases.items():
        assert response.status_code == status and words in response.json()["error"], (case, response.text)
    ready = httpx.post(f"{base}/index", json={"ready": True}).json()
    assert {m["name"] for m in ready} == {"lite0", "birds"}  # still both, and both ready
