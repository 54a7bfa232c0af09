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
shut off right before and right after the write, and never shrinks the volume.

Copy or clone: with ``clone: auto`` (the default) a root disk that is a thin LV is not
written. A thin snapshot of the image's golden LV (one per image and thin pool, written
once from the cache) takes its place under the same VG/LV name: the swap renames the old
LV to ``<lv>-vw-prev``, creates the clone as ``<lv>``, records ``provisioned``, and only
then removes the old LV. Every other rule above applies to both paths. A swap a crash
interrupted is recognised from LVM alone (``lvm_rules.SwapLeftover``); the plan for such
a disk is a recovery plan that puts the VG back to one LV, after which the job plans
again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from watcher.core.domain import RootDiskSource
from watcher.core.lvm_rules import (
    LvInfo,
    SwapLeftover,
    carried_tags,
    clone_names_fit,
    golden_name,
    prev_name,
    refusal_reason,
)
from watcher.core.policy import DomainRule
from watcher.core.steps import (
    ActivateLv,
    CheckShutOff,
    CloneGolden,
    Discard,
    DropPrevious,
    DropSnapshot,
    ExtendLv,
    GrowClone,
    GrowVolume,
    MakeGolden,
    MarkProvisioned,
    MarkProvisioning,
    Plan,
    Refusal,
    RemoveLv,
    RenameLv,
    Snapshot,
    StartDomain,
    Step,
    SwapOut,
    WriteImage,
)
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
    golden: LvInfo | None = None
    """The golden LV of the image in the thin pool of ``lv``, when it exists already."""
    swap: SwapLeftover | None = None
    """What an interrupted clone swap of this LV left behind, if anything."""

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
        vg_lv = (lv.vg, lv.lv) if lv else (self.swap.vg, self.swap.lv) if self.swap else None
        return VolumeIdentity(self.path, self.real_path, lv_paths(*vg_lv) if vg_lv else (),
                              vg_lv[0] if vg_lv else None,
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
    if reason is None and target is None:
        reason = "the root disk's volume was not resolved"
    if reason is None and target is not None and target.swap is not None:
        # The LV may be missing (renamed away): only the allow-list can be checked.
        reason = refusal(target.identity(), volumes.allow, volumes.lvm_vgs)
        return Refusal(reason) if reason else recovery_plan(target.swap)
    if reason is None and target is not None:
        reason = volume_refusal(target, volumes) or target.size_problem
    if reason is not None:
        return Refusal(reason)
    assert target is not None
    image = facts.image
    sizing = size_plan(image.virtual_size, target, rule.grow)
    if isinstance(sizing, Refusal):
        return sizing

    lv = target.lv
    if (rule.clone == "auto" and lv is not None and lv.is_thin and lv.pool is not None
            and clone_names_fit(lv.lv)):
        return clone_plan(facts, lv, target.golden, rule)
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


def clone_plan(facts: JobFacts, lv: LvInfo, golden: LvInfo | None, rule: DomainRule) -> Plan:
    """The steps that put a thin snapshot of the image's golden LV in place of ``lv``.

    The refusals were checked already; a too small LV that may grow simply gets the
    golden's size. ``snapshot:`` is not needed: the old LV itself is the rollback.
    """
    image = facts.image
    assert lv.pool is not None
    name = golden_name(image.digest, lv.pool)
    extent = max(lv.extent_size, 1)
    golden_size = golden.size if golden else -(-image.virtual_size // extent) * extent
    previous = prev_name(lv.lv)
    steps: list[Step] = [MarkProvisioning(image.name, image.digest)]
    if golden is None:
        steps.append(MakeGolden(lv.vg, lv.pool, name, image.digest, image.virtual_size))
    steps += [CheckShutOff("before write"), SwapOut(lv.vg, lv.lv, previous),
              CloneGolden(f"{lv.vg}/{name}", lv.name, carried_tags(lv.tags))]
    if lv.size > golden_size:
        steps.append(GrowClone(lv.name, lv.size))
    steps += [CheckShutOff("after write"), MarkProvisioned(image.name, image.digest)]
    if rule.start:
        steps.append(StartDomain())  # the old LV's removal need not hold the domain back
    steps.append(DropPrevious(f"{lv.vg}/{previous}"))
    return Plan(tuple(steps))


def recovery_plan(swap: SwapLeftover) -> Plan:
    """The steps that bring an interrupted swap of ``swap.vg/swap.lv`` back to one LV.

    Before the clone exists the old LV is renamed back; once it exists it is finished
    (it may have been recorded already). Either way the domain is still marked
    ``provisioning`` or ``provisioned`` with what the LV now holds, and the job plans again.
    """
    vg, lv = swap.vg, swap.lv
    previous = f"{vg}/{prev_name(lv)}"
    if not swap.cloned:
        return Plan((RenameLv(vg, prev_name(lv), lv),), recovery=True)
    steps: list[Step] = []
    if not swap.lv_active:
        steps.append(ActivateLv(f"{vg}/{lv}"))
    if swap.lv_size < swap.previous_size:
        steps.append(GrowClone(f"{vg}/{lv}", swap.previous_size))
    steps.append(RemoveLv(previous, "replaced by the clone of an interrupted swap"))
    return Plan(tuple(steps), recovery=True)
