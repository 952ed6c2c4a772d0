"""Polling until something is true: the one wait every test and benchmark helper uses."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def wait_until(condition: Callable[[], Any], what: str, timeout: float = 10.0, every: float = 0.01) -> Any:
    """Poll ``condition`` every ``every`` seconds until it answers something truthy, and return that;
    ``AssertionError`` naming ``what`` (and the last answer) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        answer = condition()
        if answer:
            return answer
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out waiting for {what}; last answer: {answer!r}")
        time.sleep(every)
