"""The LVM adapter against real device-mapper: recognising, refusing, growing, discarding
and rolling back logical volumes, with images written by the real qemu-img."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.lvm.conftest import VolumeGroup, sh
from watcher.adapters import lvm
from watcher.adapters.qemu_img import write_image
from watcher.core.errors import ImageWriteError

pytestmark = pytest.mark.lvm

MiB = 1024**2


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as device:
        while chunk := device.read(4 * MiB):
            digest.update(chunk)
    return digest.hexdigest()


def fill_random(path: str, size: int) -> None:
    with open(path, "r+b") as device:
        for _ in range(size // (4 * MiB)):
            device.write(os.urandom(4 * MiB))
        os.fsync(device.fileno())


def make_qcow2(directory: Path, virtual_size: int, data: list[tuple[int, int]]) -> Path:
    """A qcow2 image of ``virtual_size`` holding random bytes at each (offset, length)."""
    raw = directory / "image.raw"
    with raw.open("wb") as handle:
        handle.truncate(virtual_size)
        for offset, length in data:
            handle.seek(offset)
            handle.write(os.urandom(length))
    image = directory / "image.qcow2"
    sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(image))
    raw.unlink()
    return image


def images_match(image: Path, device: str) -> bool:
    done = subprocess.run(
        ["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(image), device],
        capture_output=True, text=True, check=False,
    )
    return done.returncode == 0


def resolved(path: str) -> str:
    return os.path.realpath(path)


def kill_child_named(command: str) -> bool:
    """SIGKILL this process's child running ``command``; whether one was found."""
    me = str(os.getpid())
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat_line = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        comm = stat_line[stat_line.index("(") + 1:stat_line.rindex(")")]
        ppid = stat_line[stat_line.rindex(")") + 2:].split()[1]
        if comm == command and ppid == me:
            os.kill(int(entry), signal.SIGKILL)
            return True
    return False


# --- recognising an LV -------------------------------------------------------------------

async def test_an_lv_is_recognised_by_its_vg_path_mapper_name_and_dm_node(
    vg: VolumeGroup,
) -> None:
    path = vg.create_lv("root", "8m")
    mapper = f"/dev/mapper/{vg.name}-root"
    dm_node = resolved(mapper)

    for given in (path, mapper, dm_node):
        info = await lvm.lv_for_device(given)
        assert info is not None, given
        assert (info.vg, info.lv, info.size) == (vg.name, "root", 8 * MiB)
        assert info.active and not info.device_open
        assert not (info.is_snapshot or info.is_thin or info.is_thin_pool)
        assert info.extent_size == 4 * MiB
        assert lvm.refusal_reason(info) is None


async def test_a_block_device_or_file_that_is_not_an_lv_is_not_recognised(
    vg: VolumeGroup, tmp_path: Path,
) -> None:
    plain_file = tmp_path / "disk.img"
    plain_file.write_bytes(b"\0" * 4096)

    assert await lvm.lv_for_device(vg.pv) is None
    assert await lvm.lv_for_device(str(plain_file)) is None


# --- refusing LVs the watcher must not write ---------------------------------------------

async def test_an_lv_held_open_by_another_process_is_refused(vg: VolumeGroup) -> None:
    path = vg.create_lv("busy", "8m")
    with open(path, "rb") as device:
        holder = await asyncio.create_subprocess_exec("sleep", "60", stdin=device)
    try:
        info = await lvm.lv_for_device(path)
        assert info is not None and info.device_open
        assert "open" in (lvm.refusal_reason(info) or "")
    finally:
        holder.kill()
        await holder.wait()
    closed = await lvm.lv_for_device(path)
    assert closed is not None and lvm.refusal_reason(closed) is None


async def test_snapshots_and_thin_pools_are_refused(vg: VolumeGroup) -> None:
    vg.create_lv("origin", "8m")
    sh("lvcreate", "--quiet", "--snapshot", "--name", "snap", "--size", "8m",
       f"{vg.name}/origin")
    pool = vg.create_thin_pool("pool", "32m")

    snapshot = await lvm.lv_for_device(f"/dev/{vg.name}/snap")
    thin_pool = await lvm.lv_for_device(pool)
    origin = await lvm.lv_for_device(f"/dev/{vg.name}/origin")

    assert snapshot is not None and snapshot.is_snapshot and snapshot.origin == "origin"
    assert "snapshot" in (lvm.refusal_reason(snapshot) or "")
    assert thin_pool is not None and thin_pool.is_thin_pool
    assert "thin pool" in (lvm.refusal_reason(thin_pool) or "")
    assert origin is not None and lvm.refusal_reason(origin) is None


# --- growing and writing -----------------------------------------------------------------

async def test_a_too_small_lv_is_grown_to_whole_extents_and_then_holds_the_image(
    vg: VolumeGroup, tmp_path: Path,
) -> None:
    path = vg.create_lv("small", "8m")
    image_size = 21 * MiB
    image = make_qcow2(tmp_path, image_size, [(0, MiB), (12 * MiB, 2 * MiB), (20 * MiB, MiB)])
    info = await lvm.lv_for_device(path)
    assert info is not None

    grown = await lvm.extend(info, image_size)
    unchanged = await lvm.extend(grown, 8 * MiB)
    await write_image(image, "qcow2", Path(path))

    assert grown.size == 24 * MiB
    assert unchanged == grown
    assert images_match(image, path)


async def test_a_thin_lv_discarded_before_a_sparse_write_allocates_only_the_image_data(
    vg: VolumeGroup, tmp_path: Path,
) -> None:
    vg.create_thin_pool("pool", "96m")
    path = vg.create_thin_lv("thin", "64m", "pool")
    fill_random(path, 64 * MiB)
    full = await lvm.lv_for_device(path)
    # About 10% of the 64 MiB holds data, in three runs.
    image = make_qcow2(
        tmp_path, 64 * MiB, [(0, 3 * MiB), (30 * MiB, 2 * MiB), (60 * MiB, MiB + MiB // 2)],
    )

    await lvm.discard(path)
    await write_image(image, "qcow2", Path(path), target_is_zero=True)
    written = await lvm.lv_for_device(path)

    assert full is not None and full.is_thin and full.pool == "pool"
    assert full.data_percent == pytest.approx(100.0)
    assert written is not None and written.data_percent is not None
    print(f"thin LV data_percent after discard + sparse write: {written.data_percent:.2f}%")
    assert 10.0 <= written.data_percent < 20.0
    assert images_match(image, path)


# --- rolling back a failed write ---------------------------------------------------------

@pytest.mark.parametrize("kind", ["thick", "thin"])
async def test_a_write_killed_midway_is_rolled_back_so_the_lv_reads_as_before(
    vg: VolumeGroup, tmp_path: Path, kind: str,
) -> None:
    if kind == "thin":
        vg.create_thin_pool("pool", "128m")
        path = vg.create_thin_lv("root", "48m", "pool")
    else:
        path = vg.create_lv("root", "48m")
    fill_random(path, 48 * MiB)
    before = sha256_of(path)
    image = make_qcow2(tmp_path, 48 * MiB, [(0, 48 * MiB)])
    info = await lvm.lv_for_device(path)
    assert info is not None
    killed: list[float] = []

    # qemu-img counts a chunk when it starts on it, with up to 8 chunks of 2 MiB in
    # flight: at half of 48 MiB at least 8 MiB have reached the LV, and 24 MiB have not.
    def kill_writer_halfway(percent: float) -> None:
        if percent >= 50 and not killed and kill_child_named("qemu-img"):
            killed.append(percent)

    with pytest.raises(ImageWriteError):
        async with lvm.rollback_snapshot(info, info.size):
            try:
                await write_image(image, "qcow2", Path(path), on_progress=kill_writer_halfway)
            finally:
                half_written = sha256_of(path)

    assert killed and killed[0] < 100
    assert half_written != before
    assert sha256_of(path) == before
    assert vg.lv_names().count("root-vw-rollback") == 0


async def test_a_successful_write_removes_the_snapshot_unless_asked_to_keep_it(
    vg: VolumeGroup, tmp_path: Path,
) -> None:
    path = vg.create_lv("root", "16m")
    image = make_qcow2(tmp_path, 16 * MiB, [(0, 4 * MiB)])
    info = await lvm.lv_for_device(path)
    assert info is not None

    async with lvm.rollback_snapshot(info, info.size) as snapshot:
        assert snapshot.is_snapshot and snapshot.origin == "root"
        await write_image(image, "qcow2", Path(path))
    names_after_write = vg.lv_names()
    async with lvm.rollback_snapshot(info, info.size, keep=True):
        pass

    assert "root-vw-rollback" not in names_after_write
    assert images_match(image, path)
    assert "root-vw-rollback" in vg.lv_names()
