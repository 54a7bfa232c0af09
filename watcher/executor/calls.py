"""The libvirt calls a plan's steps make, and who uses a volume.

Why it exists: the jobs that gather facts (``watcher.jobs.volume``) need these without
the executor: the calls' Protocol, and ``users_of``, which an API job reads into its facts
before it decides and the executor reads again right before and right after the write
(``CheckUnused``).
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from watcher.adapters import openers
from watcher.adapters.hypervisor import VolumeFacts
from watcher.adapters.hypervisor.storage import DiskUser
from watcher.core.domain import DomainState
from watcher.core.volume_plan import DiskUserFact


class Capacity(Protocol):
    @property
    def capacity(self) -> int: ...


class PlanCalls(Protocol):
    """The libvirt calls a plan's steps make (``DomainWatcher`` has them)."""

    async def set_state(self, uuid: str, state: DomainState) -> None: ...

    async def is_shut_off(self, uuid: str) -> bool: ...

    async def start(self, uuid: str) -> None: ...

    async def grow_volume(self, path: str, capacity: int) -> Capacity: ...

    async def create_volume(self, pool: str, name: str, capacity: int) -> VolumeFacts: ...

    async def domains_using(self, real_path: str, *, pool: str | None = None,
                            volume: str | None = None) -> list[DiskUser]: ...


async def users_of(calls: PlanCalls, real_path: str, pool: str,
                   volume: str) -> tuple[tuple[DiskUserFact, ...], tuple[str, ...]]:
    """Every domain with a disk on the volume, and whatever holds it open.

    A shut-off domain with a managed-save image counts as a user: its saved memory
    expects the disk as it was.
    """
    users = await calls.domains_using(real_path, pool=pool, volume=volume)
    facts = tuple(DiskUserFact(u.name, "shut off with a managed save image", False)
                  if u.managed_save else DiskUserFact(u.name, u.power, u.shut_off)
                  for u in users)
    pids = await asyncio.to_thread(openers.open_by, real_path)
    holders = await asyncio.to_thread(openers.kernel_holders, real_path)
    return facts, (*(f"process {pid}" for pid in pids), *holders)
