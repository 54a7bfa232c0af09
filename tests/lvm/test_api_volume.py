"""An API job's volume in a volume group no libvirt pool holds, on real device-mapper.

``api.pool`` may name a bare VG: the job creates the LV with ``lvcreate``, grows it with
``lvextend`` when a later job asks for more, never shrinks it, and refuses an LV that is
open. libvirt does not run in the guest; the job's libvirt side answers as a host with
no pool of that name and no domain would (``NoPoolHere``), which is what makes it take
the VG path.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NoReturn

import pytest

from tests.lvm.conftest import VolumeGroup
from tests.lvm.test_lvm import MiB, images_match, make_qcow2, sha256_of
from watcher.adapters import lvm
from watcher.adapters.hypervisor import VolumeFacts
from watcher.adapters.hypervisor.storage import DiskUser, PoolFacts
from watcher.adapters.qemu_img import write_image
from watcher.cache import CacheEntry
from watcher.core.errors import Refused
from watcher.core.plan import ImageFacts
from watcher.executor import Executor, Target
from watcher.jobs.volume import gather, plan_or_refuse
from watcher.telemetry import get_logger

pytestmark = pytest.mark.lvm


class NoPoolHere:
    """libvirt's answers on a host whose VG is not a pool and whose domains use none of it."""

    async def pool_info(self, pool: str) -> PoolFacts | None:
        return None

    async def domains_using(self, real_path: str, *, pool: str | None = None,
                            volume: str | None = None) -> list[DiskUser]:
        return []

    async def pool_volume(self, pool: str, name: str) -> NoReturn:
        raise AssertionError("a bare VG has no libvirt volumes")

    async def create_volume(self, pool: str, name: str, capacity: int) -> NoReturn:
        raise AssertionError("a bare VG's LVs are made with lvcreate")

    async def grow_volume(self, path: str, capacity: int) -> VolumeFacts:
        raise AssertionError("a bare VG's LVs are grown with lvextend")


def _entry(image: Path, virtual_size: int) -> CacheEntry:
    return CacheEntry(digest="ab" * 32, path=image, format="qcow2", virtual_size=virtual_size,
                      size=image.stat().st_size, image="api-test", bucket="b", key="k", etag="e")


async def _job(vg: VolumeGroup, entry: CacheEntry, size: int, volume: str = "api1") -> str:
    calls: Any = NoPoolHere()
    facts = await gather(calls, vg.name, volume, size,
                         ImageFacts("api-test", entry.digest, entry.format, entry.virtual_size))
    plan = plan_or_refuse(facts)
    target = Target(vg.name, volume)
    target.found(facts.existing)
    await Executor(calls, write_image, facts.image, entry.path, target,
                   get_logger(test="api-volume"), "job-1").run(plan)
    assert target.path is not None
    return target.path


async def test_a_missing_lv_is_created_written_then_grown_and_never_shrunk(
        vg: VolumeGroup, tmp_path: Path) -> None:
    image = make_qcow2(tmp_path, 16 * MiB, [(0, MiB), (8 * MiB, MiB)])
    entry = _entry(image, 16 * MiB)

    path = await _job(vg, entry, 32 * MiB)
    assert path == f"/dev/{vg.name}/api1"
    assert "api1" in vg.lv_names()
    info = await lvm.lv_info(f"{vg.name}/api1")
    assert info.size == 32 * MiB and info.active
    assert images_match(image, path)

    await _job(vg, entry, 64 * MiB)  # a later job asks for more: lvextend
    assert (await lvm.lv_info(f"{vg.name}/api1")).size == 64 * MiB
    await _job(vg, entry, 8 * MiB)  # less: kept as it is
    assert (await lvm.lv_info(f"{vg.name}/api1")).size == 64 * MiB
    assert images_match(image, path)


async def test_an_open_lv_is_refused_and_keeps_its_bytes(vg: VolumeGroup, tmp_path: Path) -> None:
    image = make_qcow2(tmp_path, 8 * MiB, [(0, MiB)])
    entry = _entry(image, 8 * MiB)
    path = vg.create_lv("busy", "16M")
    before = sha256_of(path)
    holder = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(Refused, match=r"open by (another process|process)"):
            await _job(vg, entry, 16 * MiB, volume="busy")
    finally:
        os.close(holder)
    assert sha256_of(path) == before


async def test_an_image_larger_than_the_size_asked_for_is_refused_before_lvcreate(
        vg: VolumeGroup, tmp_path: Path) -> None:
    image = make_qcow2(tmp_path, 64 * MiB, [(0, MiB)])
    with pytest.raises(Refused, match="volume_size_gb of at least 1"):
        await _job(vg, _entry(image, 64 * MiB), 32 * MiB, volume="small")
    assert "small" not in vg.lv_names()
