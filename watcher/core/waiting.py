"""A sleep that ends early when any of several events is set.

Both the libvirt watcher (backoff between reconnects, waiting for work) and the supervisor
(reconcile timer, reload, watchdog) sleep this way, so that a stop request is acted on at
once rather than after the sleep. Plain asyncio, no I/O, so it lives at the bottom floor.
"""

from __future__ import annotations

import asyncio


async def wait_any(*events: asyncio.Event, timeout: float | None = None) -> None:
    """Return when any of ``events`` is set or ``timeout`` seconds have passed."""
    waiters = [asyncio.create_task(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
