"""efficientnet-batch as a user runs it: a real process, against a real service, really interrupted.

- The rows of a folder with good, bad and nested images carry the same classes as the real server's
  /predict, in-process and in --server mode alike.
- SIGINT (Ctrl-C) or SIGTERM mid-run leaves a valid .jsonl / .npy / .parquet, exits 130 / 143, and
  --resume then finishes the job without classifying any image twice.
- On a terminal the progress bar is drawn; in a pipe, plain lines.
"""

from __future__ import annotations

import json
import os
import pty
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.helpers.images import load_photos
from tests.helpers.server import REPO

PHOTOS = load_photos()


def command_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EFFNET_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update({"EFFNET_NUM_THREADS": "2", **extra})
    return env


def batch(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "service.cli", *args], cwd=REPO, env=command_env(),
                          capture_output=True, text=True, timeout=timeout)


def jsonl_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture()
def mixed_folder(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    (root / "a" / "b").mkdir(parents=True)
    (root / "coffee.jpg").write_bytes(PHOTOS["coffee.jpg"])
    (root / "a" / "chelsea.jpg").write_bytes(PHOTOS["chelsea.jpg"])
    (root / "a" / "b" / "grace_hopper").write_bytes(PHOTOS["grace_hopper.jpg"])  # found by content
    (root / "a" / "not-really.png").write_text("<html>a web page saved as .png</html>")
    (root / "a" / "b" / "cut.jpg").write_bytes(PHOTOS["coffee.jpg"][:5000])
    (root / "notes.md").write_text("not an image")
    return root


def test_rows_carry_the_classes_of_the_real_servers_predict(lite0_service, mixed_folder, tmp_path):
    """One row per image, in-process and through --server; good images have exactly the indices and
    labels that the real server's /predict gives for the same bytes (scores equal to float rounding),
    bad ones the same error code in both modes; exit status 1 since two images failed."""
    in_process, remote = tmp_path / "local.jsonl", tmp_path / "remote.jsonl"
    done = batch("predict", str(mixed_folder), "-o", str(in_process), "--top-k", "5")
    assert done.returncode == 1, done.stderr
    assert "5 images in" in done.stderr and "3 ok, 2 errors" in done.stderr
    done = batch("predict", str(mixed_folder), "-o", str(remote), "--top-k", "5", "--server", lite0_service.url)
    assert done.returncode == 1, done.stderr

    local_rows = {r["path"]: r for r in jsonl_rows(in_process)}
    remote_rows = {r["path"]: r for r in jsonl_rows(remote)}
    assert set(local_rows) == set(remote_rows) and len(local_rows) == 5
    with httpx.Client(base_url=lite0_service.url, timeout=30) as client:
        for path, row in local_rows.items():
            answer = client.post("/predict", params={"top_k": 5}, content=Path(path).read_bytes(),
                                 headers={"Content-Type": "application/octet-stream"})
            if answer.status_code != 200:
                assert answer.status_code == 400
                assert row["error"]["code"] == remote_rows[path]["error"]["code"] == answer.json()["error"]["code"]
                continue
            expected = answer.json()["results"][0]["top_k"]
            for got in (row["top_k"], remote_rows[path]["top_k"]):
                assert [(c["index"], c["label"]) for c in got] == [(c["index"], c["label"]) for c in expected]
                assert [c["score"] for c in got] == pytest.approx([c["score"] for c in expected], rel=1e-4)
    assert local_rows[str(mixed_folder / "coffee.jpg")]["top_k"][0]["label"] == "espresso"


# ---- interrupted, then resumed ---------------------------------------------------------------------------
IMAGES = 300


@pytest.fixture(scope="module")
def many_photos(tmp_path_factory) -> Path:
    """300 photo files in 3 folders: long enough a run to interrupt it midway."""
    root = tmp_path_factory.mktemp("many")
    names = list(PHOTOS)
    for i in range(IMAGES):
        folder = root / f"part{i % 3}"
        folder.mkdir(exist_ok=True)
        (folder / f"{i:04d}-{names[i % 3]}").write_bytes(PHOTOS[names[i % 3]])
    return root


def rows_written(output: Path) -> list[str]:
    """The paths an output holds, in order, checking that it is a valid file of its format."""
    if output.suffix == ".jsonl":
        rows = jsonl_rows(output)  # every line parses
        assert all("top_k" in r or "embedding" in r for r in rows)
        return [r["path"] for r in rows]
    if output.suffix == ".npy":
        paths = output.with_name(output.stem + ".paths.txt").read_text().splitlines()
        matrix = np.load(output)
        assert matrix.shape == (len(paths), 1280) and np.isfinite(matrix).all()
        return paths
    import pyarrow.parquet as pq

    table = pq.read_table(output)
    assert table.column("error").null_count == table.num_rows
    return table.column("path").to_pylist()


def wait_for_progress(stderr: Path, proc: subprocess.Popen, at_least: int, timeout: float = 180) -> None:
    """Until a plain progress line reports ``at_least`` images done."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before it could be interrupted:\n" + stderr.read_text()
        done = [int(m) for m in re.findall(r"(\d+)/\d+ \(", stderr.read_text())]
        if done and max(done) >= at_least:
            return
        time.sleep(0.02)
    raise TimeoutError(stderr.read_text())


@pytest.mark.parametrize(
    ("task", "suffix", "signum", "server"),
    [
        ("predict", "jsonl", signal.SIGINT, False),
        ("features", "npy", signal.SIGTERM, False),
        ("predict", "parquet", signal.SIGTERM, True),
    ],
    ids=["jsonl-SIGINT-in-process", "npy-SIGTERM-in-process", "parquet-SIGTERM-server"],
)
def test_interrupted_run_leaves_a_valid_file_and_resume_finishes_without_repeating(
    task, suffix, signum, server, many_photos, tmp_path, request
):
    """Signal the command once it has done 30 images: it exits 128+signal with a valid output of those
    images; --resume skips exactly them, runs the rest, exits 0, and every image has one row."""
    output = tmp_path / f"out.{suffix}"
    args = [task, str(many_photos), "-o", str(output), "--progress-every", "0.05"]
    if server:
        args += ["--server", request.getfixturevalue("lite0_service").url, "--concurrency", "4"]
    log = tmp_path / "first.log"
    with open(log, "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "service.cli", *args], cwd=REPO, env=command_env(),
                                stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            wait_for_progress(log, proc, 30)
            proc.send_signal(signum)
            code = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    first_log = log.read_text()
    assert code == 128 + signum, first_log
    assert f"interrupted by {signal.Signals(signum).name} after" in first_log
    first = rows_written(output)
    assert 30 <= len(first) < IMAGES and len(set(first)) == len(first)
    if suffix == "parquet":
        assert not output.with_name(output.name + ".partial").exists()  # renamed into place on the signal

    resumed = batch(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"{IMAGES - len(first)} images in" in resumed.stderr
    assert f"{len(first)} already done" in resumed.stderr
    final = rows_written(output)
    assert len(final) == IMAGES and len(set(final)) == IMAGES
    assert final[: len(first)] == first  # the first run's rows are kept as they were, not redone


# ---- what the user sees ------------------------------------------------------------------------------------
def run_on_a_terminal(args: list[str], timeout: float = 120) -> tuple[int, str]:
    """Run the command with stdout and stderr on a pseudo-terminal; (exit status, everything it drew)."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", *args], cwd=REPO, env=command_env(),
                            stdin=follower, stdout=follower, stderr=follower, close_fds=True)
    os.close(follower)
    drawn = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the command has exited and closed the terminal
            break
        if not chunk:
            break
        drawn += chunk
    os.close(leader)
    return proc.wait(timeout=30), drawn.decode(errors="replace")


def test_progress_bar_on_a_terminal(lite0_service, many_photos, tmp_path):
    """On a terminal: a live bar (redrawn in place) with done/total, images/s, ETA and errors, then the
    one-line summary."""
    code, drawn = run_on_a_terminal(["predict", str(many_photos), "-o", str(tmp_path / "r.jsonl"),
                                     "--server", lite0_service.url])
    assert code == 0, drawn
    assert "\x1b[" in drawn and "\r" in drawn  # drawn and redrawn in place
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", drawn)
    assert f"{IMAGES}/{IMAGES}" in plain and "images/s" in plain and "ETA" in plain and "0 errors" in plain
    assert re.search(rf"efficientnet-batch: {IMAGES} images in [\d.]+ s \([\d.]+ images/s\): {IMAGES} ok, 0 errors",
                     plain)


def test_plain_lines_when_not_a_terminal(lite0_service, many_photos, tmp_path):
    """In a pipe or log: no escape codes, a plain progress line now and then, the same summary."""
    done = batch("predict", str(many_photos), "-o", str(tmp_path / "r.jsonl"), "--server", lite0_service.url,
                 "--progress-every", "0.2")
    assert done.returncode == 0, done.stderr
    assert "\x1b[" not in done.stderr
    assert re.search(rf"efficientnet-batch: \d+/{IMAGES} \(\d+%\), [\d.]+ images/s, 0 errors, ETA \d+:\d\d",
                     done.stderr)
    assert done.stderr.rstrip().splitlines()[-1].startswith(f"efficientnet-batch: {IMAGES} images in ")
