"""Coalesce repeated requests for the same work into as few runs as stay correct.

MinIO sends a notification per object and often several per upload (the image, its
sidecar, retries), and operators re-upload. Each request for an image would otherwise
cost a HEAD and a sidecar GET. Running them one after another per image, with every
request that arrives during a run sharing a single follow-up run, keeps the answer right
(an upload that raced the current run is seen by the follow-up) at the cost of at most
two runs per burst.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")


class Coalescer:
    """At most one run per key at a time, and at most one more waiting behind it."""

    def __init__(self) -> None:
        self._running: dict[str, asyncio.Task[Any]] = {}
        self._waiting: dict[str, asyncio.Task[Any]] = {}

    async def run(self, key: str, start: Callable[[], Awaitable[T]]) -> T:
        """Run ``start()`` for ``key``, or join the run that has not started yet.

        Every joined caller gets that run's result or exception. Cancelling one caller
        does not cancel the run the others share; ``close`` does.
        """
        task = self._waiting.get(key)
        if task is None:
            task = asyncio.create_task(self._after_current(key, start), name=f"coalesced-{key}")
            task.add_done_callback(_retrieve)
            self._waiting[key] = task
        result: T = await asyncio.shield(task)
        return result

    @property
    def active(self) -> int:
        """Runs going on or waiting to start."""
        return len(self._running) + len(self._waiting)

    async def drain(self, timeout: float) -> list[str]:
        """Let runs going on or waiting end for up to ``timeout`` seconds, then cancel the
        rest; returns the keys that had to be cancelled."""
        tasks = {**{t: k for k, t in self._waiting.items()},
                 **{t: k for k, t in self._running.items()}}
        if not tasks:
            return []
        _done, unfinished = await asyncio.wait(tasks, timeout=max(timeout, 0.0))
        for task in unfinished:
            task.cancel()
        await asyncio.gather(*unfinished, return_exceptions=True)
        return sorted({tasks[t] for t in unfinished})

    async def close(self) -> None:
        """Cancel every run, going or waiting, and wait for them to end."""
        tasks = [*self._running.values(), *self._waiting.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _after_current(self, key: str, start: Callable[[], Awaitable[T]]) -> T:
        me = asyncio.current_task()
        assert me is not None
        try:
            current = self._running.get(key)
            if current is not None:
                await asyncio.wait([current])  # its outcome belongs to its own callers
            # From here on, new callers queue behind this run instead of joining it.
            if self._waiting.get(key) is me:
                del self._waiting[key]
            self._running[key] = me
            return await start()
        finally:
            if self._waiting.get(key) is me:
                del self._waiting[key]
            if self._running.get(key) is me:
                del self._running[key]


def _retrieve(task: asyncio.Task[Any]) -> None:
    """Mark the outcome as seen: every caller may have gone (cancelled) before it ended."""
    if not task.cancelled():
        task.exception()
