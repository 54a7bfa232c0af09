"""The reprovision job's LV step (``watcher.adapters.lvm``) on real device-mapper: the exact
code the job runs to recognise, grow and guard an LV around the write."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tests.lvm.conftest import VolumeGroup, sh
from tests.lvm.test_lvm import MiB, fill_random, images_match, make_qcow2, sha256_of
from watcher.adapters import lvm
from watcher.adapters.qemu_img import write_image
from watcher.core.volume_rules import VolumeIdentity, lv_paths, refusal

pytestmark = pytest.mark.lvm


class WriteCheckFailed(Exception):
    """Stands for the job's post-write check failing (e.g. the domain was started)."""


async def test_an_lv_outside_the_allow_list_is_refused_and_one_of_a_listed_vg_is_not(
    vg: VolumeGroup,
) -> None:
    path = vg.create_lv("web1-root", "8m")
    info = await lvm.recognise(str(Path(path).resolve()))
    assert info is not None and info.vg == vg.name
    identity = VolumeIdentity(path, str(Path(path).resolve()), lv_paths(info.vg, info.lv),
                              info.vg)
    assert refusal(identity, ["/dev/othervg/*"], []) is not None
    assert refusal(identity, [f"/dev/{vg.name}/*"], []) is None
    assert refusal(identity, [f"/dev/mapper/{vg.name}-web1--root"], []) is None
    assert refusal(identity, [], [vg.name]) is None


async def test_an_open_lv_is_refused_before_anything_is_written(vg: VolumeGroup) -> None:
    path = vg.create_lv("root", "8m")
    fill_random(path, 8 * MiB)
    before = sha256_of(path)
    with open(path, "rb"), pytest.raises(lvm.LvRefused, match="open"):
        await lvm.recognise(str(Path(path).resolve()))
    assert sha256_of(path) == before


async def test_a_thin_lv_written_by_the_job_stays_sparse(vg: VolumeGroup, tmp_path: Path) -> None:
    vg.create_thin_pool("pool", "96m")
    path = vg.create_thin_lv("thin", "64m", "pool")
    fill_random(path, 64 * MiB)
    image = make_qcow2(tmp_path, 64 * MiB, [(0, 4 * MiB), (40 * MiB, 2 * MiB + MiB // 2)])
    info = await lvm.recognise(str(Path(path).resolve()))
    assert info is not None and info.is_thin

    async with lvm.guarded_write(info, 64 * MiB) as target_is_zero:
        assert target_is_zero
        await write_image(image, "qcow2", Path(path), target_is_zero=target_is_zero)

    after = await lvm.recognise(str(Path(path).resolve()))
    assert after is not None and after.data_percent is not None
    print(f"thin LV allocation after the job's write of a ~10% image: "
          f"{after.data_percent:.2f}%")
    assert 10.0 <= after.data_percent < 20.0
    assert images_match(image, path)
    assert "thin-vw-rollback" not in vg.lv_names()


async def test_a_failed_post_write_check_rolls_the_lv_back(
    vg: VolumeGroup, tmp_path: Path,
) -> None:
    path = vg.create_lv("root", "8m")
    fill_random(path, 8 * MiB)
    before = sha256_of(path)
    image = make_qcow2(tmp_path, 24 * MiB, [(0, 20 * MiB)])
    info = await lvm.recognise(str(Path(path).resolve()))
    assert info is not None

    grown = await lvm.grow(info, 24 * MiB)
    assert grown.size == 24 * MiB
    grown_before = sha256_of(path)
    with pytest.raises(WriteCheckFailed):
        async with lvm.guarded_write(grown, 24 * MiB):
            await write_image(image, "qcow2", Path(path))
            assert images_match(image, path)
            raise WriteCheckFailed
    assert sha256_of(path) == grown_before
    with open(path, "rb") as device:  # the original 8 MiB are intact
        assert hashlib.sha256(device.read(8 * MiB)).hexdigest() == before
    assert "root-vw-rollback" not in vg.lv_names()


async def test_a_snapshot_left_by_a_crashed_write_keeps_guarding_the_resumed_one(
    vg: VolumeGroup, tmp_path: Path,
) -> None:
    path = vg.create_lv("root", "16m")
    fill_random(path, 16 * MiB)
    before = sha256_of(path)
    # The crashed run: snapshot taken, then part of the LV overwritten.
    sh("lvcreate", "--yes", "--quiet", "--snapshot", "--name", "root-vw-rollback",
       "--size", "16m", f"{vg.name}/root")
    with open(path, "r+b") as device:
        device.write(b"\0" * 4 * MiB)
    info = await lvm.recognise(str(Path(path).resolve()))
    assert info is not None

    with pytest.raises(WriteCheckFailed):
        async with lvm.guarded_write(info, 16 * MiB):
            raise WriteCheckFailed
    assert sha256_of(path) == before  # back to before the crashed write, not half-way
