"""Wait for a condition with a deadline, never sleep-and-hope."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(
    condition: Callable[[], T],
    timeout: float = 5.0,
    interval: float = 0.005,
    message: str = "condition",
) -> T:
    """Call ``condition`` until it returns something truthy, and return that.

    Args:
        condition: polled at most every ``interval`` seconds.
        timeout: seconds before giving up.
        interval: seconds between polls.
        message: what was awaited, for the error.

    Raises:
        TimeoutError: still falsy after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"{message} not met within {timeout}s (last value {value!r})")
        time.sleep(min(interval, remaining))
