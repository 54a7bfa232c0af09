"""What the watcher knows about an LVM logical volume, and when it must not write one.

Writing an image onto the wrong LV destroys data that no retry brings back, so the
rules live here as a pure function over a snapshot of the LV's state, testable without
LVM. ``watcher.adapters.lvm`` fills ``LvInfo`` from ``lvs``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

OWNER_TAG = "libvirt-volume-watcher"
"""Carried by every LV the watcher creates for itself (goldens): ``lvs @libvirt-volume-watcher``."""
GOLDEN_TAG = "vw-golden"
"""Marks a golden LV: the read-only image a thin-LV root disk is cloned from."""
DIGEST_TAG_PREFIX = "vw-sha256="
"""Followed by the image's SHA-256: which cache entry a golden was written from."""
GOLDEN_PREFIX = "lvw-golden-"
PREV_SUFFIX = "-vw-prev"
"""The LV a clone replaced, kept as the rollback until the clone is recorded provisioned."""
PARTIAL_SUFFIX = "-part"
"""A golden being written: renamed to its final name only once complete."""
MAX_LV_NAME = 127
"""LVM's limit on a logical volume's name."""


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
    tags: tuple[str, ...] = ()
    """The LV's tags (``lv_tags``)."""
    origin_is_golden: bool = False
    """A thin snapshot whose origin is one of the watcher's golden LVs: a reprovisioned disk."""
    activation_skip: bool = False
    """The LV has the activation-skip flag: ``vgchange -ay`` leaves it inactive."""

    @property
    def is_golden(self) -> bool:
        """One of the watcher's golden LVs (never a domain's disk)."""
        return GOLDEN_TAG in self.tags

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
    if info.is_golden:
        return f"{info.name} is a golden image LV of the watcher, not a domain's disk"
    if info.is_snapshot and not (info.is_thin and info.origin_is_golden):
        # A clone of a golden is a disk the watcher made: it is the domain's, not a copy.
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


# ---- thin clones: names and tags, recognisable from LVM alone ----------------------------


def golden_name(digest: str, pool: str) -> str:
    """The golden LV of image ``digest`` in thin pool ``pool`` (an LV name in the pool's VG).

    Deterministic, so any run finds the golden another made; the pool is part of the name
    because a VG can hold several pools and a thin snapshot stays in its origin's pool.
    A pool name too long for that is replaced by a hash of it.
    """
    name = f"{GOLDEN_PREFIX}{digest[:16]}-{pool}"
    if len(name) + len(PARTIAL_SUFFIX) > MAX_LV_NAME:
        name = f"{GOLDEN_PREFIX}{digest[:16]}-{hashlib.sha256(pool.encode()).hexdigest()[:16]}"
    return name


def digest_tag(digest: str) -> str:
    return f"{DIGEST_TAG_PREFIX}{digest}"


def golden_tags(digest: str) -> tuple[str, ...]:
    """The tags a golden LV carries."""
    return (OWNER_TAG, GOLDEN_TAG, digest_tag(digest))


def golden_digest(info: LvInfo) -> str | None:
    """The image digest a golden LV was written from, from its tag."""
    for tag in info.tags:
        if tag.startswith(DIGEST_TAG_PREFIX):
            return tag[len(DIGEST_TAG_PREFIX):]
    return None


def carried_tags(tags: Iterable[str]) -> tuple[str, ...]:
    """The tags of a domain's LV its clone takes over (the watcher's own golden tags stay)."""
    own = (GOLDEN_TAG, OWNER_TAG)
    return tuple(t for t in dict.fromkeys(tags)
                 if t not in own and not t.startswith(DIGEST_TAG_PREFIX))


def prev_name(lv: str) -> str:
    return f"{lv}{PREV_SUFFIX}"


def clone_names_fit(lv: str) -> bool:
    """Whether the swap's temporary names of ``lv`` stay within LVM's limit."""
    return len(lv) + len(PREV_SUFFIX) <= MAX_LV_NAME


@dataclass(frozen=True)
class SwapLeftover:
    """What a clone swap stopped halfway (a crash) left of the LV ``vg/lv``.

    The swap runs: rename ``<lv>`` to ``<lv>-vw-prev`` → create the clone as ``<lv>`` (a
    thin snapshot, tags included, active) → extend it to the old size → record
    ``provisioned`` → remove ``<lv>-vw-prev``. So LVM alone says how far it came:

    - ``<lv>-vw-prev`` and no ``<lv>``: the old LV was renamed away (rename it back);
    - ``<lv>-vw-prev`` and ``<lv>``: the clone exists and may already be recorded, so it is
      finished, never undone: activated if it is not, extended to the old LV's size if it
      is smaller, and the old LV removed.
    """

    vg: str
    lv: str
    lv_exists: bool
    lv_active: bool
    lv_size: int
    """Bytes of ``<lv>`` (0 when it does not exist)."""
    previous_size: int
    """Bytes of ``<lv>-vw-prev``: the size the clone must reach."""

    @property
    def cloned(self) -> bool:
        """The clone exists under the LV's name."""
        return self.lv_exists


def swap_leftover(vg: str, lv: str, lvs: Iterable[LvInfo]) -> SwapLeftover | None:
    """The leftover of an interrupted swap of ``vg/lv`` among the VG's ``lvs``, if any."""
    by_name = {info.lv: info for info in lvs}
    previous = by_name.get(prev_name(lv))
    if previous is None:
        return None
    current = by_name.get(lv)
    return SwapLeftover(vg, lv, current is not None, current is not None and current.active,
                        current.size if current else 0, previous.size)


def lv_from_path(path: str) -> tuple[str, str] | None:
    """``(VG, LV)`` named by ``/dev/VG/LV`` or ``/dev/mapper/VG-LV`` (``--`` is a ``-``), even
    when no such device exists (a swap renamed it away); None for any other path."""
    parts = path.split("/")
    if len(parts) == 4 and parts[0] == "" and parts[1] == "dev" and parts[2] != "mapper":
        vg, lv = parts[2], parts[3]
        return (vg, lv) if vg and lv else None
    if len(parts) == 4 and parts[:3] == ["", "dev", "mapper"]:
        mapped, index = parts[3], 0
        while True:  # the VG ends at the first single '-'
            index = mapped.find("-", index)
            if index <= 0:
                return None
            if mapped[index + 1:index + 2] == "-":
                index += 2
                continue
            vg, lv = mapped[:index], mapped[index + 1:]
            return (vg.replace("--", "-"), lv.replace("--", "-")) if lv else None
    return None
