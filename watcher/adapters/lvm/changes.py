"""The LVM edge's writing half: grow, discard, guard with a rollback snapshot, create.

Why it exists: a reprovision may have to grow the root LV to the image's size, frees a
thin LV's blocks before a sparse write, and keeps a snapshot while writing so a failed
write can be undone instead of leaving a half-written disk; the HTTP job API creates LVs
in a VG used without a libvirt pool. Nothing is logged here: the caller logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from collections.abc import AsyncIterator

from watcher.adapters.lvm import report
from watcher.core.lvm_rules import LvInfo

ROLLBACK_SUFFIX = "-vw-rollback"
"""Appended to an LV's name to name the snapshot that guards a write to it."""

MERGE_TIMEOUT = 3600.0
"""Seconds to wait for a rollback merge; it copies back only the blocks the write changed."""


async def extend(info: LvInfo, min_size: int) -> LvInfo:
    """Grow ``info``'s LV to at least ``min_size`` bytes (rounded up to whole extents).

    Never shrinks: an LV already that big is returned unchanged. Returns the LV's state
    after the change.
    """
    current = await report.lv_info(info.name)
    if current.size >= min_size:
        return current
    target = math.ceil(min_size / current.extent_size) * current.extent_size
    await report.run(["lvextend", "--size", f"{target}b", current.name])
    return await report.lv_info(info.name)


async def grow(info: LvInfo, min_size: int) -> LvInfo:
    """``extend``, refusing with ``LvRefused`` when the LV did not reach ``min_size``."""
    grown = await extend(info, min_size)
    if grown.size < min_size:
        raise report.LvRefused(f"growing {info.name} to {min_size} bytes left {grown.size}")
    return grown


async def discard(path: str) -> None:
    """Discard every block of the device at ``path``.

    On a thin LV this returns the blocks to the pool, so a following write of a sparse
    image with ``--target-is-zero`` allocates only what the image holds. blkdiscard
    opens the device exclusively: it fails rather than discard a mounted device.
    """
    await report.run(["blkdiscard", path])


async def _merge_back(origin: LvInfo, snapshot: LvInfo, timeout: float) -> None:
    """Merge ``snapshot`` into ``origin`` and wait until the merge has completed.

    ``lvconvert --merge`` merges at once and waits when the origin is closed. When it is
    still open (a writer not yet gone), LVM delays the merge to the origin's next
    activation: once the origin is closed, it is reactivated so the merge runs now.
    """
    await report.run(["lvconvert", "--merge", "--interval", "1", snapshot.name])
    reactivated = False
    async with asyncio.timeout(timeout):
        while any(row.info.lv == snapshot.lv for row in await report.lvs_rows(origin.vg)):
            if not reactivated:
                current = await report.lv_info(origin.name)
                if not current.device_open:
                    if current.active:
                        await report.run(["lvchange", "--activate", "n", origin.name])
                    await report.run(["lvchange", "--activate", "y", origin.name])
                    reactivated = True
                    continue
            await asyncio.sleep(0.5)


@contextlib.asynccontextmanager
async def rollback_snapshot(
    info: LvInfo, size: int, *, keep: bool = False, merge_timeout: float = MERGE_TIMEOUT,
) -> AsyncIterator[LvInfo]:
    """Keep a snapshot of ``info``'s LV while the body writes it; undo the write on failure.

    Creates ``<lv>-vw-rollback`` (a COW snapshot of ``size`` bytes, a thin snapshot for a
    thin LV) and yields it. If the body raises (or is cancelled), the snapshot is merged
    back, so the LV reads exactly as before, and the exception is re-raised; a failed
    merge raises ``report.LvmError`` chained to it. On success the snapshot is removed unless
    ``keep``. A COW snapshot that fills up becomes invalid and cannot be merged: ``size``
    must cover everything the body may change (the LV's size always does).
    """
    name = f"{info.lv}{ROLLBACK_SUFFIX}"
    leftover = [r for r in await report.lvs_rows(info.vg) if r.info.lv == name]
    if leftover and leftover[0].info.origin == info.lv:
        # A write that crashed left its guard behind: it still holds the LV as it was
        # before that write, so it keeps guarding this one.
        snapshot = leftover[0].info
    else:
        argv = ["lvcreate", "--snapshot", "--name", name]
        if not info.is_thin:
            rounded = math.ceil(size / info.extent_size) * info.extent_size
            argv += ["--size", f"{rounded}b"]
        await report.run([*argv, info.name])
        snapshot = await report.lv_info(f"{info.vg}/{name}")
    try:
        yield snapshot
    except GeneratorExit:
        raise
    except BaseException as failure:
        try:
            await _merge_back(info, snapshot, merge_timeout)
        except (report.LvmError, TimeoutError) as merge_failure:
            raise report.LvmError(
                ["lvconvert", "--merge", snapshot.name], None,
                f"rolling {info.name} back failed after {failure!r}: {merge_failure}",
            ) from failure
        raise
    if not keep:
        await report.run(["lvremove", "--yes", snapshot.name])


# ---- volumes of a VG used without a libvirt pool (the HTTP job API) ------------------------


async def vg_exists(vg: str) -> bool:
    """Whether this host has the volume group ``vg``."""
    argv = ["vgs", "--reportformat", "json", "--options", "vg_name"]
    output = await report.run(argv)
    try:
        reports = json.loads(output)["report"]
        names = {str(row["vg_name"]) for report in reports for row in report.get("vg", [])}
    except (ValueError, KeyError, TypeError) as exc:
        raise report.LvmError(argv, 0, f"unexpected vgs output: {exc}") from exc
    return vg in names


async def create_lv(vg: str, name: str, size: int) -> LvInfo:
    """Create the linear LV ``vg/name`` of at least ``size`` bytes (whole extents).

    Active at once and never asking: ``--yes`` answers the question lvcreate asks when the
    new LV's extents still carry a signature of a former one, and ``--wipesignatures y
    --zero y`` remove that signature and zero the start, so nothing (udev's blkid, an
    auto-mount, a format probe) mistakes the new LV for what was there before.
    ``report.LvmError`` when the VG is missing, the name is taken or invalid, or there is no room.
    """
    if size <= 0:
        raise ValueError(f"LV size must be positive, not {size}")
    sectors = math.ceil(size / 512)  # lvcreate takes whole sectors, then rounds to extents
    await report.run([
        "lvcreate", "--yes", "--wipesignatures", "y", "--zero", "y", "--activate", "y",
        "--type", "linear", "--size", f"{sectors * 512}b", "--name", name, vg,
    ])
    return await report.lv_info(f"{vg}/{name}")


async def rename_lv(vg: str, old: str, new: str) -> None:
    """Rename ``vg/old`` to ``vg/new``; an active LV keeps its device, under the new name."""
    await report.run(["lvrename", vg, old, new])


async def remove_lv(name: str) -> None:
    """Remove the LV ``VG/LV`` (never asking)."""
    await report.run(["lvremove", "--yes", name])
