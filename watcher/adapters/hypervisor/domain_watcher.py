"""``DomainWatcher``: the events connection and the job's calls on it, as one object.

Why it exists: the jobs and the daemon need both halves (events that report domains, and
the calls a job makes) on the same live connection. ``DomainWatcher`` is the calls
(``jobcalls.DomainCalls``, where a new libvirt call is added, once) made on its own events
connection (``events``), whose life it exposes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from watcher.adapters.hypervisor.events import EventConnection
from watcher.adapters.hypervisor.jobcalls import DomainCalls
from watcher.settings import LIBVIRT_TUNING, LibvirtTuning


class DomainWatcher(DomainCalls):
    """A libvirt connection that reports domains worth a look and serves the job's calls.

    ``on_domain`` receives a domain UUID on the event loop whenever a domain stopped, its
    watcher metadata changed, or a sweep found a reprovision request; it must not block.
    """

    def __init__(self, uri: str, on_domain: Callable[[str], None], log: Any = None,
                 *, tuning: LibvirtTuning = LIBVIRT_TUNING) -> None:
        self.events = EventConnection(uri, on_domain, log, tuning=tuning)
        super().__init__(self.events)

    # ---- the connection ---------------------------------------------------------------

    @property
    def uri(self) -> str:
        return self.events.uri

    @property
    def connected(self) -> bool:
        return self.events.connected

    @property
    def connects(self) -> int:
        """Successful connections so far; more than one means a reconnect happened."""
        return self.events.connects

    async def run(self, stop: asyncio.Event) -> None:
        await self.events.run(stop)

    def lease(self) -> contextlib.AbstractContextManager[None]:
        return self.events.lease()

    async def sweep(self) -> int:
        return await self.events.sweep()
