"""efficientnet-batch --model NAME with several models: a real server of a two-model repository, and the
same repository in-process.

The repository holds ``a`` and ``b``, both the packaged Lite0 weights, ``b`` with its own batch size and a
labels file of its own ("b-class N"), so every row says which model answered it. The server has no
default model: a request that names none is refused.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers.images import load_photos
from tests.helpers.repository import B_LABELS, two_lite0_models
from tests.helpers.server import REPO, ServiceProcess

PHOTOS = load_photos()
@pytest.fixture(scope="module")
def repository(tmp_path_factory) -> Path:
    return two_lite0_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def server(repository):
    """One server for the module: both models, no EFFNET_DEFAULT_MODEL."""
    env = {"EFFNET_MODEL_REPOSITORY": str(repository), "EFFNET_BACKEND": "torch"}
    with ServiceProcess(env, threads=1) as service:
        yield service


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    for name, data in PHOTOS.items():
        (root / name).write_bytes(data)
    return root


def batch(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("EFFNET_")}
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), full_env.get("PYTHONPATH")]))
    full_env.update({"EFFNET_NUM_THREADS": "1", **env})
    return subprocess.run([sys.executable, "-m", "service.cli", *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=300)


def top1(path: Path) -> dict[str, tuple[int, str]]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return {Path(r["path"]).name: (r["top_k"][0]["index"], r["top_k"][0]["label"]) for r in rows}


def served_top1(server, model: str) -> dict[str, tuple[int, str]]:
    answers = {}
    for name, data in PHOTOS.items():
        response = httpx.post(f"{server.url}/predict?model={model}&top_k=1", content=data,
                              headers={"Content-Type": "application/octet-stream"}, timeout=60)
        assert response.status_code == 200, response.text
        best = response.json()["results"][0]["top_k"][0]
        answers[name] = (best["index"], best["label"])
    return answers


def test_model_chooses_the_served_model_for_every_request(server, photos, tmp_path):
    """--model b: every row has b's labels (b answered every image) and the run is described as b's;
    --model a: the ImageNet labels, as a's own /predict gives them."""
    out_b, out_a = tmp_path / "b.jsonl", tmp_path / "a.jsonl"
    done = batch("predict", str(photos), "-o", str(out_b), "--top-k", "1", "--server", server.url, "--model", "b")
    assert done.returncode == 0, done.stderr
    assert f"predict with b at {server.url}" in done.stderr
    rows_b = top1(out_b)
    assert rows_b == served_top1(server, "b")
    assert all(label == B_LABELS[index] for index, label in rows_b.values())

    done = batch("predict", str(photos), "-o", str(out_a), "--top-k", "1", "--server", server.url, "--model", "a")
    assert done.returncode == 0, done.stderr
    assert top1(out_a) == served_top1(server, "a")
    assert {index for index, _ in top1(out_a).values()} == {index for index, _ in rows_b.values()}
    assert not any(label.startswith("b-class") for _, label in top1(out_a).values())


def images_answered(server) -> dict[str, float]:
    """effnet_images_total by model, from the server's /metrics."""
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return {sample.labels["model"]: sample.value for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.name == "effnet_images_total"}


def test_features_go_to_the_chosen_model(server, photos, tmp_path):
    """--model on features too: the server counts the images under a's name and none under b's."""
    before = images_answered(server)
    done = batch("features", str(photos), "-o", str(tmp_path / "a.npy"), "--server", server.url, "--model", "a")
    assert done.returncode == 0, done.stderr
    after = images_answered(server)
    assert after["a"] - before.get("a", 0) == len(PHOTOS)
    assert after.get("b", 0) == before.get("b", 0)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model", "nope"], "{url}: unknown model 'nope'; this server serves: a, b\n"),
        ([], "{url}: this server serves several models (a, b) and none by default (choose one with "
             "--model NAME)\n"),
    ],
)
def test_a_model_the_server_does_not_serve_stops_the_run_at_once(server, photos, tmp_path, extra, message):
    """An unknown name (or none, where the server has no default) stops the run before any image is sent,
    with the server's message, no retries and no output file; exit 1."""
    out = tmp_path / "r.jsonl"
    started = time.monotonic()
    done = batch("predict", str(photos), "-o", str(out), "--server", server.url, *extra)
    assert done.returncode == 1, done.stderr
    assert done.stderr == "efficientnet-batch: error: " + message.format(url=server.url)
    assert time.monotonic() - started < 30  # no backoff (the process start itself is a few seconds)
    assert not out.exists()


def test_model_loads_the_repository_model_in_process(server, repository, photos, tmp_path):
    """In-process with EFFNET_MODEL_REPOSITORY, --model b is b's model.toml (its labels file), with the
    same classes as the server's b; a variant name is not taken for a model."""
    out = tmp_path / "local.jsonl"
    done = batch("predict", str(photos), "-o", str(out), "--top-k", "1", "--model", "b",
                 EFFNET_MODEL_REPOSITORY=str(repository), EFFNET_BACKEND="torch")
    assert done.returncode == 0, done.stderr
    assert "predict with b (efficientnet-lite0) in-process (torch, cpu, float32)" in done.stderr
    assert top1(out) == served_top1(server, "b")

    done = batch("predict", str(photos), "-o", str(tmp_path / "x.jsonl"), "--model", "efficientnet-lite0",
                 EFFNET_MODEL_REPOSITORY=str(repository))
    assert done.returncode == 2
    assert f"--model efficientnet-lite0: no such model in the repository {repository} (it has: a, b)" in done.stderr
