"""Running a reprovision plan: each step through its adapter, logged and traced.

Why it exists: ``watcher.core.plan`` decides what to do; this module only does it, one
step at a time and in order, so what runs is exactly what the plan (and its log line)
says. A rollback snapshot taken by one step guards every later step until
``DropSnapshot``: a failure in between merges it back before the error travels on, and
the error then says whether the volume was rolled back.

A clone works the same way: from ``SwapOut`` on, the old LV and the clone are guarded
until ``DropPrevious``; a failure before ``MarkProvisioned`` removes the clone and puts the
old LV back under its name. ``DropPrevious`` comes after ``MarkProvisioned`` (and after
the start), so what the metadata records is always what the domain's LV holds.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol

from watcher import telemetry
from watcher.adapters import lvm, write_markers
from watcher.adapters.qemu_img import WriteImageFunction
from watcher.core.domain import DomainState
from watcher.core.errors import PermanentError, PermanentImageWriteError, Refused, WatcherError
from watcher.core.lvm_rules import LvInfo, cow_snapshot_size
from watcher.core.plan import JobFacts
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
    RemoveLv,
    RenameLv,
    Snapshot,
    StartDomain,
    Step,
    SwapOut,
    WriteImage,
)
from watcher.reprovision.goldens import Goldens


class Capacity(Protocol):
    @property
    def capacity(self) -> int: ...


class PlanCalls(Protocol):
    """The libvirt calls a plan makes (``DomainWatcher`` has them; ``jobcalls.DomainCalls``
    makes them)."""

    async def set_state(self, uuid: str, state: DomainState) -> None: ...

    async def is_shut_off(self, uuid: str) -> bool: ...

    async def grow_volume(self, path: str, capacity: int) -> Capacity: ...

    async def start(self, uuid: str) -> None: ...


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


_SPAN_NAMES: dict[type[Any], str] = {
    MarkProvisioning: "metadata update", MarkProvisioned: "metadata update",
    CheckShutOff: "check shut off", GrowVolume: "grow", ExtendLv: "grow",
    Snapshot: "snapshot", Discard: "discard", WriteImage: "write",
    DropSnapshot: "snapshot", StartDomain: "start", MakeGolden: "golden",
    SwapOut: "swap", CloneGolden: "clone", GrowClone: "grow", DropPrevious: "swap",
    ActivateLv: "recover", RenameLv: "recover", RemoveLv: "recover",
}


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class Executor:
    """Runs one plan for one domain."""

    hypervisor: PlanCalls
    write_image: WriteImageFunction
    facts: JobFacts
    source: Path
    """The cache entry's data file."""
    log: Any
    lv: LvInfo | None = None
    """The root LV as it is now: a grow step changes it, the snapshot step needs it."""
    goldens: Goldens | None = None
    """Makes the golden LVs a clone plan needs; required for one."""
    swap: lvm.CloneSwap | None = None
    """The clone on its way in, from ``SwapOut`` to ``DropPrevious``."""
    marker: contextlib.ExitStack | None = None
    """The write marker a swap holds until ``MarkProvisioned``."""
    _guarded: bool = False
    """A rollback snapshot guards the steps running now."""
    current: Step | None = None
    """The step running now, or the one that stopped the plan."""

    async def run(self, plan: Plan) -> None:
        """Run every step; raise what stopped it (``Deferred``, a refusal, a failure)."""
        self.lv = self.facts.target.lv if self.facts.target else None
        for note in plan.notes:
            self.log.warning(note)
        self._guarded = False
        try:
            # The marker outlives the guard: a swap is rolled back while it is still held.
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
        self.log.debug("reprovision step", step=str(step))
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

    async def _swap_out(self, step: SwapOut, guard: contextlib.AsyncExitStack) -> None:
        target = self.facts.target
        assert target is not None and self.marker is not None
        pool = target.pool_volume
        # The same marker as a write's: one writer per volume, and the hook holds back any
        # other domain with a disk on it.
        self.marker.enter_context(write_markers.marked_writing(
            target.real_path, pool=pool.pool if pool else None, volume=None,
            job_id=f"reprovision {self.facts.domain}"))
        self.swap = await guard.enter_async_context(lvm.swapping_in(step.vg, step.lv))
        await self.swap.rename_old()
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
        assert self.lv is not None and self.lv.name == step.lv
        return lvm.rollback_snapshot(self.lv, cow_snapshot_size(self.lv, step.min_size))

    async def _run(self, step: Step) -> None:
        handlers: dict[type[Any], Callable[[Any], Awaitable[None]]] = {
            MarkProvisioning: self._mark, MarkProvisioned: self._mark,
            CheckShutOff: self._check_shut_off, GrowVolume: self._grow_volume,
            ExtendLv: self._extend_lv, Discard: self._discard, WriteImage: self._write,
            StartDomain: self._start, MakeGolden: self._make_golden,
            CloneGolden: self._clone, GrowClone: self._grow_clone, ActivateLv: self._activate,
            RenameLv: self._rename, RemoveLv: self._remove,
        }
        await handlers[type(step)](step)

    async def _mark(self, step: MarkProvisioning | MarkProvisioned) -> None:
        kind: Literal["provisioning", "provisioned"] = (
            "provisioning" if isinstance(step, MarkProvisioning) else "provisioned")
        await self.hypervisor.set_state(self.facts.uuid, DomainState(
            kind, step.image, step.digest, _now()))

    async def _grow_volume(self, step: GrowVolume) -> None:
        grown = await self.hypervisor.grow_volume(step.path, step.size)
        if grown.capacity < step.size:
            raise Refused(f"growing {step.path} to {step.size} bytes left {grown.capacity}")
        self.log.info("volume grown", path=step.path, capacity=grown.capacity)
        if self.lv is not None:
            # An LV of a 'logical' pool: LVM's view of it is needed for the snapshot.
            self.lv = await lvm.recognise(step.path)
            if self.lv is None:
                raise Refused(f"{step.path} is no longer a logical volume after growing it")

    async def _extend_lv(self, step: ExtendLv) -> None:
        assert self.lv is not None
        self.lv = await lvm.grow(self.lv, step.size)
        self.log.info("logical volume grown", lv=self.lv.name, size=self.lv.size)

    async def _make_golden(self, step: MakeGolden) -> None:
        assert self.goldens is not None
        try:
            await self.goldens.ensure(step.vg, step.pool, step.digest, step.size, self.source,
                                      self.facts.image.format)
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
        await lvm.discard(step.path)

    async def _start(self, step: StartDomain) -> None:
        try:
            await self.hypervisor.start(self.facts.uuid)
            self.log.info("domain started after reprovision")
        except WatcherError as exc:
            self.log.warning("starting the domain after reprovision failed", error=str(exc))

    async def _check_shut_off(self, step: CheckShutOff) -> None:
        if await self.hypervisor.is_shut_off(self.facts.uuid):
            return
        if step.when == "before write":
            # Started between the decision and the interlock: keep the request for later.
            await self.hypervisor.set_state(self.facts.uuid, DomainState(
                "reprovision", self.facts.requested_image))
            raise Deferred("the domain started before the write began")
        raise Refused("the domain was started while its volume was being written; the "
                      "volume content is undefined")

    async def _write(self, step: WriteImage) -> None:
        name, image = self.facts.domain, self.facts.image
        last_logged = -10.0

        def progress(percent: float) -> None:
            nonlocal last_logged
            telemetry.write_progress.labels(domain=name).set(percent / 100)
            if percent - last_logged >= 10 or percent >= 100:
                last_logged = percent
                self.log.info("writing volume", progress=round(percent, 1))

        telemetry.write_progress.labels(domain=name).set(0)
        telemetry.write_size.labels(domain=name).set(image.virtual_size)
        self.log.info("writing volume", path=step.path, digest=image.digest,
                      bytes=image.virtual_size)
        pool = self.facts.target.pool_volume if self.facts.target else None
        # The same marker as an API job's: one writer per volume, and the hook also holds
        # back any other domain with a disk on it. A busy volume is a retry.
        with write_markers.marked_writing(step.path, pool=pool.pool if pool else None,
                                          volume=None, job_id=f"reprovision {name}"):
            await self.write_image(self.source, image.format, Path(step.path),
                                   target_is_zero=step.target_is_zero, on_progress=progress)
        telemetry.write_progress.labels(domain=name).set(1)
