"""Tests that need a real component (Prometheus, HAProxy, Chromium): skipped on a developer machine
without it, failed in CI (``CI=true``), where `.ci/run` installs it."""

from __future__ import annotations

import os

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing_component(reason: str) -> None:
    """Skip the calling test (or module, at import time) because ``reason``; under CI, fail instead."""
    if IN_CI:
        pytest.fail(f"{reason}; CI must run this test (.ci/run installs it)", pytrace=False)
    pytest.skip(reason, allow_module_level=True)
