"""A reprovision job's facts, read once: the root disk, its volume, its LV, the image.

Why it exists: the job decides once (``watcher.core.plan``) on a frozen ``JobFacts``
instead of asking libvirt and LVM a little at a time between decisions. Reading is lazy
on purpose, and uses the plan's own rules to know when to stop: nothing is looked up
behind a disk the plan refuses, and a volume the allow-list refuses is never opened just
to read its size.
"""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import Sequence
from dataclasses import replace
from typing import Protocol

from watcher.adapters import lvm
from watcher.adapters.hypervisor import DomainFacts, VolumeFacts
from watcher.cache import CacheEntry
from watcher.core.domain import DomainState, RootDiskSource, RootDiskUnusable, root_disk
from watcher.core.lvm_rules import (
    LvInfo,
    golden_digest,
    golden_name,
    lv_from_path,
    swap_leftover,
)
from watcher.core.plan import (
    ImageFacts,
    JobFacts,
    PoolVolume,
    TargetFacts,
    VolumeRules,
    disk_refusal,
    volume_refusal,
)
from watcher.core.policy import DomainRule


class VolumeLookups(Protocol):
    """The libvirt calls reading a job's facts needs (the daemon's or ``explain``'s)."""

    async def volume_path(self, pool: str, volume: str) -> str: ...

    async def volume_for_path(self, path: str) -> VolumeFacts | None: ...


def _size_of(target: TargetFacts) -> tuple[int | None, str | None]:
    """Bytes of a regular file or block device, or why they cannot be known."""
    path = target.real_path
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        return None, f"cannot open root disk {target.shown}: {exc.strerror}"
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISREG(mode):
            return os.fstat(fd).st_size, None
        if stat.S_ISBLK(mode):
            return os.lseek(fd, 0, os.SEEK_END), None
        return None, f"{path} is neither a regular file nor a block device"
    except OSError as exc:
        return None, f"cannot open root disk {target.shown}: {exc.strerror}"
    finally:
        os.close(fd)


async def resolve_target(hypervisor: VolumeLookups, disk: RootDiskSource) -> TargetFacts:
    """The volume behind ``disk``: its path, real path, libvirt volume and LV."""
    return (await _resolve(hypervisor, disk))[0]


async def _resolve(hypervisor: VolumeLookups,
                   disk: RootDiskSource) -> tuple[TargetFacts, list[LvInfo]]:
    """``resolve_target``, and the other LVs of the LV's VG (read in the same ``lvs``)."""
    if disk.type == "volume":
        assert disk.pool is not None and disk.volume is not None
        path = await hypervisor.volume_path(disk.pool, disk.volume)
    else:
        assert disk.path is not None
        path = disk.path
    real = await asyncio.to_thread(os.path.realpath, path)
    volume = await hypervisor.volume_for_path(path)
    lv, neighbours = await lvm.lv_with_neighbours(real)
    pool_volume = (PoolVolume(volume.pool, volume.pool_type, volume.capacity)
                   if volume is not None else None)
    return TargetFacts(path, real, pool_volume, lv), neighbours


def clone_facts(target: TargetFacts, neighbours: Sequence[LvInfo], digest: str, *,
                clone: bool) -> TargetFacts:
    """``target`` with what the clone path needs, from the LVs of its VG: an interrupted
    swap of its LV, and the image's golden LV in its thin pool."""
    lv = target.lv
    if lv is None or not lv.is_thin:
        return target  # only thin LVs are swapped (a missing one: ``missing_lv_facts``)
    swap = swap_leftover(lv.vg, lv.lv, neighbours)
    golden = None
    if clone and swap is None and lv.pool is not None:
        name = golden_name(digest, lv.pool)
        golden = next((other for other in neighbours if other.lv == name and other.is_golden
                       and golden_digest(other) == digest), None)
    return replace(target, swap=swap, golden=golden)


async def missing_lv_facts(target: TargetFacts) -> TargetFacts:
    """``target`` with an interrupted swap of the LV its path names, when that LV is not
    there (renamed away by the swap); unchanged otherwise."""
    named = lv_from_path(target.path) if target.lv is None else None
    if named is None:
        return target
    try:
        lvs = await lvm.vg_lvs(named[0])
    except lvm.LvmError:
        return target  # no such VG (or no LVM at all): nothing was swapped there
    return replace(target, swap=swap_leftover(*named, lvs))


async def gather(hypervisor: VolumeLookups, domain: DomainFacts, request: DomainState,
                 rule: DomainRule, image: str, entry: CacheEntry,
                 volumes: VolumeRules) -> JobFacts:
    """What ``core.plan.plan`` needs to decide on writing ``entry`` onto ``domain``."""
    facts = JobFacts(domain.name, domain.uuid, request.image,
                     ImageFacts(image, entry.digest, entry.format, entry.virtual_size),
                     disk=None)
    try:
        facts = replace(facts, disk=root_disk(domain.xml, rule.root_disk))
    except RootDiskUnusable as exc:
        return replace(facts, disk_problem=str(exc))
    if disk_refusal(facts) is not None or facts.disk is None:
        return facts
    target, neighbours = await _resolve(hypervisor, facts.disk)
    target = clone_facts(target, neighbours, entry.digest, clone=rule.clone == "auto")
    target = await missing_lv_facts(target)
    if target.swap is None and volume_refusal(target, volumes) is None and target.capacity is None:
        size, problem = await asyncio.to_thread(_size_of, target)
        target = replace(target, size=size, size_problem=problem)
    return replace(facts, target=target)
