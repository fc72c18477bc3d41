"""Waiting for a condition in tests: poll it until it holds, fail with a message when it does not in time."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from typing import Any


def _failure(within: float, message: Callable[[], Any] | None) -> AssertionError:
    return AssertionError(f"condition not met within {within} s" + (f": {message()}" if message else ""))


async def wait_until(
    condition: Callable[[], Any],
    within: float = 5.0,
    *,
    message: Callable[[], Any] | None = None,
    interval: float = 0.01,
) -> float:
    """Seconds until ``condition()`` (a plain or async callable) first held; fails after ``within``
    seconds, with ``message()`` (e.g. a gateway's log) in the failure."""
    started = time.monotonic()
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return time.monotonic() - started
        if time.monotonic() - started > within:
            raise _failure(within, message)
        await asyncio.sleep(interval)


def wait_until_blocking(
    condition: Callable[[], Any],
    within: float = 5.0,
    *,
    message: Callable[[], Any] | None = None,
    interval: float = 0.02,
) -> float:
    """``wait_until`` for synchronous test code: blocks the thread between polls."""
    started = time.monotonic()
    while True:
        if condition():
            return time.monotonic() - started
        if time.monotonic() - started > within:
            raise _failure(within, message)
        time.sleep(interval)
