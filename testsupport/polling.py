"""Waiting for a condition: the one polling loop of tests, benchmarks and the demo.

A test that waits polls a predicate until it holds or a deadline passes; it never sleeps
a fixed time and hopes. The async form keeps the event loop running meanwhile (the daemon
under test may run on it) and accepts predicates that return an awaitable.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from typing import Any

Description = str | Callable[[], str]
"""What is awaited, for the failure message; a callable is asked at the deadline."""


def _timed_out(what: Description, timeout: float) -> AssertionError:
    text = what() if callable(what) else what
    return AssertionError(f"timed out after {timeout}s waiting for {text}")


async def wait_for(predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05,
                   what: Description = "condition") -> Any:
    """The predicate's first truthy value; raises AssertionError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() >= deadline:
            raise _timed_out(what, timeout)
        await asyncio.sleep(interval)


def wait_for_sync(predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05,
                  what: Description = "condition") -> Any:
    """``wait_for`` for code without an event loop (it blocks the calling thread)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise _timed_out(what, timeout)
        time.sleep(interval)
