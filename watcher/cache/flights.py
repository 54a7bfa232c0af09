"""Single-flight: concurrent callers asking for the same key share one running task.

Why it exists: two notifications for the same bytes (an image under two keys, or one
redelivered) must cost one download, and one caller giving up must not cancel it for
the others. When the last caller still waiting gives up (an API job is cancelled), the
work is cancelled too: nobody wants its result any more.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")


class SingleFlight:
    def __init__(self) -> None:
        self.running: dict[str, asyncio.Task[Any]] = {}
        self._waiting: Counter[str] = Counter()

    async def run(self, key: str, work: Callable[[], Awaitable[T]]) -> T:
        task = self.running.get(key)
        if task is None:
            task = asyncio.ensure_future(work())
            self.running[key] = task
            task.add_done_callback(lambda _t: self.running.pop(key, None))
        self._waiting[key] += 1
        try:
            # shield: one caller being cancelled must not cancel the others' download.
            result: T = await asyncio.shield(task)
        except asyncio.CancelledError:
            if self._waiting[key] == 1 and not task.done():
                task.cancel()  # the last caller gave up
                await asyncio.gather(task, return_exceptions=True)
            raise
        finally:
            self._waiting[key] -= 1
            if self._waiting[key] <= 0:
                del self._waiting[key]
        return result

    async def cancel(self) -> None:
        """Cancel every running task and wait for them to end (the daemon is stopping)."""
        tasks = list(self.running.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
