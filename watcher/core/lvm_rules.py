"""What the watcher knows about an LVM logical volume, and when it must not write one.

Writing an image onto the wrong LV destroys data that no retry brings back, so the
rules live here as a pure function over a snapshot of the LV's state, testable without
LVM. ``watcher.adapters.lvm`` fills ``LvInfo`` from ``lvs``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LvInfo:
    """One logical volume as ``lvs`` reported it at one moment."""

    vg: str
    """Volume group name."""
    lv: str
    """Logical volume name (hidden LVs without their brackets)."""
    path: str
    """``/dev/VG/LV`` when LVM creates such a link, else ``/dev/mapper/VG-LV``."""
    size: int
    """Size in bytes."""
    active: bool
    """Whether the LV is active on this host (has a device node)."""
    device_open: bool
    """Whether some process (or another device) holds the LV's device open."""
    is_snapshot: bool
    """A thick (COW) snapshot or a thin snapshot of another LV."""
    is_thin_pool: bool
    """The thin pool itself, not a volume carved from it."""
    is_thin: bool
    """A thin volume: blocks are allocated from ``pool`` on first write."""
    pool: str | None
    """The thin pool a thin volume lives in, else None."""
    extent_size: int
    """The VG's extent size in bytes: LV sizes are multiples of it."""
    data_percent: float | None
    """Percent of the LV's data allocated (thin volumes and pools, snapshots), else None."""
    origin: str | None
    """The LV a snapshot was taken of, else None."""
    internal: bool = False
    """A hidden part of another LV (a thin pool's data or metadata, a spare, ``-real``)."""
    merging: bool = False
    """A snapshot is being merged into (or out of) this LV."""

    @property
    def name(self) -> str:
        """``VG/LV``, the form every LVM command accepts."""
        return f"{self.vg}/{self.lv}"


def refusal_reason(info: LvInfo) -> str | None:
    """Why the watcher must not write ``info``'s LV, or None when it may.

    A thin pool or an internal LV holds other volumes' data; a snapshot is somebody's
    point-in-time copy; an inactive LV has no device to write; an open one is in use
    (a running VM, a mount, a backup), and a merging one is being rewritten by LVM.
    """
    if info.is_thin_pool:
        return f"{info.name} is a thin pool, not a volume"
    if info.internal:
        return f"{info.name} is an internal part of another logical volume"
    if info.is_snapshot:
        return f"{info.name} is a snapshot of {info.vg}/{info.origin}"
    if info.merging:
        return f"{info.name} has a snapshot merge in progress"
    if not info.active:
        return f"{info.name} is not active"
    if info.device_open:
        return f"{info.name} is open by another process or device"
    return None


def cow_snapshot_size(info: LvInfo, requested: int) -> int:
    """The size to give a thick LV's rollback snapshot of at least ``requested`` bytes.

    At least the whole LV plus room for the snapshot's own metadata, because a full
    write changes every block and a snapshot that overflows is invalidated and can no
    longer be merged back. The policy's size is therefore a lower bound; thin snapshots
    ignore it.
    """
    return max(requested, info.size + info.size // 50 + info.extent_size)
