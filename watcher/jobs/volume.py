"""An API job's volume: its facts, read once, and its plan.

Why it exists: ``watcher.core.volume_plan`` decides on frozen facts; this module reads
them (libvirt's pool and volume, LVM, every domain with a disk on the volume, every
process holding it open). The steps then run in the one executor (``watcher.executor``),
as a reprovision's do.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import replace
from typing import Protocol

from watcher.adapters import lvm
from watcher.adapters.hypervisor import VolumeFacts
from watcher.adapters.hypervisor.storage import PoolFacts
from watcher.core.errors import Refused
from watcher.core.plan import ImageFacts
from watcher.core.steps import Plan, Refusal
from watcher.core.volume_plan import ExistingVolume, VolumeJobFacts, plan_volume_job
from watcher.executor.calls import PlanCalls, users_of


class StorageCalls(PlanCalls, Protocol):
    """The libvirt calls an API job makes (``DomainWatcher`` has them)."""

    async def pool_info(self, pool: str) -> PoolFacts | None: ...

    async def pool_volume(self, pool: str, name: str) -> VolumeFacts | None: ...


async def gather(calls: StorageCalls, pool: str, volume: str, requested_size: int,
                 image: ImageFacts) -> VolumeJobFacts:
    """What ``plan_volume_job`` needs to decide on writing ``image`` onto ``pool/volume``."""
    facts = VolumeJobFacts(pool, None, volume, requested_size, image)
    info = await calls.pool_info(pool)
    existing: ExistingVolume | None = None
    if info is not None:
        facts = replace(facts, pool_kind="pool", pool_type=info.type, pool_active=info.active)
        if not info.active:
            return facts
        found = await calls.pool_volume(pool, volume)
        if found is not None:
            real = await asyncio.to_thread(os.path.realpath, found.path)
            lv = await lvm.lv_at(real) if info.type == "logical" else None
            existing = ExistingVolume(found.path, real, found.capacity,
                                      getattr(found, "format", None), lv)
    elif await lvm.vg_exists(pool):
        facts = replace(facts, pool_kind="vg")
        path = f"/dev/{pool}/{volume}"
        if await asyncio.to_thread(os.path.exists, path):
            real = await asyncio.to_thread(os.path.realpath, path)
            lv = await lvm.lv_at(real)
            if lv is None:
                raise Refused(f"{path} exists but LVM does not report it as an LV",
                                    touched=False)
            existing = ExistingVolume(path, real, lv.size, None, lv)
    else:
        return facts
    if existing is None:
        return facts
    users, pids = await users_of(calls, existing.real_path, pool, volume)
    return replace(facts, existing=existing, users=users, openers=pids)


def plan_or_refuse(facts: VolumeJobFacts) -> Plan:
    """The plan, or ``Refused`` with the refusal's reason (nothing was touched)."""
    decision = plan_volume_job(facts)
    if isinstance(decision, Refusal):
        raise Refused(decision.reason, touched=False)
    return decision
