"""The one executor: any plan's steps, each through its adapter, logged and traced.

Why it exists: a decision (``watcher.core.plan`` for a tagged domain,
``watcher.core.volume_plan`` for an API job) says what to do; this module only does it,
one step at a time and in order, so what runs is exactly what the plan (and its log
line) says. The two kinds of job differ in their trigger and in the steps their plan
holds (only a domain's has metadata marks, shut-off checks and a start), never in how a
step is done.

A rollback snapshot taken by one step guards every later step until ``DropSnapshot``: a
failure in between merges it back before the error travels on, and the error then says
whether the volume was rolled back. A clone works the same way: from ``SwapOut`` on, the
old LV and the clone are guarded until ``DropPrevious``; a failure before
``MarkProvisioned`` removes the clone and puts the old LV back under its name.

The write marker (``watcher.adapters.write_markers``: one writer per volume, and the
libvirt hook holds back every domain with a disk on it) is taken by the first of
``CheckUnused("before write")``, ``SwapOut`` and ``WriteImage``, and held until
``MarkProvisioned`` or the end of the plan, so a rollback runs while it is still held.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from watcher import telemetry
from watcher.adapters import lvm, write_markers
from watcher.adapters.qemu_img import WriteImageFunction
from watcher.core.domain import DomainState
from watcher.core.errors import PermanentError, PermanentImageWriteError, Refused, WatcherError
from watcher.core.lvm_rules import LvInfo, cow_snapshot_size
from watcher.core.plan import ImageFacts, JobFacts
from watcher.core.steps import (
    ActivateLv,
    CheckShutOff,
    CheckUnused,
    CloneGolden,
    CreateVolume,
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
    RemoveLv,
    RenameLv,
    Snapshot,
    StartDomain,
    Step,
    SwapOut,
    WriteImage,
)
from watcher.core.volume_plan import ExistingVolume, usage_refusal
from watcher.executor.calls import PlanCalls, users_of
from watcher.executor.goldens import Goldens


class Deferred(WatcherError):
    """The domain started before the write began; the request waits for the next stop."""


class WriteFailed(PermanentError):
    """The write failed for good; the message says whether the volume was rolled back."""

    def __init__(self, cause: PermanentImageWriteError, *, rolled_back: bool) -> None:
        outcome = ("the volume was rolled back to its previous content" if rolled_back
                   else "the volume may hold a partial image")
        super().__init__(f"{cause}; {outcome}")
        self.cause = cause
        self.rolled_back = rolled_back


class GoldenFailed(PermanentError):
    """Writing the golden LV failed; the domain's LV was not touched."""


@dataclass(frozen=True)
class DomainRef:
    """The domain whose root disk the plan writes: its marks, checks and start."""

    uuid: str
    name: str
    requested_image: str | None
    """The image its tag asked for (None: the policy's), put back when deferred."""


@dataclass
class Target:
    """The volume a plan writes, as its steps find and change it."""

    pool: str | None
    """Its libvirt pool or bare VG, when known (the write marker names it)."""
    volume: str | None = None
    """Its name in ``pool`` (an API job's volume)."""
    path: str | None = None
    real_path: str | None = None
    lv: LvInfo | None = None
    """Its LV as it is now: a grow step changes it, the snapshot step needs it."""
    touched: bool = False
    """A step changed the volume (created, grown, discarded or began writing it)."""
    wrote: bool = False
    """The write began: the volume may hold a partial image."""

    def found(self, existing: ExistingVolume | None) -> None:
        """Take the path and LV of the volume an API job's facts found (None: none yet)."""
        if existing is not None:
            self.path, self.real_path, self.lv = existing.path, existing.real_path, existing.lv

    @classmethod
    def of_domain(cls, facts: JobFacts) -> Target:
        target = facts.target
        if target is None:
            return cls(None)
        pool = target.pool_volume.pool if target.pool_volume else None
        return cls(pool, None, target.path, target.real_path, target.lv)


_SPAN_NAMES: dict[type[Any], str] = {
    MarkProvisioning: "metadata update", MarkProvisioned: "metadata update",
    CheckShutOff: "check shut off", CheckUnused: "check unused", CreateVolume: "create",
    GrowVolume: "grow", ExtendLv: "grow", Snapshot: "snapshot", Discard: "discard",
    WriteImage: "write", DropSnapshot: "snapshot", StartDomain: "start", MakeGolden: "golden",
    SwapOut: "swap", CloneGolden: "clone", GrowClone: "grow", DropPrevious: "swap",
    ActivateLv: "recover", RenameLv: "recover", RemoveLv: "recover",
}


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class Executor:
    """Runs one plan: a tagged domain's (``domain`` set) or an API job's."""

    calls: PlanCalls
    write_image: WriteImageFunction
    image: ImageFacts
    source: Path
    """The cache entry's data file."""
    target: Target
    log: Any
    writer: str
    """Who the write marker names: ``reprovision <domain>`` or an API job's id."""
    domain: DomainRef | None = None
    goldens: Goldens | None = None
    """Makes the golden LVs a clone plan needs; required for one."""
    on_progress: Callable[[float], None] | None = None
    """The write's percent, as qemu-img reports it."""
    on_writing: Callable[[], None] | None = None
    """Called once, right before the write starts."""
    swap: lvm.CloneSwap | None = None
    """The clone on its way in, from ``SwapOut`` to ``DropPrevious``."""
    marker: contextlib.ExitStack | None = None
    """Holds the write marker, once a step took it, until ``MarkProvisioned``."""
    _guarded: bool = False
    """A rollback snapshot guards the steps running now."""
    _marked: bool = False
    """The write marker was taken (and is held until ``marker`` closes)."""
    current: Step | None = None
    """The step running now, or the one that stopped the plan."""

    @classmethod
    def for_domain(cls, calls: PlanCalls, write_image: WriteImageFunction, facts: JobFacts,
                   source: Path, log: Any, *, goldens: Goldens | None = None) -> Executor:
        """The executor of a reprovision of ``facts``' domain."""
        return cls(calls, write_image, facts.image, source, Target.of_domain(facts), log,
                   f"reprovision {facts.domain}",
                   DomainRef(facts.uuid, facts.domain, facts.requested_image),
                   goldens=goldens)

    async def run(self, plan: Plan) -> None:
        """Run every step; raise what stopped it (``Deferred``, a refusal, a failure)."""
        for note in plan.notes:
            self.log.warning(note)
        self._guarded = self._marked = False
        try:
            with contextlib.ExitStack() as marker:
                self.marker = marker
                async with contextlib.AsyncExitStack() as guard:
                    for step in plan.steps:
                        await self._traced(step, guard)
        except PermanentImageWriteError as exc:
            # Still guarded here means the snapshot was merged back: a failed merge
            # raises LvmError instead.
            raise WriteFailed(exc, rolled_back=self._guarded) from exc

    async def _traced(self, step: Step, guard: contextlib.AsyncExitStack) -> None:
        self.log.debug("reprovision step" if self.domain else "api job step", step=str(step))
        self.current = step
        with telemetry.tracer.start_as_current_span(_SPAN_NAMES[type(step)]) as span:
            span.set_attribute("step", str(step))
            if isinstance(step, Snapshot):
                await guard.enter_async_context(self._snapshot(step))
                self._guarded = True
            elif isinstance(step, DropSnapshot):
                await guard.aclose()  # success: the snapshot is removed
                self._guarded = False
            elif isinstance(step, SwapOut):
                await self._swap_out(step, guard)
            elif isinstance(step, DropPrevious):
                await self._drop_previous(step, guard)
            else:
                await self._run(step)
                if isinstance(step, MarkProvisioned) and self.marker is not None:
                    self.marker.close()  # recorded: the volume is the domain's again

    def _hold_marker(self, path: str) -> None:
        assert self.marker is not None
        if not self._marked:
            self.marker.enter_context(write_markers.marked_writing(
                path, pool=self.target.pool, volume=self.target.volume, job_id=self.writer))
            self._marked = True

    def _refused(self, reason: str) -> Refused:
        return Refused(reason, touched=self.target.touched)

    async def _swap_out(self, step: SwapOut, guard: contextlib.AsyncExitStack) -> None:
        assert self.target.real_path is not None
        self._hold_marker(self.target.real_path)
        self.swap = await guard.enter_async_context(lvm.swapping_in(step.vg, step.lv))
        await self.swap.rename_old()
        self.target.touched = True
        self.log.info("old lv renamed away", lv=f"{step.vg}/{step.lv}",
                      previous=f"{step.vg}/{step.previous}")

    async def _clone(self, step: CloneGolden) -> None:
        assert self.goldens is not None and self.swap is not None
        vg, _, golden = step.golden.partition("/")
        async with self.goldens.held(vg, golden):  # not removed while it is cloned
            await self.swap.clone(step.golden, step.tags)
        self.log.info("golden lv cloned", golden=step.golden, clone=step.clone)

    async def _drop_previous(self, step: DropPrevious,
                             guard: contextlib.AsyncExitStack) -> None:
        try:
            await guard.aclose()  # success: the old LV is removed
        except lvm.LvmError as exc:
            # The result is recorded; the next run of this domain removes the leftover.
            self.log.warning("removing the previous lv failed; it is removed at the next "
                             "reprovision of this domain", lv=step.lv, error=str(exc))
        self.swap = None

    def _snapshot(self, step: Snapshot) -> contextlib.AbstractAsyncContextManager[LvInfo]:
        lv = self.target.lv
        assert lv is not None and lv.name == step.lv
        return lvm.rollback_snapshot(lv, cow_snapshot_size(lv, step.min_size))

    async def _run(self, step: Step) -> None:
        handlers: dict[type[Any], Callable[[Any], Awaitable[None]]] = {
            MarkProvisioning: self._mark, MarkProvisioned: self._mark,
            CheckShutOff: self._check_shut_off, CheckUnused: self._check_unused,
            CreateVolume: self._create, GrowVolume: self._grow_volume,
            ExtendLv: self._extend_lv, Discard: self._discard, WriteImage: self._write,
            StartDomain: self._start, MakeGolden: self._make_golden,
            CloneGolden: self._clone, GrowClone: self._grow_clone, ActivateLv: self._activate,
            RenameLv: self._rename, RemoveLv: self._remove,
        }
        await handlers[type(step)](step)

    def _domain(self) -> DomainRef:
        assert self.domain is not None, "a domain step in a plan without a domain"
        return self.domain

    async def _mark(self, step: MarkProvisioning | MarkProvisioned) -> None:
        kind: Literal["provisioning", "provisioned"] = (
            "provisioning" if isinstance(step, MarkProvisioning) else "provisioned")
        await self.calls.set_state(self._domain().uuid, DomainState(
            kind, step.image, step.digest, _now()))

    async def _create(self, step: CreateVolume) -> None:
        if step.via == "libvirt":
            path = (await self.calls.create_volume(step.pool, step.volume, step.size)).path
        else:
            path = (await lvm.create_lv(step.pool, step.volume, step.size)).path
        self.target.touched = True
        self.target.path = path
        self.target.real_path = await asyncio.to_thread(os.path.realpath, path)
        self.log.info("volume created", pool=step.pool, volume=step.volume, path=path,
                      size=step.size)

    async def _grow_volume(self, step: GrowVolume) -> None:
        grown = await self.calls.grow_volume(step.path, step.size)
        self.target.touched = True
        if grown.capacity < step.size:
            raise self._refused(f"growing {step.path} to {step.size} bytes left "
                                f"{grown.capacity}")
        self.log.info("volume grown", path=step.path, capacity=grown.capacity)
        if self.target.lv is not None:
            # An LV of a 'logical' pool: LVM's view of it is needed for the snapshot.
            self.target.lv = await lvm.recognise(step.path)
            if self.target.lv is None:
                raise self._refused(f"{step.path} is no longer a logical volume after "
                                    "growing it")

    async def _extend_lv(self, step: ExtendLv) -> None:
        assert self.target.lv is not None
        self.target.lv = await lvm.grow(self.target.lv, step.size)
        self.target.touched = True
        self.log.info("logical volume grown", lv=self.target.lv.name, size=self.target.lv.size)

    async def _make_golden(self, step: MakeGolden) -> None:
        assert self.goldens is not None
        try:
            await self.goldens.ensure(step.vg, step.pool, step.digest, step.size, self.source,
                                      self.image.format)
        except PermanentImageWriteError as exc:
            raise GoldenFailed(f"writing the golden lv {step.vg}/{step.name} failed: {exc}; "
                               "the domain's lv was not touched") from exc

    async def _grow_clone(self, step: GrowClone) -> None:
        if self.swap is not None:
            await self.swap.grow(step.size)
        else:  # recovery of a swap whose clone was not grown yet
            await lvm.extend_to(step.lv, step.size)
        self.log.info("clone grown", lv=step.lv, size=step.size)

    async def _activate(self, step: ActivateLv) -> None:
        await lvm.activate(step.lv)
        self.log.info("interrupted swap: clone activated", lv=step.lv)

    async def _rename(self, step: RenameLv) -> None:
        await lvm.rename_lv(step.vg, step.old, step.new)
        self.log.info("interrupted swap: lv renamed back", lv=f"{step.vg}/{step.new}")

    async def _remove(self, step: RemoveLv) -> None:
        await lvm.remove_lv(step.lv)
        self.log.info("interrupted swap: lv removed", lv=step.lv, why=step.why)

    async def _discard(self, step: Discard) -> None:
        self.target.touched = True
        await lvm.discard(step.path)

    async def _start(self, step: StartDomain) -> None:
        try:
            await self.calls.start(self._domain().uuid)
            self.log.info("domain started after reprovision")
        except WatcherError as exc:
            self.log.warning("starting the domain after reprovision failed", error=str(exc))

    async def _check_shut_off(self, step: CheckShutOff) -> None:
        domain = self._domain()
        if await self.calls.is_shut_off(domain.uuid):
            return
        if step.when == "before write":
            # Started between the decision and the interlock: keep the request for later.
            await self.calls.set_state(domain.uuid, DomainState(
                "reprovision", domain.requested_image))
            raise Deferred("the domain started before the write began")
        raise self._refused("the domain was started while its volume was being written; "
                            "the volume content is undefined")

    async def _check_unused(self, step: CheckUnused) -> None:
        target = self.target
        assert target.real_path is not None and target.pool and target.volume
        if step.when == "before write":
            self._hold_marker(target.real_path)  # from here no domain on it can start
        users, pids = await users_of(self.calls, target.real_path, target.pool, target.volume)
        reason = usage_refusal(users, pids, f"{target.pool}/{target.volume}")
        if reason is None:
            return
        if step.when == "after write":
            reason += ": it was used while being written; its content is undefined"
        raise self._refused(reason)

    async def _write(self, step: WriteImage) -> None:
        path = step.path or self.target.real_path
        assert path is not None
        if self.on_writing is not None:
            self.on_writing()
        self.target.touched = self.target.wrote = True
        self.log.info("writing volume", path=path, digest=self.image.digest,
                      bytes=self.image.virtual_size)
        # One writer per volume, and the hook holds back any other domain with a disk on
        # it. A busy volume is a retry.
        self._hold_marker(path)
        name = self.domain.name if self.domain else None
        if name is not None:
            telemetry.write_progress.labels(domain=name).set(0)
            telemetry.write_size.labels(domain=name).set(self.image.virtual_size)
        await self.write_image(self.source, self.image.format, Path(path),
                               target_is_zero=step.target_is_zero,
                               on_progress=self._progress_of(name))
        if name is not None:
            telemetry.write_progress.labels(domain=name).set(1)

    def _progress_of(self, name: str | None) -> Callable[[float], None]:
        """What the write reports its percent to: the domain's gauge and log, the job's
        own callback."""
        last_logged = -10.0

        def progress(percent: float) -> None:
            nonlocal last_logged
            if name is not None:
                telemetry.write_progress.labels(domain=name).set(percent / 100)
                if percent - last_logged >= 10 or percent >= 100:
                    last_logged = percent
                    self.log.info("writing volume", progress=round(percent, 1))
            if self.on_progress is not None:
                self.on_progress(percent)

        return progress
