"""An API job's one decision: from its facts, a refusal with a reason or the steps.

Why it exists: a job of the HTTP job API (DESIGN.md, "HTTP job API") writes an image
onto a volume of ``api.pool`` that no domain's metadata names, so the domain-side plan
(``watcher.core.plan``) does not apply; the checks do, and they are the same: this module
decides once, on frozen facts, and the one executor (``watcher.executor``) runs the steps.

The rules, in the order they are checked (the first that applies is the refusal):

1. ``api.pool`` is a libvirt pool of a type whose volumes are files or LVs
   (``logical``, ``dir``, ``fs``, ``netfs``), active, or else an LVM volume group;
2. an existing volume is raw (a ``dir`` pool's qcow2 volume is never overwritten with
   raw data behind its domain's back) and, when it is an LV, fit to be written;
3. no domain that is not shut off has a disk on it, and no process has it open;
4. the image fits: its virtual size is at most the volume's size after the job, which is
   the larger of the volume's capacity and the size asked for (never shrunk).

A missing volume is created with the size asked for. The plan checks again, right before
the write (after the start interlock is in place) and right after it, that nothing uses
the volume; nothing is ever deleted or shrunk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from watcher.core.lvm_rules import LvInfo, refusal_reason
from watcher.core.plan import ImageFacts
from watcher.core.steps import (
    CheckUnused,
    CreateVolume,
    Discard,
    ExtendLv,
    GrowVolume,
    Plan,
    Refusal,
    Step,
    WriteImage,
)

WRITABLE_POOL_TYPES = frozenset({"logical", "dir", "fs", "netfs"})
"""libvirt pool types whose volumes are LVs or plain files the job can write."""


@dataclass(frozen=True)
class DiskUserFact:
    """A domain with a disk on the volume."""

    name: str
    power: str
    shut_off: bool


@dataclass(frozen=True)
class ExistingVolume:
    path: str
    real_path: str
    capacity: int
    """Bytes."""
    format: str | None = None
    """The libvirt volume's format (``raw``, ``qcow2``...); None when LVM alone knows it."""
    lv: LvInfo | None = None


@dataclass(frozen=True)
class VolumeJobFacts:
    """Everything an API job decides on, gathered once."""

    pool: str
    pool_kind: Literal["pool", "vg"] | None
    """A libvirt pool, an LVM volume group used without one, or None: neither exists."""
    volume: str
    requested_size: int
    """``volume_size_gb`` in bytes."""
    image: ImageFacts
    pool_type: str | None = None
    pool_active: bool = True
    existing: ExistingVolume | None = None
    users: tuple[DiskUserFact, ...] = ()
    openers: tuple[str, ...] = ()
    """What holds the volume open: ``process 1234``, or a device stacked on it
    (``/dev/loop3``, a device-mapper device) or a mount point."""


# ---- the decision --------------------------------------------------------------------------


def pool_refusal(facts: VolumeJobFacts) -> str | None:
    """Why ``api.pool`` cannot hold the job's volume."""
    if facts.pool_kind is None:
        return f"api.pool {facts.pool!r} is neither a libvirt storage pool nor an LVM volume group"
    if facts.pool_kind == "vg":
        return None
    if facts.pool_type not in WRITABLE_POOL_TYPES:
        return (f"pool {facts.pool} has type {facts.pool_type}; only "
                f"{', '.join(sorted(WRITABLE_POOL_TYPES))} pools are written")
    if not facts.pool_active:
        return f"pool {facts.pool} is not active"
    return None


def usage_refusal(users: tuple[DiskUserFact, ...], openers: tuple[str, ...],
                  shown: str) -> str | None:
    """Why the volume ``shown`` must not be written now: who uses it."""
    busy = [user for user in users if not user.shut_off]
    if busy:
        named = ", ".join(f"{user.name} ({user.power})" for user in busy)
        return f"volume {shown} is in use by domain {named}; shut it off first"
    if openers:
        return f"volume {shown} is open by {', '.join(openers)}"
    return None


def plan_volume_job(facts: VolumeJobFacts) -> Refusal | Plan:
    """Refuse with a reason, or the ordered steps that write ``facts.image``."""
    reason = pool_refusal(facts)
    if reason is not None:
        return Refusal(reason)
    shown = f"{facts.pool}/{facts.volume}"
    existing = facts.existing
    image = facts.image
    steps: list[Step] = []
    if existing is None:
        if image.virtual_size > facts.requested_size:
            return Refusal(_too_small(image, facts.requested_size, shown))
        via: Literal["libvirt", "lvcreate"] = "libvirt" if facts.pool_kind == "pool" else "lvcreate"
        steps.append(CreateVolume(facts.pool, facts.volume, facts.requested_size, via))
        # A new file of a directory pool is sparse: its unwritten ranges read as zeroes.
        zero = facts.pool_kind == "pool" and facts.pool_type != "logical"
        steps += [CheckUnused("before write"), WriteImage(None, target_is_zero=zero),
                  CheckUnused("after write")]
        return Plan(tuple(steps))

    if existing.format not in (None, "raw"):
        return Refusal(f"volume {shown} has format {existing.format}; only raw volumes are "
                       "written")
    lv = existing.lv
    if lv is not None:
        reason = refusal_reason(lv)
        if reason is not None:
            return Refusal(reason)
    reason = usage_refusal(facts.users, facts.openers, shown)
    if reason is not None:
        return Refusal(reason)
    final = max(existing.capacity, facts.requested_size)
    if image.virtual_size > final:
        return Refusal(_too_small(image, final, shown))
    if existing.capacity < facts.requested_size:
        steps.append(GrowVolume(existing.real_path, facts.requested_size)
                     if facts.pool_kind == "pool" or lv is None
                     else ExtendLv(lv.name, facts.requested_size))
    steps.append(CheckUnused("before write"))
    thin = lv is not None and lv.is_thin
    if lv is not None and thin:
        steps.append(Discard(lv.path))
    steps += [WriteImage(None, target_is_zero=thin), CheckUnused("after write")]
    return Plan(tuple(steps))


def _too_small(image: ImageFacts, size: int, shown: str) -> str:
    gib = -(-image.virtual_size // 1024**3)
    return (f"image needs {image.virtual_size} bytes, volume {shown} would have {size}; "
            f"ask for volume_size_gb of at least {gib}")
