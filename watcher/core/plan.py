"""The reprovision job's one decision: from its facts, a refusal with a reason or the steps.

Why it exists: a job used to ask libvirt, decide a little, ask LVM, decide again. Now it
gathers its facts once (``watcher.reprovision.facts``), this module decides once, and an
executor (``watcher.reprovision.execute``) runs the steps in order. The plan is what logs,
traces and tests look at; nothing here does I/O.

The rules, in the order they are checked (the first that applies is the refusal):

1. the domain XML names a root disk the watcher can write, of format raw;
2. an LV behind it is fit to be written (``lvm_rules.refusal_reason``);
3. the volume is allowed (``volume_rules.refusal``);
4. its size could be read;
5. the image fits, or the volume may be grown (``grow: true``) and can be: it is a
   libvirt storage volume (libvirt grows it) or an LV (``lvextend``).

A plan always marks the domain ``provisioning`` before anything else, checks that it is
shut off right before and right after the write, and never deletes, shrinks or recreates
the volume.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from watcher.core.domain import RootDiskSource
from watcher.core.lvm_rules import LvInfo, refusal_reason
from watcher.core.policy import DomainRule
from watcher.core.volume_rules import VolumeIdentity, lv_paths, refusal

# ---- facts ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageFacts:
    """The verified cache entry to write."""

    name: str
    digest: str
    format: str
    virtual_size: int
    """Bytes the image unpacks to: what the volume must hold."""


@dataclass(frozen=True)
class PoolVolume:
    """The libvirt storage volume at the root disk's path."""

    pool: str
    pool_type: str
    """``logical``, ``dir``, ``disk``..."""
    capacity: int
    """Bytes."""


@dataclass(frozen=True)
class TargetFacts:
    """The root disk's volume, resolved."""

    path: str
    """The source path as the domain XML (or its pool) names it."""
    real_path: str
    """``path`` with symlinks resolved: what is checked is what is written."""
    pool_volume: PoolVolume | None = None
    lv: LvInfo | None = None
    """The logical volume at ``real_path``, if it is one (pool or not)."""
    size: int | None = None
    """Bytes of a plain file or block device; read only once the volume is allowed."""
    size_problem: str | None = None
    """Why ``size`` could not be read."""

    @property
    def capacity(self) -> int | None:
        """Bytes the volume holds, by LVM's, libvirt's or the kernel's account."""
        if self.lv is not None:
            return self.lv.size
        if self.pool_volume is not None:
            return self.pool_volume.capacity
        return self.size

    @property
    def shown(self) -> str:
        """The path for messages: as named, and resolved when that differs."""
        return self.path if self.path == self.real_path else f"{self.path} ({self.real_path})"

    def identity(self) -> VolumeIdentity:
        lv = self.lv
        return VolumeIdentity(self.path, self.real_path, lv_paths(lv.vg, lv.lv) if lv else (),
                              lv.vg if lv else None,
                              self.pool_volume.pool_type if self.pool_volume else None)


@dataclass(frozen=True)
class JobFacts:
    """Everything a reprovision decides on, gathered once."""

    domain: str
    uuid: str
    requested_image: str | None
    """The image the request named (``<reprovision image=...>``), restored if the job defers."""
    image: ImageFacts
    disk: RootDiskSource | None
    """None when ``disk_problem`` says why the XML names no writable disk."""
    disk_problem: str | None = None
    target: TargetFacts | None = None
    """None when the disk was refused before its volume was looked at."""


class VolumeRules(Protocol):
    """Which volumes may be written (``volumes:`` in the daemon config)."""

    @property
    def allow(self) -> Sequence[str]: ...

    @property
    def lvm_vgs(self) -> Sequence[str]: ...


# ---- steps ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class MarkProvisioning:
    """Set ``<provisioning>``: from here on the libvirt hook refuses to start the domain."""

    image: str
    digest: str

    def __str__(self) -> str:
        return f"mark provisioning {self.image} {self.digest[:12]}"


@dataclass(frozen=True)
class CheckShutOff:
    """Confirm the domain is still shut off.

    Before the write, a running domain defers the job (the request is put back); after
    it, the job fails, because the volume content is undefined.
    """

    when: Literal["before write", "after write"]

    def __str__(self) -> str:
        return f"check shut off {self.when}"


@dataclass(frozen=True)
class GrowVolume:
    """Grow a libvirt storage volume (a 'logical' pool's included) to ``size`` bytes."""

    path: str
    size: int

    def __str__(self) -> str:
        return f"grow volume {self.path} to {self.size} bytes"


@dataclass(frozen=True)
class ExtendLv:
    """``lvextend`` an LV no libvirt pool holds to at least ``size`` bytes."""

    lv: str
    size: int

    def __str__(self) -> str:
        return f"extend lv {self.lv} to {self.size} bytes"


@dataclass(frozen=True)
class Snapshot:
    """Take a rollback snapshot of the LV (at least ``min_size`` bytes for a thick one).

    A failure until ``DropSnapshot`` merges it back, so the LV reads as before.
    """

    lv: str
    min_size: int

    def __str__(self) -> str:
        return f"snapshot {self.lv} (at least {self.min_size} bytes)"


@dataclass(frozen=True)
class Discard:
    """Return a thin LV's blocks to its pool, so a sparse write allocates only data."""

    path: str

    def __str__(self) -> str:
        return f"discard {self.path}"


@dataclass(frozen=True)
class WriteImage:
    """Write the image onto ``path`` as raw data."""

    path: str
    target_is_zero: bool
    """The target reads as zeroes (a discarded thin LV): zero ranges need not be written."""

    def __str__(self) -> str:
        return f"write {self.path}" + (" (target is zero)" if self.target_is_zero else "")


@dataclass(frozen=True)
class DropSnapshot:
    """The write is confirmed: remove the rollback snapshot."""

    lv: str

    def __str__(self) -> str:
        return f"drop snapshot of {self.lv}"


@dataclass(frozen=True)
class MarkProvisioned:
    """Set ``<provisioned>``: the job is done."""

    image: str
    digest: str

    def __str__(self) -> str:
        return f"mark provisioned {self.image} {self.digest[:12]}"


@dataclass(frozen=True)
class StartDomain:
    """Start the domain (``start: true``); a failure is logged, the job stays done."""

    def __str__(self) -> str:
        return "start domain"


Step = (MarkProvisioning | CheckShutOff | GrowVolume | ExtendLv | Snapshot | Discard
        | WriteImage | DropSnapshot | MarkProvisioned | StartDomain)


@dataclass(frozen=True)
class Plan:
    """The steps of one reprovision, in order."""

    steps: tuple[Step, ...]
    notes: tuple[str, ...] = ()
    """Things worth a warning that do not stop the job."""

    def describe(self) -> list[str]:
        return [str(step) for step in self.steps]


@dataclass(frozen=True)
class Refusal:
    """Nothing is written; ``reason`` becomes the ``failed`` element's reason."""

    reason: str


# ---- the decision --------------------------------------------------------------------------


def disk_refusal(facts: JobFacts) -> str | None:
    """Why the root disk itself cannot be written (before its volume is looked at)."""
    if facts.disk_problem is not None:
        return facts.disk_problem
    disk = facts.disk
    if disk is None:
        return "the domain has no root disk"
    if disk.format not in (None, "raw"):
        return f"disk {disk.target} has format {disk.format}; only raw volumes are written"
    return None


def volume_refusal(target: TargetFacts, volumes: VolumeRules) -> str | None:
    """Why the resolved volume must not be written: an unfit LV, or not allowed."""
    if target.lv is not None:
        reason = refusal_reason(target.lv)
        if reason is not None:
            return reason
    return refusal(target.identity(), volumes.allow, volumes.lvm_vgs)


def size_plan(virtual_size: int, target: TargetFacts,
              grow: bool) -> Refusal | GrowVolume | ExtendLv | None:
    """None when the image fits; else how the volume grows, or why it cannot."""
    capacity = target.capacity
    if capacity is None:
        return Refusal(target.size_problem or f"the size of {target.shown} is unknown")
    if virtual_size <= capacity:
        return None
    need = f"image needs {virtual_size} bytes, volume {target.real_path} has {capacity}"
    if not grow:
        return Refusal(f"{need}; the policy does not allow growing it (grow: false)")
    if target.pool_volume is not None:
        # libvirt resizes volumes of its pools (LVs of a 'logical' pool included) and knows it.
        return GrowVolume(target.real_path, virtual_size)
    if target.lv is not None:
        return ExtendLv(target.lv.name, virtual_size)
    return Refusal(f"{need}; it is neither a libvirt storage volume nor an LV, so it "
                   "cannot be grown")


def plan(facts: JobFacts, rule: DomainRule, volumes: VolumeRules) -> Refusal | Plan:
    """Refuse with a reason, or the ordered steps that write ``facts.image``."""
    reason = disk_refusal(facts)
    target = facts.target
    if reason is None:
        reason = ("the root disk's volume was not resolved" if target is None
                  else volume_refusal(target, volumes) or target.size_problem)
    if reason is not None:
        return Refusal(reason)
    assert target is not None
    image = facts.image
    sizing = size_plan(image.virtual_size, target, rule.grow)
    if isinstance(sizing, Refusal):
        return sizing

    lv = target.lv
    steps: list[Step] = [MarkProvisioning(image.name, image.digest), CheckShutOff("before write")]
    if sizing is not None:
        steps.append(sizing)
    notes: list[str] = []
    guarded = bool(rule.snapshot) and lv is not None
    if lv is not None and rule.snapshot:
        steps.append(Snapshot(lv.name, rule.snapshot))
    elif rule.snapshot:
        notes.append("policy asks for a rollback snapshot but the root disk is not an LV; "
                     "writing without one")
    thin = lv is not None and lv.is_thin
    if lv is not None and thin:
        # After the snapshot: the snapshot still holds the blocks the discard frees.
        steps.append(Discard(lv.path))
    steps += [WriteImage(target.real_path, target_is_zero=thin), CheckShutOff("after write")]
    if lv is not None and guarded:
        steps.append(DropSnapshot(lv.name))
    steps.append(MarkProvisioned(image.name, image.digest))
    if rule.start:
        steps.append(StartDomain())
    return Plan(tuple(steps), tuple(notes))
