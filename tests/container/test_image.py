"""The CPU image, built from the Dockerfile and run the way the README says: the same answers as the
local service over HTTP and gRPC, non-root, read-only, its HEALTHCHECK, /metrics, nothing of the build
left inside, and a plain ``docker stop`` / ``podman stop`` (10 s grace) that ends in exit 0 after the
lame duck. The image runs the server as several processes (its EFFNET_WORKERS): PID 1 supervises one
engine process and the front-end workers, every one of them as uid 10001 without capabilities, and the
stop passes through all of them cleanly.

One container serves the whole module; the stop test, last, ends it.
"""

from __future__ import annotations

import json
import re
import threading
import time

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from tests.container.engine import (
    IMAGE,
    README_RUN_FLAGS,
    REPO,
    Container,
    Engine,
    container_processes,
    dockerfile_base,
    host_pip_settings,
    server_processes,
)

# The first test also builds the image (and on a fresh machine the stand-in base): minutes on 2 busy cores.
pytestmark = [pytest.mark.container, pytest.mark.timeout(1800)]

MODEL = "efficientnet-lite0"
# Engines' default grace between SIGTERM and SIGKILL for `docker stop` / `podman stop` without -t.
DEFAULT_STOP_GRACE_S = 10.0


def answers(url: str, photos: dict[str, bytes]) -> dict[str, dict]:
    """/predict (top 5 and logits) and /features for each photo, one request each."""
    out = {}
    with httpx.Client(base_url=url, timeout=60) as client:
        for name, data in photos.items():
            files = {"file": (name, data, "image/jpeg")}
            predicted = client.post("/predict", params={"top_k": 5, "logits": "true"}, files=files)
            features = client.post("/features", files=files)
            assert predicted.status_code == 200 and features.status_code == 200, (predicted.text, features.text)
            result = predicted.json()["results"][0]
            out[name] = {
                "top_k": [(e["index"], e["label"], e["score"]) for e in result["top_k"]],
                "logits": np.array(result["logits"], dtype=np.float32),
                "features": np.array(features.json()["results"][0]["embedding"], dtype=np.float32),
            }
    return out


@pytest.fixture(scope="module")
def box(run_container) -> Container:
    return run_container()


@pytest.fixture(scope="module")
def info(box: Container) -> dict:
    return httpx.get(f"{box.url}/info", timeout=30).json()


@pytest.fixture(scope="module")
def local(start_service, info, photos) -> dict[str, dict]:
    """The local service's answers (same model and backend as the container) for the photos."""
    service = start_service({"EFFNET_MODEL": info["model"], "EFFNET_BACKEND": info["backend"]})
    try:
        return answers(service.url, photos)
    finally:
        service.close()


def test_predict_and_features_match_the_local_service(box, info, local, photos, photo_classes):
    assert info["model"] == MODEL and info["device"] == "cpu"
    served = answers(box.url, photos)
    for name, expected in local.items():
        got = served[name]
        assert [i for i, _, _ in got["top_k"]] == [i for i, _, _ in expected["top_k"]], name
        assert np.allclose([s for *_, s in got["top_k"]], [s for *_, s in expected["top_k"]], atol=1e-4), name
        assert np.allclose(got["logits"], expected["logits"], atol=1e-3), name
        assert np.allclose(got["features"], expected["features"], atol=1e-3), name
        top3 = {label for _, label, _ in got["top_k"][:3]}
        assert got["top_k"][0][1] in photo_classes[name] or (name == "grace_hopper.jpg" and top3 & photo_classes[name])
    assert served["coffee.jpg"]["top_k"][0][1] == "espresso"


def test_v2_grpc_on_8001(box, local, photos):
    client = tgrpc.InferenceServerClient(box.grpc_url)
    try:
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL)
        names = list(photos)
        tensor = tgrpc.InferInput("image", [len(names)], "BYTES")
        tensor.set_data_from_numpy(np.array([photos[n] for n in names], dtype=object))
        result = client.infer(MODEL, [tensor])
        logits, features = result.as_numpy("logits"), result.as_numpy("features")
    finally:
        client.close()
    for row, name in enumerate(names):
        assert int(np.argmax(logits[row])) == local[name]["top_k"][0][0], name
        assert np.allclose(logits[row], local[name]["logits"], atol=1e-3), name
        assert np.allclose(features[row], local[name]["features"], atol=1e-3), name
    with grpc.insecure_channel(box.grpc_url) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert status.status == health_pb2.HealthCheckResponse.SERVING


def test_runs_as_non_root_without_capabilities(box, engine):
    assert engine.inspect(IMAGE)["Config"]["User"] == "10001:10001"
    assert box.exec("id", "-u", check=True).stdout.strip() == "10001"
    status = box.exec("cat", "/proc/1/status", check=True).stdout
    # PID 1 is the server itself (exec-form CMD), under uid 10001, with no capability at all.
    assert re.search(r"^Uid:\s+10001\s+10001\s+10001\s+10001$", status, re.M), status
    assert re.search(r"^CapEff:\s+0+$", status, re.M) and re.search(r"^CapBnd:\s+0+$", status, re.M), status
    assert re.search(r"^NoNewPrivs:\s+1$", status, re.M), status
    assert "efficientnet-serve" in box.exec("cat", "/proc/1/cmdline", check=True).stdout


def image_workers(engine: Engine) -> int:
    """EFFNET_WORKERS as the image sets it (the Dockerfile's ENV)."""
    env = dict(e.split("=", 1) for e in engine.inspect(IMAGE)["Config"]["Env"])
    return int(env["EFFNET_WORKERS"])


def test_processes_are_the_supervisor_the_engine_and_the_workers(box, engine):
    """PID 1 is the supervisor (the exec-form CMD), and its children are one effnet-engine, the image's
    EFFNET_WORKERS workers effnet-worker-0.. and multiprocessing's resource tracker, nothing else: no
    shell, no zombie. Every process runs as uid 10001 with no capability and no_new_privs."""
    workers = image_workers(engine)
    assert workers > 1, "the image runs one process: nothing to see here"
    processes = container_processes(engine, box.name)
    roles = server_processes(processes)
    assert "efficientnet-serve" in roles["supervisor"][0]["cmdline"], roles["supervisor"]
    assert len(roles["engine"]) == 1, processes
    assert [p["comm"] for p in roles["workers"]] == [f"effnet-worker-{n}" for n in range(workers)], processes
    assert len(roles["tracker"]) <= 1 and roles["other"] == [], processes
    for process in processes:
        assert process["state"] != "Z", process
        assert (process["uid"], process["no_new_privs"]) == ("10001", "1"), process
        assert int(process["cap_eff"], 16) == 0, process
    assert f"with {workers} workers and one engine process" in full_logs(engine, box)


def full_logs(engine: Engine, box: Container) -> str:
    """Everything the container wrote (``Container.logs`` keeps only the end)."""
    proc = engine.run("logs", box.name, check=False, timeout=60)
    return proc.stdout + proc.stderr


def test_root_filesystem_is_read_only(box, engine):
    assert engine.inspect(box.name, "container")["HostConfig"]["ReadonlyRootfs"] is True
    for path in ("/opt/venv/written", "/etc/written", "/written"):
        refused = box.exec("touch", path)
        assert refused.returncode != 0 and "Read-only file system" in refused.stderr, (path, refused.stderr)
    # /tmp (HOME and the caches) is the tmpfs the README's command mounts.
    assert box.exec("sh", "-c", "touch /tmp/written && rm /tmp/written").returncode == 0


def test_healthcheck_command(box, engine):
    image = engine.inspect(IMAGE)
    # docker keeps it in Config; podman beside it.
    check = image["Config"].get("Healthcheck") or image["Healthcheck"]
    test = check["Test"]
    assert test[0] == "CMD" and "/healthz" in test[-1], check
    # The command itself, as the engine runs it in the container: healthy now...
    assert box.exec(*test[1:]).returncode == 0
    # ...and unhealthy when nothing answers (the same command against a closed port).
    assert box.exec(*[a.replace(":8000/", ":8009/") for a in test[1:]]).returncode != 0
    if engine.name == "podman":
        # podman's own run of the image's HEALTHCHECK (docker has no such command; it runs it every 30 s).
        ran = engine.run("healthcheck", "run", box.name, check=False)
        assert ran.returncode == 0, ran.stdout + ran.stderr


def test_metrics(box):
    with httpx.Client(base_url=box.url, timeout=30) as client:
        client.get("/readyz")
        response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    requests = sum(s.value for s in families["effnet_requests"].samples if s.name == "effnet_requests_total")
    assert requests >= 6, "the predictions of the earlier tests are counted"
    (info_sample,) = families["effnet_model_info"].samples
    assert info_sample.labels["model"] == MODEL and info_sample.labels["device"] == "cpu"
    assert families["effnet_ready"].samples[0].value == 1


def test_nothing_of_the_build_is_left_in_the_image(engine: Engine):
    """No pip configuration, no wheel folder or package index, no sources or caches: only the venv."""
    pip = host_pip_settings()
    mounted = [p for p in (pip.mounts if pip else []) if not p.startswith("/etc/ssl/")]
    paths = ["/etc/pip.conf", "/etc/xdg/pip", "/root/.config/pip", "/root/.pip", "/root/.cache", "/src", *mounted]
    script = (
        'for p in "$@"; do [ -e "$p" ] && echo "present: $p"; done; '
        "find / -xdev \\( -name '*.whl' -o -name 'pip.conf' -o -name 'pip' -path '*/.cache/*' \\) -print | sort"
    )

    def look(image: str) -> list[str]:
        proc = engine.run("run", "--rm", "--user", "0", "--entrypoint", "sh", image, "-c", script, "sh", *paths)
        return proc.stdout.split()

    # What the base image ships (Debian's python3-venv keeps pip's own wheels in /usr/share) is no leftover.
    left = sorted(set(look(IMAGE)) - set(look(dockerfile_base())))
    assert left == [], left
    assert engine.run("run", "--rm", "--entrypoint", "ls", IMAGE, "-A", "/opt").stdout.split() == ["venv"]
    env = engine.inspect(IMAGE)["Config"]["Env"]
    assert not [e for e in env if e.startswith(("PIP_INDEX", "PIP_EXTRA", "PIP_FIND", "PIP_CERT", "TORCH_INDEX"))], env
    history = engine.run("history", "--no-trunc", IMAGE).stdout
    assert "pip.conf" not in history and not any(p in history for p in mounted), history


def test_image_size(engine, cpu_image):
    """Reported in the session summary; 1.46 GB when this was written (torch CPU is most of it)."""
    size = int(engine.inspect(cpu_image)["Size"])
    assert 0.5e9 < size < 2.0e9, f"{size / 1e9:.2f} GB"


def test_the_readme_runs_it_this_way():
    """The README's `docker run` has the flags these tests run the image with, and a stop timeout."""
    readme = (REPO / "README.md").read_text()
    commands = re.findall(r"docker run [^`]*?effnet-serve:0\.1\.0-cpu", readme.replace("\\\n", " "))
    assert commands, "no `docker run ... effnet-serve:0.1.0-cpu` in the README"
    for command in commands:
        words = command.split()
        assert all(flag in words for flag in README_RUN_FLAGS), command
        assert "--stop-timeout" in words, command


def test_plain_stop_is_sigterm_lame_duck_and_exit_0(box, engine, photos):
    """`<engine> stop` with its default 10 s grace: /readyz 503 at once while /predict is still answered
    (the lame duck, EFFNET_SHUTDOWN_DELAY_S of the image), then exit 0 before the grace runs out. With
    several workers, cleanly: the supervisor passes SIGTERM to every worker, each completes its drain, the
    engine process stops after them without being killed, and the supervisor warns of nothing."""
    env = dict(e.split("=", 1) for e in engine.inspect(IMAGE)["Config"]["Env"])
    delay = float(env["EFFNET_SHUTDOWN_DELAY_S"])
    assert delay < DEFAULT_STOP_GRACE_S - 2, "a plain stop must not SIGKILL the lame duck"
    result: dict[str, object] = {}

    def stop() -> None:
        started = time.monotonic()
        result["proc"] = engine.run("stop", box.name, check=False, timeout=120)
        result["seconds"] = time.monotonic() - started

    stopper = threading.Thread(target=stop)
    seen_ready: list[int] = []
    served_in_lame_duck = 0
    with httpx.Client(base_url=box.url, timeout=10) as client:
        stopper.start()
        deadline = time.monotonic() + delay + 5
        while stopper.is_alive() and time.monotonic() < deadline and served_in_lame_duck < 3:
            try:
                seen_ready.append(client.get("/readyz").status_code)
                if seen_ready[-1] == 503:
                    files = {"file": ("coffee.jpg", photos["coffee.jpg"], "image/jpeg")}
                    response = client.post("/predict", files=files)
                    assert response.status_code == 200, response.text
                    served_in_lame_duck += 1
            except httpx.TransportError:
                break
            time.sleep(0.2)
    stopper.join(timeout=120)
    state = engine.inspect(box.name, "container")["State"]
    assert 503 in seen_ready and served_in_lame_duck > 0, (seen_ready, served_in_lame_duck)
    assert state["ExitCode"] == 0, (state, box.logs())
    assert delay - 0.5 <= result["seconds"] < DEFAULT_STOP_GRACE_S, (result, box.logs())
    engine.timings["plain stop (SIGTERM -> exit 0)"] = result["seconds"]
    entries = []
    for line in full_logs(engine, box).splitlines():
        try:
            entries.append(json.loads(line))
        except ValueError:
            continue
    supervisor = [e for e in entries if e.get("logger") == "service.server.supervisor"]
    messages = [e["message"] for e in supervisor]
    assert any(m.startswith("received SIGTERM") for m in messages), messages
    assert messages[-1] == "stopped", messages
    assert [e for e in supervisor if e["level"] != "INFO"] == [], supervisor
    drained = sum(e.get("message") == "drain complete" for e in entries)
    assert drained == image_workers(engine), (drained, box.logs())
