"""Fixtures shared by every test folder, and the markers each folder's tests carry.

``tests/unit``: in-process, no server processes (``make test-fast`` runs these). ``tests/integration``:
real service processes (uvicorn on loopback). ``tests/deploy``: deployment files, validators and a real
Prometheus server. The helpers themselves live in the ``tests.helpers`` package.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.images import DATA, load_photos
from tests.helpers.server import ServiceProcess

# Real photos and the classes Lite0 must find for them (top-1 set, and what must be in the top 3).
PHOTOS = {
    "coffee.jpg": {"espresso"},
    "chelsea.jpg": {"tiger cat", "Egyptian cat", "tabby"},
    "grace_hopper.jpg": {"military uniform"},
}

_FOLDER_MARKERS = {"unit": "unit", "integration": "integration", "deploy": "deploy"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        folder = Path(str(item.fspath)).parent.name
        marker = _FOLDER_MARKERS.get(folder)
        if marker is not None:
            item.add_marker(marker)


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
    return load_photos(PHOTOS)


@pytest.fixture(scope="session")
def jpeg() -> bytes:
    """A small valid JPEG (one colour), for tests about everything but the pixels."""
    from tests.helpers.images import solid_jpeg

    return solid_jpeg()


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
