"""The GPU check's own logic, on the CPU: the wheel list covers what the server imports, the load never
overfills the queue, nvidia-smi is asked in its documented form, every part has a hard budget that stops
it and still leaves a report, and the plan fits the device time. (``benchmarks/gpu_check.sh --rehearse``
runs the whole check in the device's package set; ``make test`` runs its quick form.)"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from benchmarks import gpu_check

ROOT = Path(__file__).resolve().parents[2]
# Imported only when installed (uvicorn's --reload watcher): the server runs without it.
OPTIONAL = {"watchfiles", "tqdm"}  # tqdm: torch.hub imports it when it happens to be installed
# Our own distribution (the repository itself travels to the device).
OWN = {"effnet-serve"}


def _shell_list(name: str) -> list[str]:
    text = (ROOT / "benchmarks" / "gpu_check.sh").read_text()
    match = re.search(rf"^{name}=\(([^)]*)\)", text, re.M)
    assert match, f"{name} not found in gpu_check.sh"
    return match.group(1).split()


def _closure(names: set[str]) -> set[str]:
    """``names`` and everything they require (Requires-Dist of the installed distributions, markers
    evaluated for the device's Python 3.12 on Linux, no extras). A distribution not installed here
    counts as itself."""
    env = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.3",
           "sys_platform": "linux", "platform_system": "Linux", "extra": ""}
    seen: set[str] = set()
    todo = [canonicalize_name(n) for n in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for line in requires:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate(env):
                todo.append(canonicalize_name(requirement.name))
    return seen


@pytest.mark.slow  # imports the whole server in a child process (6 s): make test runs it, test-fast does not
def test_the_wheel_list_covers_what_the_server_imports():
    """Every distribution the server's modules import at start (measured in a fresh interpreter) is
    either on the GPU image (DEVICE_PACKAGES and what they require) or in gpu_wheels.sh's list: a
    dependency added to the service without its wheel fails here, not in the first seconds of a lent GPU.
    (FastAPI's import of opentelemetry-api was such a miss.)"""
    # Each imported module's file is looked up among the installed distributions' files: a namespace
    # shared by several distributions (opentelemetry) counts only the parts really imported.
    # What each process of the server imports: the supervisor (main, processes), a front-end worker (app,
    # engine_client) and the engine process or the one process (engine_host, registry, loading: torch).
    probe = ("import sys, json, os, importlib.metadata as md\n"
             f"import {', '.join(gpu_check.SERVER_MODULES)}\n"
             "owner = {}\n"
             "for d in md.distributions():\n"
             "    for f in d.files or []:\n"
             "        if f.suffix in ('.py', '.so'):\n"
             "            owner[os.path.realpath(d.locate_file(f))] = d.metadata['Name']\n"
             "files = {os.path.realpath(m.__file__) for m in list(sys.modules.values())\n"
             "         if getattr(m, '__file__', None)}\n"
             "print(json.dumps(sorted({owner[f] for f in files if f in owner})))\n")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          check=True)
    imported = {canonicalize_name(d) for d in json.loads(done.stdout.splitlines()[-1])}
    assert {"fastapi", "uvicorn", "opentelemetry-api", "torch"} <= imported  # the probe saw the stack
    wheels = subprocess.run(["bash", "benchmarks/gpu_wheels.sh", "--list"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.split()
    on_device = _closure(set(_shell_list("DEVICE_PACKAGES")))
    missing = imported - on_device - {canonicalize_name(w) for w in wheels} - OPTIONAL - OWN
    assert missing == set(), f"add to benchmarks/gpu_wheels.sh (and pin in constraints.txt): {sorted(missing)}"


def test_every_wheel_is_pinned_in_the_constraints():
    pins = {canonicalize_name(line.split("==")[0]) for line in (ROOT / "constraints.txt").read_text().splitlines()
            if "==" in line and not line.startswith("#")}
    wheels = subprocess.run(["bash", "benchmarks/gpu_wheels.sh", "--list"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.split()
    assert wheels and {canonicalize_name(w) for w in wheels} <= pins


@pytest.mark.parametrize("quick,cpus", [(False, 16), (False, 4), (True, 2)])
def test_the_service_load_never_has_more_images_outstanding_than_the_queue(quick, cpus):
    """A closed loop keeps processes x connections x images-per-request outstanding; beyond the queue a
    request is a 503 at once, and the row would measure rejection. Each load shape is sized to the queue;
    8 images per request gets fewer connections rather than 2,048 images against 1,024."""
    servers, e2e = gpu_check.service_plan(quick, cpus)
    shapes = [per_request for _, _, loads in servers for _, per_request in loads]
    for per_request in shapes:
        connections = gpu_check.connections_for(e2e["max_queue"], e2e["processes"], e2e["connections"], per_request)
        assert 1 <= connections <= e2e["connections"]
        assert e2e["processes"] * connections * per_request <= e2e["max_queue"]
    if not quick:
        assert 8 in shapes and e2e["max_queue"] >= 4 * e2e["max_batch"]
        assert gpu_check.connections_for(1024, 4, 64, 8) == 32
        assert gpu_check.connections_for(1024, 4, 64, 1) == 64


@pytest.mark.parametrize("quick,cpus", [(False, 16), (False, 4), (True, 2)])
def test_the_service_part_measures_one_process_and_several_workers(quick, cpus):
    """Lite0 is served as one process (EFFNET_WORKERS=1) and with several front-end workers, on the same
    load shapes, so the report compares the two; the workers leave a CPU for the engine process (8 on the
    H200 host's 16). The rehearsal starts a several-worker server too, in the device's package set."""
    servers, _ = gpu_check.service_plan(quick, cpus)
    lite0 = {workers: loads for model, workers, loads in servers if model == gpu_check.LITE0}
    assert 1 in lite0 and len(lite0) == 2, servers
    several = max(lite0)
    assert 2 <= several and several + 1 <= max(cpus, 3)
    assert set(lite0[several]) <= set(lite0[1]) and (False, 1) in lite0[several]
    if not quick:
        assert several == gpu_check.several_workers(cpus) and (False, 8) in lite0[several]
    assert gpu_check.several_workers(16) == 8


def test_the_server_is_measured_over_all_its_processes():
    """CPU time and resident memory of the supervisor's children count (the engine and the workers): a
    parent that only waits while its child spins is measured by the child's CPU."""
    spin = "import time\nend = time.time() + 30\nwhile time.time() < end: pass\n"
    parent = subprocess.Popen([sys.executable, "-c",
                               f"import subprocess, sys; subprocess.run([sys.executable, '-c', {spin!r}])"])
    try:
        deadline = time.monotonic() + 20
        while len(gpu_check.server_processes(parent.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        processes = gpu_check.server_processes(parent.pid)
        assert len(processes) == 2 and processes[parent.pid] == "server", processes
        started = gpu_check._cpu_seconds(parent.pid)
        time.sleep(1.0)
        assert gpu_check._cpu_seconds(parent.pid) - started > 0.1  # the child's spinning
        memory = gpu_check.server_rss_mib(parent.pid)
        assert memory["rss_total_mib"] > memory["rss_engine_mib"] > 0 and memory["rss_worker_mib"] is None
    finally:
        for child in gpu_check.server_processes(parent.pid):
            if child != parent.pid:
                os.kill(child, signal.SIGKILL)
        parent.kill()
        parent.wait()


def _fake_nvidia_smi(tmp_path: Path, body: str) -> str:
    script = tmp_path / "nvidia-smi"
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(0o755)
    return str(script)


def test_gpu_sampler_uses_the_documented_loop_option(tmp_path):
    """``-lms 200`` as two arguments (nvidia-smi refuses ``-lms=200``); the fake stands for nvidia-smi,
    answering only the documented form."""
    fake = _fake_nvidia_smi(tmp_path, """
case "$*" in
  *"--query-gpu=utilization.gpu --format=csv,noheader,nounits -lms 200") ;;
  *) echo "Invalid combination of input arguments: $*" >&2; exit 2 ;;
esac
for v in 10 20 30 40 50 60; do echo "$v"; sleep 0.02; done
""")
    sampler = gpu_check.GpuSampler(200, command=fake)
    time.sleep(0.5)
    result = sampler.stop()
    assert result["gpu_util_samples"] == 4 and result["gpu_util_mean"] == 45.0  # first two dropped
    assert result["gpu_util_error"] is None


def test_gpu_sampler_reports_why_it_has_no_figure(tmp_path):
    fake = _fake_nvidia_smi(tmp_path, 'echo "NVIDIA-SMI has failed" >&2; exit 9\n')
    sampler = gpu_check.GpuSampler(200, command=fake)
    sampler.proc.wait(30)  # it fails at once; stopping it before it has would report the stop instead
    result = sampler.stop()
    assert result["gpu_util_mean"] is None
    assert "exit status 9" in result["gpu_util_error"] and "NVIDIA-SMI has failed" in result["gpu_util_error"]
    missing = gpu_check.GpuSampler(200, command=str(tmp_path / "absent")).stop()
    assert missing["gpu_util_mean"] is None and missing["gpu_util_error"]


def test_a_part_past_its_budget_is_stopped_and_the_report_still_written():
    report: dict = {"parts": [], "errors": [], "model": []}
    writes: list[int] = []

    def slow(budget):
        report["model"].append({"batch": 1})  # a figure taken before the budget ran out stays
        time.sleep(5)
        report["model"].append({"batch": 2})

    started = time.monotonic()
    gpu_check.run_part("model", 0.3, slow, report, lambda: writes.append(len(report["parts"])))
    assert time.monotonic() - started < 2
    assert report["parts"][0]["status"].startswith("overran its 0 s budget")
    assert report["model"] == [{"batch": 1}] and writes == [1]
    assert report["errors"] and report["errors"][0].startswith("model: overran")

    def fails(budget):
        raise ValueError("broken part")

    gpu_check.run_part("check", 5, fails, report, lambda: writes.append(len(report["parts"])))
    assert report["parts"][1]["status"] == "error: ValueError: broken part" and writes == [1, 2]
    gpu_check.run_part("decode", 5, lambda budget: None, report, lambda: None)
    assert report["parts"][2]["status"] == "done"


def test_the_plan_puts_the_service_first_and_fits_six_minutes():
    """The end-to-end service rows are the main result: they run first. The hard budgets add up, with
    gpu_check.sh's own steps, to at most 6 minutes (the lease is 15, leaving room to run it again)."""
    plan = gpu_check.PLAN["gpu"]
    assert [name for name, _ in plan][:2] == ["service", "model"]
    assert {name for name, _ in plan} == {name for name, _ in gpu_check.PLAN["rehearsal"]}
    assert set(gpu_check.PART_MEANINGS) == {name for name, _ in plan}
    hard_limit = int(re.search(r"^HARD_LIMIT_S=(\d+)", (ROOT / "benchmarks" / "gpu_check.sh").read_text(),
                               re.M).group(1))
    assert sum(seconds for _, seconds in plan) + 20 <= hard_limit <= 360


def test_a_partial_report_renders():
    report = {"device_name": "cpu", "torch": "2.13.0", "cuda": None, "cpus": 2, "python": "3.12.3",
              "parts": [{"part": "service", "budget_s": 120, "took_s": 120.2, "status": "overran its 120 s budget"},
                        {"part": "compile", "budget_s": 30, "took_s": 0, "status": "skipped: no CUDA"}],
              "errors": ["service: overran its 120 s budget"],
              "service": [{"model": "efficientnet-b0", "error": "skipped (part budget)"},
                          {"model": "efficientnet-lite0", "workers": 8, "error": "skipped (part budget)"}]}
    text = gpu_check.markdown(report)
    assert "run still going (or stopped)" in text
    assert "| compile | torch.compile reduce-overhead | 30 | 0 | skipped: no CUDA |" in text
    assert "skipped (part budget)" in text and "## Errors" in text
    table = [line for line in text.splitlines() if line.startswith("| efficientnet-")]
    header = next(line for line in text.splitlines() if line.startswith("| model | workers |"))
    assert [line.split(" | ")[1] for line in table] == ["1", "8"]
    assert {line.count("|") for line in table} == {header.count("|")}
