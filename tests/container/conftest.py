"""Fixtures of the container tests: one engine, one image build per session, containers run the README's
way. The session summary says which engine ran, what stood in for what, the build time and image size."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest

from tests.container.engine import IMAGE, README_RUN_FLAGS, Container, Engine, build_cpu_image, find_engine
from tests.helpers.server import free_port

_ENGINES: list[Engine] = []


@pytest.fixture(scope="session")
def engine() -> Engine:
    found = find_engine()
    _ENGINES.append(found)
    return found


@pytest.fixture(scope="session")
def cpu_image(engine: Engine) -> str:
    """The Dockerfile's CPU target, built once per session (the layer cache makes a rebuild cheap)."""
    build_cpu_image(engine, IMAGE)
    size = int(engine.inspect(IMAGE)["Size"])
    engine.timings["image size (bytes)"] = size
    engine.note(f"image {IMAGE}: {size / 1e9:.2f} GB")
    return IMAGE


@pytest.fixture(scope="session")
def run_container(engine: Engine, cpu_image: str) -> Iterator[Callable[..., Container]]:
    """Factory: ``run_container(env={...})`` -> a detached, ready container of the image, run with the
    README's flags. Every container is removed at the end of the session at the latest."""
    started: list[Container] = []

    def run(env: dict[str, str] | None = None, *, wait: bool = True) -> Container:
        name = f"effnet-test-{os.getpid()}-{len(started)}"
        box = Container(engine, name, free_port(), free_port())
        started.append(box)
        env_flags = [f for k, v in (env or {}).items() for f in ("-e", f"{k}={v}")]
        engine.run(
            "run", "-d", "--name", name, *README_RUN_FLAGS,
            "-p", f"127.0.0.1:{box.http_port}:8000", "-p", f"127.0.0.1:{box.grpc_port}:8001",
            *env_flags, cpu_image,
        )  # fmt: skip
        if wait:
            ready_s = box.wait_ready()
            engine.timings.setdefault("first container ready", ready_s)
        return box

    yield run
    for box in started:
        box.remove()


def pytest_terminal_summary(terminalreporter) -> None:
    for engine in _ENGINES:
        terminalreporter.section(f"container tests ({engine.name})")
        for note in engine.notes:
            terminalreporter.write_line(note)
        for what, value in engine.timings.items():
            shown = f"{value:.1f} s" if isinstance(value, float) else str(value)
            terminalreporter.write_line(f"{what}: {shown}")
