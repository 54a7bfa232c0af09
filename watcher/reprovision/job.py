"""One reprovision, start to end, for one domain: the keyed worker's processor.

Why it exists: this is where a domain's request becomes a result. For the domain a
worker hands over (by UUID) it reads the domain, decides whether a job is due
(``core.domain.decide``), fetches the image, gathers the facts, plans
(``core.plan.plan``), runs the plan (``execute``), and records and reports the outcome:
``provisioned``, ``failed`` with a reason, deferred to the next stop, or a
``TemporaryError`` for the worker to retry. Serialising runs per domain, bounding them
and retrying belong to the worker (``watcher.runtime.keyed``), not here.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Protocol

from watcher import telemetry
from watcher.adapters import qemu_img
from watcher.adapters.hypervisor import DomainFacts, DomainGone, DomainWatcher
from watcher.adapters.qemu_img import WriteImageFunction
from watcher.cache import CacheEntry
from watcher.core.domain import (
    DomainSnapshot,
    DomainState,
    Fail,
    MalformedState,
    Nothing,
    Write,
    decide,
    parse_state,
)
from watcher.core.errors import NotUploadedYet, PermanentError, TemporaryError
from watcher.core.plan import Refusal, VolumeRules, plan
from watcher.core.policy import ImageSpec, PolicySet
from watcher.reprovision.execute import Deferred, Executor, Refused
from watcher.reprovision.facts import gather
from watcher.settings import REPROVISION_TUNING

RETRY_BACKOFF = REPROVISION_TUNING.retry_backoff
"""The default retry of a job (``watcher.settings.ReprovisionTuning``)."""


class ImageSource(Protocol):
    """Where verified images come from (the cache)."""

    async def ensure(self, image: ImageSpec) -> CacheEntry: ...

    def current(self, image_name: str) -> CacheEntry | None: ...


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class Reprovisioner:
    """Handles one domain per call: ``await reprovisioner(uuid)``."""

    def __init__(
        self,
        hypervisor: DomainWatcher,
        images: ImageSource,
        policies: Callable[[], PolicySet],
        volumes: VolumeRules,
        log: Any = None,
        *,
        write_image: WriteImageFunction = qemu_img.write_image,
    ) -> None:
        self.hypervisor = hypervisor
        self.images = images
        self.policies = policies
        self.volumes = volumes
        self.log = log if log is not None else telemetry.get_logger(component="reprovision")
        self.write_image = write_image
        self._active = 0

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
        if isinstance(action, Nothing):
            if state is not None and state.is_request:
                self.log.debug("reprovision pending", domain=facts.name, why=action.why)
            return
        assert state is not None
        if isinstance(action, Fail):
            await self._finish_failed(facts, action.image, action.reason, time.monotonic())
            return
        await self._reprovision(facts, state, action, policies)

    async def _reprovision(self, domain: DomainFacts, request: DomainState, action: Write,
                           policies: PolicySet) -> None:
        began = time.monotonic()
        log = self.log.bind(domain=domain.name, uuid=domain.uuid, image=action.image)
        entry: CacheEntry | None = None
        self._active += 1
        telemetry.jobs_in_progress.labels(kind="reprovision").inc()
        with telemetry.tracer.start_as_current_span("reprovision") as span:
            span.set_attribute("domain", domain.name)
            span.set_attribute("image", action.image)
            try:
                try:
                    entry = await self.images.ensure(policies.images[action.image])
                except NotUploadedYet as exc:
                    raise TemporaryError(f"image not available yet: {exc}") from exc
                span.set_attribute("digest", entry.digest)
                with telemetry.tracer.start_as_current_span("resolve volume"):
                    facts = await gather(self.hypervisor, domain, request, action.rule,
                                         action.image, entry, self.volumes)
                decision = plan(facts, action.rule, self.volumes)
                if isinstance(decision, Refusal):
                    raise Refused(decision.reason)
                log.info("reprovision planned", steps=decision.describe())
                await Executor(self.hypervisor, self.write_image, facts, entry.path,
                               log).run(decision)
            except Deferred as exc:
                log.info("reprovision deferred", reason=str(exc))
                span.set_attribute("result", "deferred")
                return
            except TemporaryError:
                telemetry.reprovisions.labels(result="retry").inc()
                span.set_attribute("result", "retry")
                raise
            except PermanentError as exc:
                await self._finish_failed(domain, action.image, str(exc), began, entry)
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
        telemetry.written_bytes.inc(entry.virtual_size)
        log.info("reprovision finished", digest=entry.digest, seconds=round(seconds, 2),
                 bytes=entry.virtual_size, result="provisioned")

    async def _finish_failed(self, facts: DomainFacts, image: str | None, reason: str,
                             began: float, entry: CacheEntry | None = None) -> None:
        """Record ``failed`` with ``reason`` and write the summary line."""
        with contextlib.suppress(DomainGone):
            await self.hypervisor.set_state(
                facts.uuid, DomainState("failed", image, None, _now(), reason))
        seconds = time.monotonic() - began
        telemetry.reprovisions.labels(result="failed").inc()
        telemetry.reprovision_seconds.observe(seconds)
        self.log.warning("reprovision finished", domain=facts.name, uuid=facts.uuid,
                         image=image, digest=entry.digest if entry else None,
                         seconds=round(seconds, 2), bytes=0, result="failed", reason=reason)
