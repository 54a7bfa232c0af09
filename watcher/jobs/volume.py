"""An API job's volume: its facts read once, then the plan's steps run in order.

Why it exists: ``watcher.core.volume_plan`` decides on frozen facts; this module reads
them (libvirt's pool and volume, LVM, every domain with a disk on the volume, every
process holding it open) and runs the steps through the adapters. The write itself runs
with the start interlock in place (``watcher.adapters.write_markers``): while the marker
exists, libvirt's hook refuses to start any domain with a disk on the volume, and a
second writer (another job, a reprovision) is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from watcher import telemetry
from watcher.adapters import lvm, openers, write_markers
from watcher.adapters.hypervisor import VolumeFacts
from watcher.adapters.hypervisor.storage import DiskUser, PoolFacts
from watcher.adapters.qemu_img import WriteImageFunction
from watcher.cache import CacheEntry
from watcher.core.errors import Refused
from watcher.core.lvm_rules import LvInfo
from watcher.core.plan import ImageFacts
from watcher.core.steps import (
    CheckUnused,
    CreateVolume,
    Discard,
    ExtendLv,
    GrowVolume,
    Refusal,
    VolumePlan,
    VolumeStep,
    WriteVolume,
)
from watcher.core.volume_plan import (
    DiskUserFact,
    ExistingVolume,
    VolumeJobFacts,
    plan_volume_job,
    usage_refusal,
)


class StorageCalls(Protocol):
    """The libvirt calls an API job makes (``DomainWatcher`` has them)."""

    async def pool_info(self, pool: str) -> PoolFacts | None: ...

    async def pool_volume(self, pool: str, name: str) -> VolumeFacts | None: ...

    async def create_volume(self, pool: str, name: str, capacity: int) -> VolumeFacts: ...

    async def grow_volume(self, path: str, capacity: int) -> VolumeFacts: ...

    async def domains_using(self, real_path: str, *, pool: str | None = None,
                            volume: str | None = None) -> list[DiskUser]: ...


@dataclass
class VolumeTarget:
    """The job's volume as the steps find and change it."""

    pool: str
    volume: str
    path: str | None = None
    real_path: str | None = None
    lv: LvInfo | None = None
    touched: bool = False
    """A step changed the volume (created, grown or began writing it)."""
    wrote: bool = False
    """The write began: the volume may hold a partial image."""


async def users_of(calls: StorageCalls, real_path: str, pool: str,
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


def plan_or_refuse(facts: VolumeJobFacts) -> VolumePlan:
    """The plan, or ``Refused`` with the refusal's reason (nothing was touched)."""
    decision = plan_volume_job(facts)
    if isinstance(decision, Refusal):
        raise Refused(decision.reason, touched=False)
    return decision


@dataclass
class VolumeExecutor:
    """Runs one plan for one API job."""

    calls: StorageCalls
    write_image: WriteImageFunction
    entry: CacheEntry
    job_id: str
    target: VolumeTarget
    log: Any
    on_progress: Callable[[float], None] | None = None
    on_writing: Callable[[], None] | None = None
    """Called once, right before the write starts (the job's stage becomes ``writing``)."""

    async def run(self, plan: VolumePlan, existing: ExistingVolume | None) -> str:
        """Run every step; the volume's path. Raises ``Refused`` or a write failure."""
        if existing is not None:
            self.target.path, self.target.real_path = existing.path, existing.real_path
            self.target.lv = existing.lv
        async with contextlib.AsyncExitStack() as guard:
            for step in plan.steps:
                self.log.debug("api job step", step=str(step))
                if isinstance(step, CheckUnused) and step.when == "before write":
                    assert self.target.real_path is not None
                    guard.enter_context(write_markers.marked_writing(
                        self.target.real_path, pool=self.target.pool,
                        volume=self.target.volume, job_id=self.job_id))
                await self._run(step)
        assert self.target.path is not None
        return self.target.path

    async def _run(self, step: VolumeStep) -> None:
        target = self.target
        if isinstance(step, CreateVolume):
            if step.via == "libvirt":
                made = await self.calls.create_volume(step.pool, step.volume, step.size)
                path = made.path
            else:
                path = (await lvm.create_lv(step.pool, step.volume, step.size)).path
            target.touched = True
            target.path = path
            target.real_path = await asyncio.to_thread(os.path.realpath, path)
            self.log.info("volume created", pool=step.pool, volume=step.volume, path=path,
                          size=step.size)
        elif isinstance(step, GrowVolume):
            grown = await self.calls.grow_volume(step.path, step.size)
            target.touched = True
            if grown.capacity < step.size:
                raise Refused(f"growing {step.path} to {step.size} bytes left "
                                    f"{grown.capacity}", touched=True)
            self.log.info("volume grown", path=step.path, capacity=grown.capacity)
        elif isinstance(step, ExtendLv):
            assert target.lv is not None
            target.lv = await lvm.grow(target.lv, step.size)
            target.touched = True
            self.log.info("logical volume grown", lv=target.lv.name, size=target.lv.size)
        elif isinstance(step, Discard):
            target.touched = True
            await lvm.discard(step.path)
        elif isinstance(step, CheckUnused):
            await self._check_unused(step)
        elif isinstance(step, WriteVolume):
            await self._write(step)

    async def _check_unused(self, step: CheckUnused) -> None:
        target = self.target
        assert target.real_path is not None
        users, pids = await users_of(self.calls, target.real_path, target.pool, target.volume)
        reason = usage_refusal(users, pids, f"{target.pool}/{target.volume}")
        if reason is None:
            return
        if step.when == "after write":
            raise Refused(f"{reason}: it was used while being written; its content "
                                "is undefined", touched=True)
        raise Refused(reason, touched=target.touched)

    async def _write(self, step: WriteVolume) -> None:
        assert self.target.real_path is not None
        if self.on_writing is not None:
            self.on_writing()
        self.target.touched = self.target.wrote = True
        self.log.info("writing volume", path=self.target.real_path, digest=self.entry.digest,
                      bytes=self.entry.virtual_size)
        with telemetry.tracer.start_as_current_span("write", attributes={
                "path": self.target.real_path, "digest": self.entry.digest}):
            await self.write_image(self.entry.path, self.entry.format,
                                   Path(self.target.real_path),
                                   target_is_zero=step.target_is_zero,
                                   on_progress=self.on_progress)
