"""One reprovision, start to end, for one domain: the keyed worker's processor.

Why it exists: this is where a domain's request becomes a result. For the domain a
worker hands over (by UUID) it reads the domain, decides whether a job is due
(``core.domain.decide``), fetches the image, gathers the facts, plans
(``core.plan.plan``), runs the plan (``execute``), and records and reports the outcome:
``provisioned``, ``failed`` with a reason, deferred to the next stop, or a
``TemporaryError`` for the worker to retry. A request no rule of this watcher matches is
left exactly as it is, and said once at info (``UnmatchedNotes``). Every ``failed`` is
recorded with a reason and one warning line naming the rule and the step that stopped.
Serialising runs per domain, bounding them and retrying belong to the worker
(``watcher.runtime.keyed``), not here.

It also owns the golden LVs the clone path needs (``goldens``): pre-warming asks it to
make them (``prepare_goldens``) and the cache's eviction to remove them
(``remove_goldens``, ``remove_orphan_goldens``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Collection, Iterable
from datetime import UTC, datetime
from typing import Any, Protocol

from watcher import telemetry
from watcher.adapters import lvm, qemu_img
from watcher.adapters.hypervisor import DomainFacts, DomainGone, DomainWatcher
from watcher.adapters.qemu_img import WriteImageFunction
from watcher.cache import CacheEntry
from watcher.core.domain import (
    DomainSnapshot,
    DomainState,
    Fail,
    MalformedState,
    Nothing,
    RootDiskUnusable,
    Unmatched,
    Write,
    decide,
    parse_state,
    root_disk,
)
from watcher.core.errors import (
    NotUploadedYet,
    PermanentError,
    Refused,
    TemporaryError,
    WatcherError,
)
from watcher.core.failure import failure_reason, rule_fields, step_group
from watcher.core.plan import TargetFacts, VolumeRules, plan, volume_refusal
from watcher.core.policy import DomainRule, ImageSpec, PolicySet
from watcher.core.steps import Plan, Refusal
from watcher.executor import Deferred, Executor, Goldens
from watcher.reprovision.facts import gather, resolve_target
from watcher.reprovision.unmatched import UnmatchedNotes
from watcher.settings import REPROVISION_TUNING

RETRY_BACKOFF = REPROVISION_TUNING.retry_backoff
"""The default retry of a job (``watcher.settings.ReprovisionTuning``)."""


class ImageSource(Protocol):
    """Where verified images come from (the cache)."""

    async def ensure(self, image: ImageSpec) -> CacheEntry: ...

    def current(self, image_name: str) -> CacheEntry | None: ...

    async def durable(self, entry: CacheEntry) -> CacheEntry | None: ...


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class Reprovisioner:
    """Handles one domain per call: ``await reprovisioner(uuid)``."""

    def __init__(
        self,
        hypervisor: DomainWatcher,
        cache: ImageSource,
        policies: Callable[[], PolicySet],
        volumes: VolumeRules,
        log: Any = None,
        *,
        write_image: WriteImageFunction = qemu_img.write_image,
    ) -> None:
        self.hypervisor = hypervisor
        self.cache = cache
        self.policies = policies
        self.volumes = volumes
        self.log = log if log is not None else telemetry.get_logger(component="reprovision")
        self.write_image = write_image
        self.goldens = Goldens(write_image, self.log)
        self._active = 0
        self._goldens_prepared: dict[str, str] = {}
        """Image name -> the digest whose goldens ``prepare_goldens`` made last."""
        self.unmatched = UnmatchedNotes()

    @property
    def running_jobs(self) -> int:
        """Reprovisions between decision and result right now."""
        return self._active

    async def __call__(self, uuid: str) -> None:
        """Look at domain ``uuid`` and do what its state asks; ``TemporaryError`` = retry."""
        with self.hypervisor.lease():
            await self._check(uuid)

    async def _check(self, uuid: str) -> None:
        facts = await self.hypervisor.describe(uuid)
        if facts is None:
            self.unmatched.forget(uuid)
            return
        try:
            state = parse_state(facts.metadata)
        except MalformedState as exc:
            self.log.warning("ignoring malformed watcher metadata", domain=facts.name,
                             error=str(exc))
            return
        policies = self.policies()
        action = decide(DomainSnapshot(facts.name, uuid, facts.shut_off, facts.managed_save,
                                       state), policies)
        if isinstance(action, Unmatched):
            assert state is not None
            if self.unmatched.first(uuid, action.why):
                self.log.info("tagged domain left as it is: unmatched", domain=facts.name,
                              uuid=uuid, state=state.kind, why=action.why)
            return
        self.unmatched.forget(uuid)
        if isinstance(action, Nothing):
            if state is not None and state.is_request:
                self.log.debug("reprovision pending", domain=facts.name, why=action.why)
            return
        assert state is not None
        if isinstance(action, Fail):
            await self._finish_failed(facts, action.image, action.reason, time.monotonic(),
                                      rule=action.rule, step=action.step, policies=policies)
            return
        await self._reprovision(facts, state, action, policies)

    async def _reprovision(self, domain: DomainFacts, request: DomainState, action: Write,
                           policies: PolicySet) -> None:
        began = time.monotonic()
        log = self.log.bind(domain=domain.name, uuid=domain.uuid, image=action.image)
        entry: CacheEntry | None = None
        stage = "fetch"  # where the job is, until the executor runs a plan step
        executor: Executor | None = None
        self._active += 1
        telemetry.jobs_in_progress.labels(kind="reprovision").inc()
        with telemetry.tracer.start_as_current_span("reprovision") as span:
            span.set_attribute("domain", domain.name)
            span.set_attribute("image", action.image)
            try:
                try:
                    entry = await self.cache.ensure(policies.images[action.image])
                except NotUploadedYet as exc:
                    raise TemporaryError(f"image not available yet: {exc}") from exc
                span.set_attribute("digest", entry.digest)
                for attempt in range(2):
                    stage, executor = "resolve", None
                    with telemetry.tracer.start_as_current_span("resolve volume"):
                        facts = await gather(self.hypervisor, domain, request, action.rule,
                                             action.image, entry, self.volumes)
                    stage = "check"
                    decision = plan(facts, action.rule, self.volumes)
                    if isinstance(decision, Refusal):
                        raise Refused(decision.reason)
                    if decision.recovery and attempt > 0:
                        raise Refused("an interrupted clone swap of the root disk is still "
                                      f"there after recovering it: {decision.describe()}")
                    log.info("reprovision planned", steps=decision.describe(),
                             recovery=decision.recovery)
                    executor = Executor.for_domain(self.hypervisor, self.write_image, facts,
                                                   entry.path, log, goldens=self.goldens)
                    await executor.run(decision)
                    if not decision.recovery:
                        break
            except Deferred as exc:
                log.info("reprovision deferred", reason=str(exc))
                span.set_attribute("result", "deferred")
                return
            except TemporaryError:
                telemetry.reprovisions.labels(result="retry").inc()
                span.set_attribute("result", "retry")
                raise
            except PermanentError as exc:
                if executor is not None and executor.current is not None:
                    stage = step_group(executor.current)
                await self._finish_failed(
                    domain, action.image, failure_reason(str(exc), stage, type(exc).__name__),
                    began, entry, rule=action.rule, step=stage, policies=policies)
                span.set_attribute("result", "failed")
                return
            finally:
                self._active -= 1
                telemetry.jobs_in_progress.labels(kind="reprovision").dec()
                # The gauges are for writes going on; an ended job leaves no series behind.
                for gauge in (telemetry.write_progress, telemetry.write_size):
                    with contextlib.suppress(KeyError):
                        gauge.remove(domain.name)
            span.set_attribute("result", "provisioned")
        seconds = time.monotonic() - began
        telemetry.reprovisions.labels(result="provisioned").inc()
        telemetry.reprovision_seconds.observe(seconds)
        written = 0 if _cloned(decision) else entry.virtual_size
        telemetry.written_bytes.inc(written)
        log.info("reprovision finished", digest=entry.digest, seconds=round(seconds, 2),
                 bytes=written, result="provisioned",
                 method="clone" if _cloned(decision) else "copy")

    # ---- golden LVs -------------------------------------------------------------------------

    async def prepare_goldens(self, image_name: str, entry: CacheEntry) -> list[str]:
        """Make the goldens of ``entry`` in every thin pool where a domain whose rule names
        ``image_name`` (with ``clone: auto``) has its allowed root LV; for pre-warming, so
        a reprovision finds them ready. Once per digest of an image in this process; a
        domain defined later gets its golden at its first reprovision. Returns their names.
        """
        if self._goldens_prepared.get(image_name) == entry.digest or not self.hypervisor.connected:
            return []  # done already, or tried again at the next warm once libvirt is back
        policies = self.policies()

        def clones_image(name: str) -> bool:
            rule = policies.rule_for(name)
            return rule is not None and rule.image == image_name and rule.clone == "auto"

        if not any(rule.image == image_name and rule.clone == "auto" for rule in policies.rules):
            self._goldens_prepared[image_name] = entry.digest
            return []
        pools: set[tuple[str, str]] = set()
        for row in await self.hypervisor.domain_overview(clones_image):
            pool = await self._thin_pool_of(row.uuid, policies)
            if pool is not None:
                pools.add(pool)
        made: list[str] = []
        if pools:
            # A golden is a volume write: it starts from data on stable storage.
            durable = await self.cache.durable(entry)
            if durable is None:
                return made  # corrupt after a crash: removed, fetched again at the next warm
            entry = durable
        for vg, pool_name in sorted(pools):
            golden = await self.goldens.ensure(vg, pool_name, entry.digest, entry.virtual_size,
                                               entry.path, entry.format)
            made.append(golden.name)
        self._goldens_prepared[image_name] = entry.digest
        return made

    async def _thin_pool_of(self, uuid: str, policies: PolicySet) -> tuple[str, str] | None:
        """``(VG, pool)`` of the domain's root disk when it is an allowed thin LV."""
        facts = await self.hypervisor.describe(uuid)
        rule = policies.rule_for(facts.name) if facts is not None else None
        if facts is None or rule is None:
            return None
        try:
            disk = root_disk(facts.xml, rule.root_disk)
        except RootDiskUnusable:
            return None
        if disk.format not in (None, "raw"):
            return None
        try:
            target: TargetFacts = await resolve_target(self.hypervisor, disk)
        except (WatcherError, OSError):
            return None
        lv = target.lv
        if lv is None or not lv.is_thin or lv.pool is None:
            return None
        if volume_refusal(target, self.volumes) is not None:
            return None
        return lv.vg, lv.pool

    async def remove_goldens(self, digests: Iterable[str]) -> list[str]:
        """Remove the golden LVs of cache entries that were removed; returns their names."""
        digests = list(digests)
        if not digests:
            return []
        for name, digest in list(self._goldens_prepared.items()):
            if digest in digests:
                del self._goldens_prepared[name]
        try:
            return await self.goldens.remove_many(digests)
        except lvm.LvmError as exc:
            self.log.warning("removing golden lvs of evicted cache entries failed; the next "
                             "reconcile tries again", error=str(exc))
            return []

    async def remove_orphan_goldens(self, cached: Collection[str]) -> list[str]:
        """Remove the golden LVs of every digest not in ``cached``; quiet on a host without
        LVM. Returns their names."""
        try:
            return await self.goldens.remove_orphans(cached)
        except lvm.LvmError as exc:
            self.log.debug("golden lvs not looked at", error=str(exc))
            return []

    async def _finish_failed(self, facts: DomainFacts, image: str | None, reason: str,
                             began: float, entry: CacheEntry | None = None, *,
                             rule: DomainRule, step: str, policies: PolicySet) -> None:
        """Record ``failed`` with ``reason`` and write the one warning line that says why:
        the domain, the rule that made it this watcher's, and the step that stopped."""
        reason = failure_reason(reason, step, "error")
        with contextlib.suppress(DomainGone):
            await self.hypervisor.set_state(
                facts.uuid, DomainState("failed", image, None, _now(), reason))
        seconds = time.monotonic() - began
        telemetry.reprovisions.labels(result="failed").inc()
        telemetry.reprovision_seconds.observe(seconds)
        self.log.warning("reprovision finished", domain=facts.name, uuid=facts.uuid,
                         image=image, digest=entry.digest if entry else None,
                         **rule_fields(policies, rule), step=step,
                         seconds=round(seconds, 2), bytes=0, result="failed", reason=reason)


def _cloned(decision: Plan | Refusal) -> bool:
    return isinstance(decision, Plan) and decision.clones
