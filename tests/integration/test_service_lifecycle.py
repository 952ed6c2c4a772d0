"""Start-up and shutdown of the real server process: bad starts exit non-zero with one clear line;
SIGTERM puts the server in lame duck (readiness 503, requests still served with ``Connection: close``),
then drains admitted work and exits 0 within delay + drain + 1 s."""

from __future__ import annotations

import asyncio
import pathlib
import signal
import time

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from model import default_weights_path
from service.server.draining import GRACEFUL_TAIL_S


def queue_depth(url: str) -> float:
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        if family.name == "effnet_queue_depth":
            return family.samples[0].value
    raise KeyError("effnet_queue_depth")


def test_sigterm_drains_queued_requests_then_exits_zero(start_service, photos):
    # A slow engine (B4, random weights, torch, ~150 ms an image on 2 cores) and batches of 1: one request
    # runs while the others wait in the queue when SIGTERM comes.
    service = start_service(
        {
            "EFFNET_MODEL": "efficientnet-b4",
            "EFFNET_WEIGHTS": "random",
            "EFFNET_BACKEND": "torch",
            "EFFNET_MAX_BATCH_SIZE": "1",
            "EFFNET_MAX_BATCH_DELAY_MS": "0",
            "EFFNET_SHUTDOWN_DELAY_S": "0",  # the drain itself: no lame duck
            "EFFNET_SHUTDOWN_DRAIN_S": "20",
        }
    )
    names = ["coffee.jpg", "chelsea.jpg", "coffee.jpg", "grace_hopper.jpg", "coffee.jpg"]

    async def scenario():
        async with httpx.AsyncClient(base_url=service.url, timeout=30.0) as client:
            pending = [
                asyncio.ensure_future(client.post("/predict", files={"file": (n, photos[n])})) for n in names
            ]
            deadline = time.monotonic() + 5
            while queue_depth(service.url) < 3:
                assert time.monotonic() < deadline, "requests never reached the queue"
                await asyncio.sleep(0.01)
            service.proc.send_signal(15)
            signalled = time.monotonic()
            readiness = None
            while time.monotonic() - signalled < 1.5:
                readiness = (await client.get("/readyz")).status_code
                if readiness == 503:
                    break
                await asyncio.sleep(0.01)
            refused = await client.post("/predict", files={"file": ("late.jpg", photos["coffee.jpg"])})
            answered = await asyncio.gather(*pending)
            return readiness, refused, answered, signalled

    readiness, refused, answered, signalled = asyncio.run(scenario())
    assert readiness == 503
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
    assert "retry-after" in refused.headers
    assert [r.status_code for r in answered] == [200] * len(names)
    assert [r.json()["results"][0]["filename"] for r in answered] == names
    assert service.wait_exit(timeout=30) == 0
    assert time.monotonic() - signalled < 15
    assert "drain complete" in service.logs()


def test_sigterm_lame_duck_serves_with_connection_close_then_refuses_and_exits_in_time(start_service, photos):
    """No load balancer in front: SIGTERM turns readiness 503 at once, requests are still answered 200 (with
    ``Connection: close``) during EFFNET_SHUTDOWN_DELAY_S, refused 503 ``shutting_down`` after it, and the
    process exits 0 no earlier than the delay and within delay + drain + 1 s."""
    delay, drain = 2.0, 3.0
    service = start_service(
        {"EFFNET_SHUTDOWN_DELAY_S": str(delay), "EFFNET_SHUTDOWN_DRAIN_S": str(drain), "EFFNET_NUM_THREADS": "1"}
    )
    photo = {"file": ("coffee.jpg", photos["coffee.jpg"])}
    with httpx.Client(base_url=service.url, timeout=10) as client:
        before = client.post("/predict", files=photo)
        assert before.status_code == 200 and "connection" not in before.headers
        service.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        readiness = []
        while time.monotonic() - signalled < 1.0:
            readiness.append(client.get("/readyz"))
            if readiness[-1].status_code == 503:
                break
            time.sleep(0.01)
        not_ready_after = time.monotonic() - signalled
        during = [client.post("/predict", files=photo) for _ in range(3)]
        alive = client.get("/healthz").status_code
        answered_in_delay = time.monotonic() - signalled
        time.sleep(max(0.0, delay + 0.3 - (time.monotonic() - signalled)))
        try:
            after: int | str = client.post("/predict", files=photo).status_code
        except httpx.TransportError:
            after = "connection refused"  # the drain was already over: refused as well
    exit_code = service.wait_exit(timeout=delay + drain + 10)
    exited_after = time.monotonic() - signalled
    logs = service.logs()
    assert readiness[-1].status_code == 503 and readiness[-1].json()["error"]["code"] == "shutting_down"
    assert not_ready_after < 0.5, not_ready_after
    assert answered_in_delay < delay, "the requests meant for the lame duck came too late"
    assert [r.status_code for r in during] == [200] * 3
    assert all(r.headers.get("connection") == "close" for r in during), [r.headers for r in during]
    assert [r.json()["results"][0]["top_k"][0]["label"] for r in during] == ["espresso"] * 3
    assert alive == 200
    assert after in (503, "connection refused"), after
    assert exit_code == 0, logs[-2000:]
    assert delay <= exited_after <= delay + drain + 1, exited_after
    assert "lame duck for 2.0 s" in logs and "drain complete" in logs and '"level": "ERROR"' not in logs


@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT])
def test_a_second_signal_cuts_the_lame_duck_short(start_service, second):
    """A second SIGTERM or SIGINT during the lame duck skips the rest of it: with a 60 s delay the process
    still exits 0 about a second after the second signal."""
    service = start_service({"EFFNET_SHUTDOWN_DELAY_S": "60", "EFFNET_NUM_THREADS": "1"})
    service.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 5
    while httpx.get(f"{service.url}/readyz").status_code != 503:
        assert time.monotonic() < deadline, "readiness never turned 503"
        time.sleep(0.01)
    service.proc.send_signal(second)
    signalled = time.monotonic()
    assert service.wait_exit(timeout=20) == 0, service.logs()[-2000:]
    assert time.monotonic() - signalled < 1 + GRACEFUL_TAIL_S + 1
    assert "lame duck cut short" in service.logs()


def test_exit_stays_within_delay_plus_drain_when_work_outlasts_the_drain(start_service, photos):
    """Admitted work that would take longer than EFFNET_SHUTDOWN_DRAIN_S does not hold the process: it
    exits within delay + drain + 1 s of SIGTERM (the drain is logged as timed out), with exit code 0."""
    delay, drain = 0.5, 0.5
    service = start_service(
        {
            "EFFNET_MODEL": "efficientnet-b0",
            "EFFNET_WEIGHTS": "random",
            "EFFNET_BACKEND": "torch",
            "EFFNET_WARMUP": "false",
            "EFFNET_NUM_THREADS": "1",
            "EFFNET_MAX_BATCH_SIZE": "1",
            "EFFNET_MAX_QUEUE": "128",
            "EFFNET_SHUTDOWN_DELAY_S": str(delay),
            "EFFNET_SHUTDOWN_DRAIN_S": str(drain),
        }
    )

    async def scenario() -> float:
        limits = httpx.Limits(max_connections=130)
        async with httpx.AsyncClient(base_url=service.url, timeout=30.0, limits=limits) as client:
            pending = [
                asyncio.ensure_future(client.post("/predict", files={"file": ("c.jpg", photos["coffee.jpg"])}))
                for _ in range(120)
            ]
            deadline = time.monotonic() + 30
            # 100 queued images are seconds of work even on a fast CPU, far more than delay + drain.
            while queue_depth(service.url) < 100:
                assert time.monotonic() < deadline, "requests never filled the queue"
                await asyncio.sleep(0.02)
            service.proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            answers = await asyncio.gather(*pending, return_exceptions=True)
            return signalled, answers

    signalled, answers = asyncio.run(scenario())
    exit_code = service.wait_exit(timeout=30)
    exited_after = time.monotonic() - signalled
    logs = service.logs()
    assert exit_code == 0, logs[-2000:]
    assert "drain timed out" in logs, "the work did not outlast the drain: the test proves nothing"
    # The process left admitted work unanswered rather than finishing it: that is what the bound is for.
    unanswered = [a for a in answers if isinstance(a, Exception) or a.status_code != 200]
    assert unanswered, "every request was answered: the process waited for all the work"
    # The promise is delay + drain + 1 s. The extra 2 s are for the test itself on a loaded 2-core machine
    # (its own event loop and the exit poll share the cores with the server; 2.18 s was seen for a 2.0 s
    # bound in a fresh clone's make test): still far below the seconds the queued images would take.
    assert exited_after <= delay + drain + 1 + 2, exited_after


def _weights_that_run_code(tmp_path: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (pathlib.Path.touch, (marker,))

    path = tmp_path / "evil.pth"
    torch.save({"_fc.weight": Payload()}, path)
    return path, marker


def _bad_starts(tmp_path: pathlib.Path) -> dict[str, tuple[dict[str, str], int, str]]:
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint" * 10)
    evil, _ = _weights_that_run_code(tmp_path)
    cases = {
        "unknown model": ({"EFFNET_MODEL": "efficientnet-b99"}, 1, "unknown EFFNET_MODEL"),
        "no default weights": ({"EFFNET_MODEL": "efficientnet-b0"}, 1, "no weights for efficientnet-b0"),
        "missing weights file": (
            {"EFFNET_WEIGHTS": str(tmp_path / "absent.pth")},
            1,
            "weights file not found",
        ),
        "corrupt weights": ({"EFFNET_WEIGHTS": str(garbage)}, 1, "bad weights"),
        "pickled code": ({"EFFNET_WEIGHTS": str(evil)}, 1, "bad weights"),
        "weights of another variant": (
            {
                "EFFNET_MODEL": "efficientnet-lite1",
                "EFFNET_WEIGHTS": str(default_weights_path("efficientnet-lite0")),
            },
            1,
            "bad weights for efficientnet-lite1",
        ),
        "cuda absent": ({"EFFNET_DEVICE": "cuda"}, 1, "CUDA is not available"),
        "backend without the dtype": (
            {"EFFNET_BACKEND": "onnxruntime", "EFFNET_DTYPE": "float16"},
            1,
            "serves float32 only",
        ),
        "invalid setting": (
            {"EFFNET_MAX_BATCH_SIZE": "8", "EFFNET_MAX_QUEUE": "4"},
            2,
            "invalid configuration",
        ),
        # Valid data, but on a CPU the default queue (64) cannot hold a batch of 256: decided at resolution.
        "batch over the CPU queue": (
            {"EFFNET_DEVICE": "cpu", "EFFNET_MAX_BATCH_SIZE": "256"},
            2,
            "max_queue (64) must be >= max_batch_size (256)",
        ),
        # A misspelt variable is named before anything else can go wrong (here the model is unknown too).
        "misspelt setting": (
            {"EFFNET_MODLE": "efficientnet-b0", "EFFNET_MODEL": "efficientnet-b99"},
            1,
            "unknown EFFNET_MODEL",
        ),
    }
    return cases


BAD_STARTS = [
    "unknown model",
    "no default weights",
    "missing weights file",
    "corrupt weights",
    "pickled code",
    "weights of another variant",
    "cuda absent",
    "backend without the dtype",
    "invalid setting",
    "batch over the CPU queue",
    "misspelt setting",
]


@pytest.fixture(scope="module")
def bad_starts(tmp_path_factory, start_service):
    """Every bad start launched at once (each is a cold Python + torch start; together they are faster)."""
    tmp_path = tmp_path_factory.mktemp("bad-starts")
    cases = _bad_starts(tmp_path)
    processes = {name: start_service(env, wait=False) for name, (env, _, _) in cases.items()}
    for process in processes.values():
        process.wait_exit(timeout=180)
    return {name: (processes[name], *cases[name][1:]) for name in cases}, tmp_path


@pytest.mark.parametrize("case", BAD_STARTS)
def test_bad_start_exits_non_zero_with_one_clear_line(bad_starts, case):
    if case == "cuda absent" and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    processes, tmp_path = bad_starts
    service, code, text = processes[case]
    logs = service.logs()
    assert service.proc.returncode == code, logs
    errors = [line for line in logs.splitlines() if '"level": "ERROR"' in line]
    assert len(errors) == 1, logs
    assert text in errors[0], errors[0]
    assert "Traceback" not in logs
    if case == "misspelt setting":
        warnings = [line for line in logs.splitlines() if '"level": "WARNING"' in line]
        assert any("EFFNET_MODLE is set but no setting reads it" in line for line in warnings), logs
    if case == "pickled code":
        assert not (tmp_path / "code-ran").exists(), "the checkpoint ran code"


def test_random_weights_only_when_asked_and_info_says_so(start_service):
    service = start_service(
        {"EFFNET_MODEL": "efficientnet-b0", "EFFNET_WEIGHTS": "random", "EFFNET_WARMUP": "false"}
    )
    info = httpx.get(f"{service.url}/info").json()
    assert info["model"] == "efficientnet-b0"
    assert info["weights_source"] == "random" and info["weights_file"] is None
    assert "RANDOM weights" in service.logs()
    assert service.terminate() == 0
