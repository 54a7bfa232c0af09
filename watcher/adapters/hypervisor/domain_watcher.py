"""``DomainWatcher``: the events connection and the job's calls on it, as one object.

Why it exists: the reprovision job and the daemon need both halves (events that report
domains, and the calls a job makes) on the same live connection. This composes them and
exposes the methods the job calls; ``events`` and ``calls`` are there for anyone who
needs only one half.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from watcher.adapters.hypervisor.base import DomainFacts, DomainRow, VolumeFacts
from watcher.adapters.hypervisor.events import EventConnection
from watcher.adapters.hypervisor.jobcalls import DomainCalls
from watcher.adapters.hypervisor.storage import DiskUser, PoolFacts
from watcher.core.domain import DomainState
from watcher.settings import LIBVIRT_TUNING, LibvirtTuning


class DomainWatcher:
    """A libvirt connection that reports domains worth a look and serves the job's calls.

    ``on_domain`` receives a domain UUID on the event loop whenever a domain stopped, its
    watcher metadata changed, or a sweep found a reprovision request; it must not block.
    """

    def __init__(self, uri: str, on_domain: Callable[[str], None], log: Any = None,
                 *, tuning: LibvirtTuning = LIBVIRT_TUNING) -> None:
        self.events = EventConnection(uri, on_domain, log, tuning=tuning)
        self.calls = DomainCalls(self.events)

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

    # ---- the job's calls --------------------------------------------------------------

    async def describe(self, uuid: str) -> DomainFacts | None:
        return await self.calls.describe(uuid)

    async def set_metadata(self, uuid: str, element: str) -> None:
        await self.calls.set_metadata(uuid, element)

    async def set_state(self, uuid: str, state: DomainState) -> None:
        await self.calls.set_state(uuid, state)

    async def is_shut_off(self, uuid: str) -> bool:
        return await self.calls.is_shut_off(uuid)

    async def start(self, uuid: str) -> None:
        await self.calls.start(uuid)

    async def volume_for_path(self, path: str) -> VolumeFacts | None:
        return await self.calls.volume_for_path(path)

    async def volume_path(self, pool: str, volume: str) -> str:
        return await self.calls.volume_path(pool, volume)

    async def grow_volume(self, path: str, capacity: int) -> VolumeFacts:
        return await self.calls.grow_volume(path, capacity)

    async def domain_overview(self, include: Callable[[str], bool]) -> list[DomainRow]:
        return await self.calls.domain_overview(include)

    # ---- the HTTP job API's volumes ---------------------------------------------------

    async def pool_info(self, pool: str) -> PoolFacts | None:
        return await self.calls.pool_info(pool)

    async def pool_volume(self, pool: str, name: str) -> VolumeFacts | None:
        return await self.calls.pool_volume(pool, name)

    async def create_volume(self, pool: str, name: str, capacity: int) -> VolumeFacts:
        return await self.calls.create_volume(pool, name, capacity)

    async def domains_using(self, real_path: str, *, pool: str | None = None,
                            volume: str | None = None) -> list[DiskUser]:
        return await self.calls.domains_using(real_path, pool=pool, volume=volume)
