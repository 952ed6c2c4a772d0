"""Shared fixtures: test photos, and real service processes (uvicorn on loopback) to test over HTTP."""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"

# Real photos and the classes Lite0 must find for them (top-1 set, and what must be in the top 3).
PHOTOS = {
    "coffee.jpg": {"espresso"},
    "chelsea.jpg": {"tiger cat", "Egyptian cat", "tabby"},
    "grace_hopper.jpg": {"military uniform"},
}


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA


@pytest.fixture(scope="session")
def photo_classes() -> dict[str, set[str]]:
    """What Lite0 must answer for each photo: top-1 among these (grace_hopper: one of them in the top 3)."""
    return PHOTOS


@pytest.fixture(scope="session")
def photos() -> dict[str, bytes]:
    """The real test photos by file name."""
    return {name: (DATA / name).read_bytes() for name in PHOTOS}


def app_with_engine(engine, *, labels: list[str] | None = None, **settings):
    """The service app, in-process, around a stand-in ``engine`` (no weights): Lite0's config and labels."""
    from model import get_efficientnet_config, imagenet_classes
    from service.app import create_app
    from service.engine import LoadedModel
    from service.settings import Settings

    model = LoadedModel(
        engine=engine,
        variant=get_efficientnet_config("efficientnet-lite0"),
        labels=labels if labels is not None else list(imagenet_classes()),
        num_features=1280,
        num_parameters=1,
        weights_source="random",
        weights_file=None,
        weights_sha256=None,
    )
    return create_app(Settings(**settings), model=model)


def png_declaring(width: int, height: int, rows: int = 1) -> bytes:
    """A valid-looking RGB PNG header declaring ``width`` x ``height``, followed by a zlib stream of only
    ``rows`` rows of pixels: a few KB that would inflate to width*height*3 bytes if decoded."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * ((3 * width + 1) * rows), 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc/<pid>/status (VmRSS, in kB)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServiceProcess:
    """``python -m service`` in a subprocess on a free loopback port, with EFFNET_* settings from ``env``.

    ``readiness_seen`` records every /readyz status observed while waiting for the server to get ready.
    """

    def __init__(self, env: dict[str, str] | None = None, *, args: list[str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.readiness_seen: list[int] = []
        self._log = tempfile.NamedTemporaryFile(prefix="effnet-serve-", suffix=".log", delete=False)
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("EFFNET_")}
        full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), full_env.get("PYTHONPATH")]))
        full_env.setdefault("EFFNET_NUM_THREADS", "2")
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(self.port), *(args or [])],
            cwd=REPO,
            env=full_env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def logs(self) -> str:
        return Path(self._log.name).read_text(errors="replace")

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Poll /readyz every 10 ms from the moment the port opens until it answers 200."""
        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=self.url, timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.logs()}")
                try:
                    status = client.get("/readyz").status_code
                except httpx.TransportError:
                    time.sleep(0.01)
                    continue
                self.readiness_seen.append(status)
                if status == 200:
                    return
                time.sleep(0.01)
        raise TimeoutError(f"server not ready after {timeout} s:\n{self.logs()}")

    def wait_exit(self, timeout: float = 60.0) -> int:
        return self.proc.wait(timeout=timeout)

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM, then wait for the exit code (SIGKILL if it does not come)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise
        return self.proc.returncode

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.terminate()
        finally:
            if not self._log.closed:
                self._log.close()
                os.unlink(self._log.name)


@pytest.fixture(scope="session")
def start_service() -> Iterator:
    """Factory: ``start_service({"EFFNET_...": ...}, wait=True)`` -> a ready ``ServiceProcess``.

    Every process started is stopped (SIGTERM) at the end of the session at the latest.
    """
    started: list[ServiceProcess] = []

    def start(
        env: dict[str, str] | None = None, *, wait: bool = True, args: list[str] | None = None
    ) -> ServiceProcess:
        service = ServiceProcess(env, args=args)
        started.append(service)
        if wait:
            service.wait_ready()
        return service

    yield start
    for service in started:
        try:
            service.close()
        except Exception:  # noqa: BLE001 - best effort clean-up
            pass


@pytest.fixture(scope="module")
def lite0_service(start_service) -> Iterator[ServiceProcess]:
    """A Lite0 service with the real packaged weights and default settings, shared by one test module."""
    service = start_service({"EFFNET_MODEL": "efficientnet-lite0"})
    yield service
    service.close()
