"""A reprovision's write onto an LV, on real device-mapper: the daemon's own job
(``Reprovisioner``: facts, plan, executor) recognises, grows, guards and writes the LV.

``tests.lvm.test_clone.Host`` stands in for libvirt (one shut-off domain whose root disk
is the test's LV); a domain "started" during the write is its ``is_shut_off`` answering
False after the write, which the plan's check after the write must catch."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tests.lvm.conftest import VolumeGroup
from tests.lvm.test_clone import UUID, CountingWriter, Host, entry_for, reprovisioner
from tests.lvm.test_lvm import MiB, fill_random, images_match, make_qcow2, sha256_of
from watcher.adapters import lvm
from watcher.core.lvm_rules import cow_snapshot_size
from watcher.core.volume_rules import VolumeIdentity, lv_paths, refusal

pytestmark = pytest.mark.lvm


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


def domain_on(path: str, tmp_path: Path, *, started_during_write: bool = False) -> Host:
    """One shut-off domain with ``path`` as its root disk, tagged for reprovisioning; with
    ``started_during_write``, found running by the check right after the write."""
    host = Host(path, tmp_path / "state.xml",
                shut_off_answers=[True, False] if started_during_write else None)
    host.request()
    return host


async def test_a_thin_lv_written_by_the_job_stays_sparse(vg: VolumeGroup, tmp_path: Path) -> None:
    vg.create_thin_pool("pool", "96m")
    path = vg.create_thin_lv("thin", "64m", "pool")
    fill_random(path, 64 * MiB)
    image = make_qcow2(tmp_path, 64 * MiB, [(0, 4 * MiB), (40 * MiB, 2 * MiB + MiB // 2)])
    host = domain_on(path, tmp_path)
    writer = CountingWriter()

    await reprovisioner(host, entry_for(image, 64 * MiB), vg.name, clone="never",
                        snapshot=64 * MiB, writer=writer)(UUID)

    assert host.state is not None and host.state.kind == "provisioned", host.state
    assert writer.targets == [str(Path(path).resolve())]  # written in place, no clone
    after = await lvm.recognise(str(Path(path).resolve()))
    assert after is not None and after.data_percent is not None
    print(f"thin LV allocation after the job's write of a ~10% image: "
          f"{after.data_percent:.2f}%")
    assert 10.0 <= after.data_percent < 20.0  # discarded, then only the data written
    assert images_match(image, path)
    assert "thin-vw-rollback" not in vg.lv_names()


async def test_a_failed_post_write_check_rolls_the_lv_back(
    vg: VolumeGroup, tmp_path: Path,
) -> None:
    path = vg.create_lv("root", "8m")
    fill_random(path, 8 * MiB)
    before = sha256_of(path)
    image = make_qcow2(tmp_path, 24 * MiB, [(0, 20 * MiB)])
    host = domain_on(path, tmp_path, started_during_write=True)
    writer = CountingWriter()

    await reprovisioner(host, entry_for(image, 24 * MiB), vg.name, grow=True,
                        snapshot=24 * MiB, writer=writer)(UUID)

    state = host.state
    assert state is not None and state.kind == "failed", state
    assert state.reason is not None and "started while its volume" in state.reason
    assert writer.targets == [str(Path(path).resolve())]  # the image was written...
    info = await lvm.recognise(str(Path(path).resolve()))
    assert info is not None and info.size == 24 * MiB  # ...onto the grown LV...
    with open(path, "rb") as device:  # ...and merged back: the original 8 MiB are intact
        assert hashlib.sha256(device.read(8 * MiB)).hexdigest() == before
    assert not images_match(image, path)
    assert "root-vw-rollback" not in vg.lv_names()


async def test_a_snapshot_left_by_a_crashed_write_keeps_guarding_the_resumed_one(
    vg: VolumeGroup, tmp_path: Path,
) -> None:
    path = vg.create_lv("root", "16m")
    fill_random(path, 16 * MiB)
    before = sha256_of(path)
    # The crashed run: its snapshot taken (as the job sizes it), then part of the LV
    # overwritten, and the snapshot left behind.
    info = await lvm.recognise(str(Path(path).resolve()))
    assert info is not None
    async with lvm.rollback_snapshot(info, cow_snapshot_size(info, 16 * MiB), keep=True):
        with open(path, "r+b") as device:
            device.write(b"\0" * 4 * MiB)
    assert "root-vw-rollback" in vg.lv_names()
    image = make_qcow2(tmp_path, 16 * MiB, [(0, 8 * MiB)])
    host = domain_on(path, tmp_path, started_during_write=True)

    await reprovisioner(host, entry_for(image, 16 * MiB), vg.name, snapshot=16 * MiB)(UUID)

    assert host.state is not None and host.state.kind == "failed", host.state
    assert sha256_of(path) == before  # back to before the crashed write, not half-way
    assert "root-vw-rollback" not in vg.lv_names()
