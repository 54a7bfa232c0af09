"""Creating LVs in a volume group that no libvirt pool covers, on real device-mapper."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from tests.lvm.conftest import VolumeGroup, sh
from watcher.adapters import lvm

pytestmark = pytest.mark.lvm

MiB = 1024**2


async def test_vg_exists_tells_a_present_group_from_a_missing_one(vg: VolumeGroup) -> None:
    assert await lvm.vg_exists(vg.name)
    assert not await lvm.vg_exists(f"{vg.name}_missing")


async def test_create_lv_makes_an_active_lv_of_that_size(vg: VolumeGroup) -> None:
    info = await lvm.create_lv(vg.name, "api-root", 64 * MiB)

    assert (info.vg, info.lv, info.size, info.active) == (vg.name, "api-root", 64 * MiB, True)
    assert not info.is_thin and not info.is_snapshot
    assert stat.S_ISBLK(os.stat(info.path).st_mode)
    with open(info.path, "rb") as device:
        device.seek(0, os.SEEK_END)
        assert device.tell() == 64 * MiB
    assert "api-root" in vg.lv_names()


async def test_create_lv_rounds_up_to_whole_extents(vg: VolumeGroup) -> None:
    info = await lvm.create_lv(vg.name, "odd", 5 * MiB + 1)
    assert info.size == 8 * MiB  # the VG's extents are 4 MiB


async def test_create_lv_wipes_what_a_former_lv_left_on_its_extents(vg: VolumeGroup) -> None:
    first = await lvm.create_lv(vg.name, "former", 8 * MiB)
    with open(first.path, "r+b") as device:
        device.write(b"\xff" * 4096)
    sh("lvremove", "--yes", first.name)

    second = await lvm.create_lv(vg.name, "latter", 8 * MiB)
    with open(second.path, "rb") as device:
        assert device.read(4096) == bytes(4096)


async def test_creating_an_existing_name_fails_saying_so(vg: VolumeGroup) -> None:
    await lvm.create_lv(vg.name, "taken", 8 * MiB)
    with pytest.raises(lvm.LvmError, match="already exists"):
        await lvm.create_lv(vg.name, "taken", 8 * MiB)
    assert (await lvm.lv_info(f"{vg.name}/taken")).size == 8 * MiB


async def test_names_reach_lvcreate_as_argv_never_through_a_shell(
        vg: VolumeGroup, tmp_path: Path) -> None:
    witness = tmp_path / "witness"
    with pytest.raises(lvm.LvmError, match="lvcreate"):
        await lvm.create_lv(vg.name, f"x;touch {witness}", 8 * MiB)
    with pytest.raises(lvm.LvmError):
        await lvm.create_lv(f"{vg.name} $(touch {witness})", "y", 8 * MiB)
    assert not witness.exists()
    assert [n for n in vg.lv_names() if n.startswith(("x", "y"))] == []


async def test_create_lv_in_a_missing_group_fails(vg: VolumeGroup) -> None:
    with pytest.raises(lvm.LvmError):
        await lvm.create_lv(f"{vg.name}_missing", "root", 8 * MiB)


async def test_a_created_lv_grows_with_the_existing_grow(vg: VolumeGroup) -> None:
    info = await lvm.create_lv(vg.name, "growing", 8 * MiB)
    grown = await lvm.grow(info, 20 * MiB)
    assert grown.size == 20 * MiB
    assert (await lvm.lv_info(info.name)).size == 20 * MiB
