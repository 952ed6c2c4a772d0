"""efficientnet-batch --ray and the Ray Data predictor, on a real two-node Ray cluster of this machine.

The cluster is two ``ray start`` processes (a head of 2 CPUs and a worker node of 1), on loopback, with a
temporary folder of their own; the fixture kills every process they started and checks that none is left.

- The job over a folder of photos and broken files writes the rows a local (in-process) run writes: the
  same paths, each exactly once, the same error rows, top-k indices and labels equal and scores and
  embeddings within 1e-5, in .jsonl, .npy and .parquet, with the packaged model and with a fine-tuned
  checkpoint and its labels.
- A worker node killed mid-job: the job still writes every file exactly once (Ray redoes the lost work), or
  stops with one sentence and ``--resume`` finishes it.
- ``EfficientNetPredictor`` in a ``ray.data`` pipeline written here, as a user writes one.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.components import missing_component
from tests.helpers.images import load_photos
from tests.helpers.ray_cluster import RayNodes, descendants, leftovers, ray_env
from tests.helpers.repository import save_fine_tuned_lite0
from tests.helpers.server import REPO

try:
    import ray
    import ray.data
except ImportError:
    missing_component("ray[data] is not installed (pip install '.[ray]'; make test installs it)")

PHOTOS = load_photos()
LIMIT = 100_000  # EFFNET_MAX_BODY_BYTES of every run: the photos fit, big.jpg does not
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def cluster():
    nodes = RayNodes()
    try:
        nodes.start(head_cpus=2)
        nodes.add(cpus=1)
        yield nodes
    finally:
        pids = nodes.pids()
        nodes.stop()
    time.sleep(0.5)
    assert leftovers(nodes, pids) == [], "processes of the test's Ray cluster outlived it"
    assert not nodes.root.exists()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Photos (some twice, one without an extension) and, mixed in, files that are no image: each of those
    is one error row in every mode."""
    root = tmp_path_factory.mktemp("ray") / "photos"
    (root / "a" / "b").mkdir(parents=True)
    for i, (name, data) in enumerate(sorted(PHOTOS.items())):
        (root / name).write_bytes(data)
        (root / "a" / f"copy-{name}").write_bytes(data)
        (root / "a" / "b" / f"photo{i}").write_bytes(data)  # found by its content
    (root / "a" / "notes.jpg").write_text("a text file named like a photo")
    (root / "a" / "cut.jpg").write_bytes(PHOTOS["coffee.jpg"][:4000])
    (root / "a" / "b" / "empty.png").write_bytes(b"")
    (root / "big.jpg").write_bytes(PHOTOS["coffee.jpg"] + b"\0" * LIMIT)  # over EFFNET_MAX_BODY_BYTES
    (root / "README.md").write_text("not an image, ignored by both modes")
    return root


ERRORS = {"a/notes.jpg": "invalid_image", "a/cut.jpg": "invalid_image", "a/b/empty.png": "invalid_image",
          "big.jpg": "body_too_large"}
IMAGES = 3 * len(PHOTOS) + len(ERRORS)


# Both modes on the torch engine, one thread: it loads in a third of the ONNX export's time, and every actor
# loads the model once (the user's pipeline below runs the default, onnxruntime).
RUN_ENV = {"EFFNET_BACKEND": "torch", "EFFNET_NUM_THREADS": "1"}


def batch(*args: str, timeout: float = 240, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "service.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=ray_env(**RUN_ENV, EFFNET_MAX_BODY_BYTES=str(LIMIT), **env))


def read_rows(output: Path) -> dict[str, dict]:
    """path -> row (top_k / embedding / error) of any output format; fails on a path written twice."""
    if output.suffix == ".jsonl":
        rows = [json.loads(line) for line in output.read_text().splitlines()]
    elif output.suffix == ".npy":
        paths = output.with_name(output.stem + ".paths.txt").read_text().splitlines()
        rows = [{"path": p, "embedding": v} for p, v in zip(paths, np.load(output), strict=True)]
    else:
        import pyarrow.parquet as pq

        rows = [{k: v for k, v in row.items() if v is not None} for row in pq.read_table(output).to_pylist()]
    paths = [row["path"] for row in rows]
    assert len(paths) == len(set(paths)), f"a path written twice in {output}"
    return {row["path"]: row for row in rows}


def assert_same_rows(ray_rows: dict[str, dict], local_rows: dict[str, dict]) -> None:
    assert sorted(ray_rows) == sorted(local_rows)
    for path, expected in local_rows.items():
        got = ray_rows[path]
        assert sorted(got) == sorted(expected), path
        if "error" in expected:
            assert got["error"] == expected["error"], path
        elif "top_k" in expected:
            assert [(c["index"], c["label"]) for c in got["top_k"]] == [(c["index"], c["label"])
                                                                          for c in expected["top_k"]], path
            np.testing.assert_allclose([c["score"] for c in got["top_k"]], [c["score"] for c in expected["top_k"]],
                                       rtol=0, atol=TOLERANCE, err_msg=path)
        else:
            np.testing.assert_allclose(np.asarray(got["embedding"]), np.asarray(expected["embedding"]),
                                       rtol=0, atol=TOLERANCE, err_msg=path)


@pytest.fixture(scope="module")
def fine_tuned(tmp_path_factory) -> dict[str, str]:
    """A Lite0 fine-tuned to 10 classes and its labels, as EFFNET_WEIGHTS / EFFNET_LABELS."""
    root = tmp_path_factory.mktemp("fine-tuned")
    save_fine_tuned_lite0(root / "birds.pth", classes=10)
    (root / "labels.txt").write_text("\n".join(f"bird {i}" for i in range(10)) + "\n")
    return {"EFFNET_WEIGHTS": str(root / "birds.pth"), "EFFNET_LABELS": str(root / "labels.txt")}


def given(folder: Path) -> str:
    """The folder as the command line names it: relative to the command's working folder (the nodes' workers
    run in folders of their own, so this checks that the files are found all the same)."""
    return os.path.relpath(folder, REPO)


LOCAL: dict[tuple, dict[str, dict]] = {}  # a local run's rows, per (command line, settings): the reference


def local_rows(folder: Path, tmp: Path, args: tuple[str, ...], env: dict[str, str]) -> dict[str, dict]:
    key = (args, tuple(sorted(env.items())))
    if key not in LOCAL:
        output = tmp / f"local-{len(LOCAL)}{Path(args[2]).suffix}"
        done = batch(args[0], given(folder), "-o", str(output), *args[3:], **env)
        assert done.returncode == 1, done.stderr  # the broken files
        LOCAL[key] = read_rows(output)
    return LOCAL[key]


@pytest.mark.parametrize(
    ("args", "model"),
    [
        (("predict", "", "out.jsonl", "--top-k", "5"), "packaged"),
        (("features", "", "out.npy", "--normalize"), "packaged"),
        (("predict", "", "out.parquet", "--top-k", "3"), "fine-tuned"),
    ],
    ids=["predict-jsonl", "features-npy-normalized", "fine-tuned-checkpoint-labels-parquet"],
)
def test_the_job_on_two_nodes_writes_the_rows_of_a_local_run(cluster, folder, fine_tuned, tmp_path, args, model):
    env = fine_tuned if model == "fine-tuned" else {}
    expected = local_rows(folder, tmp_path.parent, args, env)
    output = tmp_path / args[2]
    done = batch(args[0], given(folder), "-o", str(output), *args[3:], "--ray", cluster.address, **env)
    assert done.returncode == 1, done.stderr
    assert "(2 nodes, 3 CPUs" in done.stderr, done.stderr
    ok = IMAGES - len(ERRORS)
    assert f"{IMAGES} images in" in done.stderr and f"{ok} ok, {len(ERRORS)} errors" in done.stderr, done.stderr
    for name in ERRORS:
        assert f"error: {os.path.join(given(folder), name)}: " in done.stderr
    rows = read_rows(output)
    assert_same_rows(rows, expected)
    if args[2].endswith(".npy"):
        assert len(rows) == ok  # .npy keeps successes only, as in a local run
    else:
        assert len(rows) == IMAGES
        codes = {os.path.relpath(p, given(folder)): r["error"]["code"] for p, r in rows.items() if "error" in r}
        assert codes == ERRORS
    if model == "fine-tuned":
        assert {c["label"] for r in rows.values() for c in r.get("top_k", [])} <= {f"bird {i}" for i in range(10)}


def test_resume_skips_what_the_output_holds(cluster, folder, tmp_path):
    """--resume with --ray: the rows already written stay, their paths are not sent again, the errors are
    tried again; the file ends with every path once."""
    output = tmp_path / "out.jsonl"
    local = local_rows(folder, tmp_path.parent, ("predict", "", "out.jsonl", "--top-k", "5"), {})
    done_before = dict(list(sorted(local.items()))[: IMAGES // 2])
    output.write_text("".join(json.dumps(row) + "\n" for row in done_before.values()))
    kept = sum("error" not in r for r in done_before.values())
    done = batch("predict", given(folder), "-o", str(output), "--top-k", "5", "--resume", "--ray", cluster.address)
    assert done.returncode == 1, done.stderr
    assert f"{kept} already done" in done.stderr, done.stderr
    assert f"{IMAGES - kept} images in" in done.stderr, done.stderr
    assert_same_rows(read_rows(output), local)


def test_the_predictor_in_a_users_own_pipeline(cluster, folder, tmp_path):
    """ray.data.read_binary_files -> map_batches(EfficientNetPredictor) as the README shows it: every file
    read is a row (the README and the broken files with their error), embeddings as a local run's."""
    from ray.data import ActorPoolStrategy

    from service.ray_data import EfficientNetPredictor

    expected = local_rows(folder, tmp_path.parent, ("features", "", "out.npy", "--normalize"), {})
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        ds = ray.data.read_binary_files(str(folder), include_paths=True)
        ds = ds.map_batches(EfficientNetPredictor, fn_constructor_kwargs={"task": "features", "normalize": True},
                            batch_size=4, compute=ActorPoolStrategy(min_size=1, max_size=2), num_cpus=1)
        rows = ds.take_all()
        schema = ds.schema()
    finally:
        ray.shutdown()
    assert schema.names == ["path", "embedding", "error"]
    by_path = {row["path"]: row for row in rows}
    assert len(by_path) == len(rows) == IMAGES + 1  # read_binary_files reads README.md too
    expected = {os.path.normpath(os.path.join(REPO, p)): row for p, row in expected.items()}  # absolute paths
    big = str(folder / "big.jpg")  # read_binary_files applies no EFFNET_MAX_BODY_BYTES: a photo, trailing bytes
    for path, row in by_path.items():
        path = os.path.normpath(path)
        if path in expected or path == big:
            assert row["error"] is None, row
            if path in expected:
                np.testing.assert_allclose(np.asarray(row["embedding"]), expected[path]["embedding"], rtol=0,
                                           atol=TOLERANCE, err_msg=path)
        else:
            assert row["embedding"] is None and row["error"]["code"] == "invalid_image", row


# ---- a worker node lost mid-job -----------------------------------------------------------------------------
MANY = 240


def job_workers(node) -> list[str]:
    """Process titles of the node's workers busy with the job (Ray names them after what they run)."""
    titles = []
    for pid in descendants(node.process.pid):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        if "read_and_decode" in title or "EfficientNetPredictor" in title:
            titles.append(title)
    return titles


def test_a_worker_node_killed_mid_job_loses_no_file_and_repeats_none(cluster, tmp_path):
    """A third node joins, the job spreads onto it, and it is killed (its raylet, object store and workers at
    once) while it works for the job. Ray Data redoes what was lost: the job completes with every file
    exactly once. If it cannot, the run must stop with one clear sentence, and --resume must finish it."""
    root = tmp_path / "many"
    names = sorted(PHOTOS)
    for i in range(MANY):
        (root / f"part{i % 4}").mkdir(parents=True, exist_ok=True)
        (root / f"part{i % 4}" / f"{i:04d}-{names[i % 3]}").write_bytes(PHOTOS[names[i % 3]])
    extra = cluster.add(cpus=2)
    output, log = tmp_path / "out.jsonl", tmp_path / "stderr.txt"
    args = [sys.executable, "-m", "service.cli", "predict", str(root), "-o", str(output), "--progress-every", "1",
            "--ray", cluster.address]
    with open(log, "w") as stderr:
        job = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr,
                               env=ray_env(**RUN_ENV))
    try:
        deadline = time.monotonic() + 180
        # Killed as soon as the node holds some of the job (a decoding task, whose blocks then live in its
        # object store, or an inference actor: its worker's process title says which). Decoding runs ahead
        # of inference, so that is while the first actor loads or while rows are being written.
        while not job_workers(extra):
            assert job.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.02)
        lost = job_workers(extra)
        written_before = len(output.read_bytes().splitlines()) if output.exists() else 0
        cluster.kill(extra)
        code = job.wait(timeout=240)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    stderr_text = log.read_text()
    assert "(3 nodes, 5 CPUs" in stderr_text, stderr_text
    # Shown with -s: what the node held, how far the job was, how it went on.
    print(f"killed with the node ({written_before} rows written):", lost, stderr_text, sep="\n")
    if code != 0:
        # The run stopped: one sentence says why, and the rows written so far are whole and unique.
        errors = [line for line in stderr_text.splitlines() if line.startswith("efficientnet-batch: error:")]
        assert len(errors) == 1 and "Traceback" not in stderr_text, stderr_text
        assert code == 1
        written = len(read_rows(output))
        resumed = subprocess.run(args + ["--resume"], cwd=REPO, capture_output=True, text=True, timeout=240,
                                 env=ray_env(**RUN_ENV))
        assert resumed.returncode == 0, resumed.stderr
        assert f"{written} already done" in resumed.stderr
    rows = read_rows(output)  # each path once
    assert sorted(rows) == sorted(str(p) for p in root.rglob("*.jpg")) and len(rows) == MANY
    assert all("top_k" in row for row in rows.values())
    assert re.search(rf"{MANY if code == 0 else MANY - written} images in .*: \d+ ok, 0 errors", stderr_text
                     if code == 0 else resumed.stderr)
