"""Writing an image onto a logical volume: recognise it, grow it, keep a way back.

Why it exists: most operators point a domain's disk straight at ``/dev/VG/LV``, often with
no libvirt pool, so the reprovision job needs LVM's own view of the device before it
writes. This module is that step, kept apart from the job so the LVM suite (inside a
User-Mode Linux guest, where device-mapper exists) runs the exact code the job runs.

- ``recognise``: is the block device an LV, and may it be written (active, not open, not
  a snapshot or thin pool)?
- ``grow``: ``lvextend`` an LV that is not in a libvirt pool; never shrinks.
- ``guarded_write``: around the write, an optional rollback snapshot that is merged back
  when the write (or the check after it) fails, and for a thin LV a discard first so the
  write (with ``--target-is-zero``) allocates nothing for unallocated image ranges. A
  thick LV is written with zeroes where the image has none, as any reused disk must be.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import AsyncIterator

from watcher.adapters import lvm
from watcher.core.errors import PermanentError
from watcher.core.lvm_rules import LvInfo, refusal_reason


class LvRefused(PermanentError):
    """The LV must not be written; the message is the ``failed`` reason."""


def _is_block_device(path: str) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


async def recognise(real_path: str) -> LvInfo | None:
    """The LV at ``real_path`` (None when it is not a block device or not an LV).

    Raises ``LvRefused`` when the LV exists but must not be written.
    """
    if not _is_block_device(real_path):
        return None
    info = await lvm.lv_for_device(real_path)
    if info is None:
        return None
    reason = refusal_reason(info)
    if reason is not None:
        raise LvRefused(reason)
    return info


async def grow(info: LvInfo, min_size: int) -> LvInfo:
    """Extend the LV to at least ``min_size`` bytes (rounded up to whole extents)."""
    grown = await lvm.extend(info, min_size)
    if grown.size < min_size:
        raise LvRefused(f"growing {info.name} to {min_size} bytes left {grown.size}")
    return grown


def cow_snapshot_size(info: LvInfo, requested: int) -> int:
    """The size to give a thick LV's rollback snapshot: at least the whole LV plus room
    for the snapshot's own metadata, because a full write changes every block and a
    snapshot that overflows is invalidated and can no longer be merged back. The policy's
    size is therefore a lower bound; thin snapshots ignore it.
    """
    return max(requested, info.size + info.size // 50 + info.extent_size)


@contextlib.asynccontextmanager
async def guarded_write(info: LvInfo | None, snapshot_size: int | None) -> AsyncIterator[bool]:
    """Prepare the target; yields whether the writer may pass ``--target-is-zero``.

    With ``snapshot_size`` (and an LV), a failure inside the block merges the snapshot
    back so the LV reads exactly as before, then re-raises; success removes it.
    """
    if info is None:
        yield False
        return
    guard = (lvm.rollback_snapshot(info, cow_snapshot_size(info, snapshot_size))
             if snapshot_size else contextlib.nullcontext())
    async with guard:
        # Discard after the snapshot exists: the snapshot still holds the old blocks.
        if info.is_thin:
            await lvm.discard(info.path)
        yield info.is_thin
