"""The reprovision job: write a policy's current image onto a shut-off domain's root volume.

An operator asks by tagging the domain's metadata and shutting it down; libvirt events
(and sweeps) make the hypervisor adapter report the domain here. One worker per domain
UUID runs the checks and the job in order, so events arriving mid-job are folded into
one re-check afterwards; a semaphore bounds the writes running at once.

The job refuses rather than guesses: the root disk must resolve to an allowed path, the
image must fit (or the volume may be grown through libvirt), and the domain must be shut
off right before and right after the write. While writing, the metadata says
``provisioning`` so the libvirt hook refuses to start the domain. Volumes are never
deleted, shrunk or recreated.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from watcher import lvwrite, telemetry
from watcher.adapters import qemu_img
from watcher.adapters.hypervisor import DomainFacts, DomainGone, DomainWatcher, VolumeFacts
from watcher.cache import CacheEntry
from watcher.core.backoff import Backoff
from watcher.core.domain import (
    DomainSnapshot,
    DomainState,
    Fail,
    MalformedState,
    Nothing,
    RootDiskSource,
    Write,
    decide,
    parse_state,
    root_disk,
)
from watcher.core.errors import (
    ImageWriteError,
    NotUploadedYet,
    PermanentError,
    TemporaryError,
    WatcherError,
)
from watcher.core.lvm_rules import LvInfo
from watcher.core.policy import ImageSpec, PolicySet
from watcher.core.volume_rules import VolumeIdentity, lv_paths, refusal
from watcher.settings import ReprovisionSettings, VolumesSettings

RETRY_BACKOFF = Backoff(base=2.0, cap=60.0, attempts=6)
"""Temporary failures (S3, libvirt connection, busy device) retried in one worker run;
after that the request stays and the next event or sweep tries again."""


class ImageSource(Protocol):
    """Where verified images come from (the cache)."""

    async def ensure(self, image: ImageSpec) -> CacheEntry: ...

    def current(self, image_name: str) -> CacheEntry | None: ...


class WriteImage(Protocol):
    """The signature of ``watcher.adapters.qemu_img.write_image``."""

    def __call__(self, source: Path, source_format: str, target: Path, *,
                 target_is_zero: bool = False,
                 on_progress: Callable[[float], None] | None = None) -> Awaitable[None]: ...


class Refused(PermanentError):
    """The job will not write this volume; the message is the ``failed`` reason."""


class Deferred(WatcherError):
    """The domain started before the write began; the request waits for the next stop."""


@dataclass(frozen=True)
class TargetVolume:
    """The resolved root volume a job writes."""

    disk: RootDiskSource
    path: str
    """The source path with symlinks resolved: what is checked is what is written."""
    capacity: int
    """Bytes."""
    volume: VolumeFacts | None
    """The libvirt storage volume at this path, if a pool holds it."""
    lv: LvInfo | None = None
    """The logical volume at this path, if it is one (pool or not)."""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _size_of(path: str) -> int:
    """Bytes of a regular file or block device; anything else is refused."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISREG(mode):
            return os.fstat(fd).st_size
        if stat.S_ISBLK(mode):
            return os.lseek(fd, 0, os.SEEK_END)
        raise Refused(f"{path} is neither a regular file nor a block device")
    finally:
        os.close(fd)


class Reprovisioner:
    """Runs one reprovision worker per domain, at most ``max_concurrent`` writes at once."""

    def __init__(
        self,
        hypervisor: DomainWatcher,
        images: ImageSource,
        policies: Callable[[], PolicySet],
        volumes: VolumesSettings,
        settings: ReprovisionSettings,
        log: Any = None,
        *,
        write_image: WriteImage = qemu_img.write_image,
        retry: Backoff = RETRY_BACKOFF,
    ) -> None:
        self.hypervisor = hypervisor
        self.images = images
        self.policies = policies
        self.volumes = volumes
        self.settings = settings
        self.log = log if log is not None else telemetry.get_logger(component="reprovision")
        self.write_image = write_image
        self.retry = retry
        self._slots = asyncio.Semaphore(max(1, settings.max_concurrent))
        self._workers: dict[str, asyncio.Task[None]] = {}
        self._again: set[str] = set()
        self._closing = asyncio.Event()
        self._active = 0

    @classmethod
    def create(
        cls,
        *,
        uri: str,
        images: ImageSource,
        policies: Callable[[], PolicySet],
        volumes: VolumesSettings,
        settings: ReprovisionSettings,
        log: Any = None,
        **options: Any,
    ) -> Reprovisioner:
        """A reprovisioner with its own ``DomainWatcher`` on ``uri`` reporting to it."""
        reprovisioner: Reprovisioner | None = None

        def report(uuid: str) -> None:
            if reprovisioner is not None:
                reprovisioner.request(uuid)

        hypervisor = DomainWatcher(uri, report)
        reprovisioner = cls(hypervisor, images, policies, volumes, settings, log, **options)
        return reprovisioner

    @property
    def running_jobs(self) -> int:
        """Reprovisions between decision and result right now."""
        return self._active

    # ---- workers ----------------------------------------------------------------------

    def request(self, uuid: str) -> None:
        """Look at domain ``uuid`` soon; never blocks. Called from libvirt event callbacks."""
        if self._closing.is_set():
            return
        if uuid in self._workers:
            self._again.add(uuid)  # folded into one re-check after the current run
            return
        self._workers[uuid] = asyncio.get_running_loop().create_task(
            self._worker(uuid), name=f"reprovision {uuid}")

    async def run(self, stop: asyncio.Event) -> None:
        """Accept requests until ``stop`` is set; ``drain`` then finishes running jobs."""
        await stop.wait()
        self._closing.set()

    async def drain(self, timeout: float) -> None:
        """Stop taking requests, wait up to ``timeout`` s for workers, then cancel them.

        A cancelled write leaves the domain ``provisioning``: the hook keeps it from
        starting and the next start of the watcher resumes the write.
        """
        self._closing.set()
        workers = list(self._workers.values())
        if not workers:
            return
        _done, pending = await asyncio.wait(workers, timeout=timeout)
        for task in pending:
            task.cancel()
        if pending:
            self.log.warning("cancelled unfinished reprovisions", domains=len(pending))
            await asyncio.gather(*pending, return_exceptions=True)

    async def _worker(self, uuid: str) -> None:
        delays = self.retry.delays()
        attempt = 0
        try:
            while True:
                self._again.discard(uuid)
                try:
                    with self.hypervisor.lease():
                        await self._check(uuid)
                except (TemporaryError, ImageWriteError) as exc:
                    attempt += 1
                    delay = next(delays, None)
                    if delay is None:
                        self.log.warning(
                            "reprovision keeps failing; the request stays for the next event "
                            "or sweep", uuid=uuid, attempts=attempt, error=str(exc))
                    else:
                        self.log.warning("reprovision hit a temporary failure; retrying",
                                         uuid=uuid, attempt=attempt, delay=round(delay, 2),
                                         error=str(exc))
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._closing.wait(), timeout=delay)
                        self._again.add(uuid)
                except Exception:
                    telemetry.report_unexpected(self.log, "reprovision", uuid=uuid)
                if uuid not in self._again or self._closing.is_set():
                    return
        finally:
            self._workers.pop(uuid, None)
            self._again.discard(uuid)

    async def _check(self, uuid: str) -> None:
        """Read the domain, decide, and act on the decision."""
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

    # ---- the job ----------------------------------------------------------------------

    async def _reprovision(self, facts: DomainFacts, request: DomainState, action: Write,
                           policies: PolicySet) -> None:
        began = time.monotonic()
        log = self.log.bind(domain=facts.name, uuid=facts.uuid, image=action.image)
        entry: CacheEntry | None = None
        self._active += 1
        telemetry.jobs_in_progress.labels(kind="reprovision").inc()
        with telemetry.tracer.start_as_current_span("reprovision") as span:
            span.set_attribute("domain", facts.name)
            span.set_attribute("image", action.image)
            try:
                try:
                    entry = await self.images.ensure(policies.images[action.image])
                except NotUploadedYet as exc:
                    raise TemporaryError(f"image not available yet: {exc}") from exc
                span.set_attribute("digest", entry.digest)
                with telemetry.tracer.start_as_current_span("resolve volume"):
                    target = await self._resolve(facts, action)
                grow = self._plan_size(target, entry, action)
                async with self._slots:
                    await self._write(facts, request, action, entry, target, grow, log)
            except Deferred as exc:
                log.info("reprovision deferred", reason=str(exc))
                span.set_attribute("result", "deferred")
                return
            except (TemporaryError, ImageWriteError) as exc:
                if isinstance(exc, ImageWriteError) and not exc.temporary:
                    reason = (f"{exc}; the volume was rolled back to its previous content"
                              if exc.rolled_back else
                              f"{exc}; the volume may hold a partial image")
                    await self._finish_failed(facts, action.image, reason, began, entry)
                    span.set_attribute("result", "failed")
                    return
                telemetry.reprovisions.labels(result="retry").inc()
                span.set_attribute("result", "retry")
                raise
            except PermanentError as exc:
                await self._finish_failed(facts, action.image, str(exc), began, entry)
                span.set_attribute("result", "failed")
                return
            finally:
                self._active -= 1
                telemetry.jobs_in_progress.labels(kind="reprovision").dec()
            span.set_attribute("result", "provisioned")
        seconds = time.monotonic() - began
        telemetry.reprovisions.labels(result="provisioned").inc()
        telemetry.reprovision_seconds.observe(seconds)
        telemetry.bytes_written.inc(entry.virtual_size)
        log.info("reprovision finished", digest=entry.digest, seconds=round(seconds, 2),
                 bytes=entry.virtual_size, result="provisioned")
        if action.rule.start:
            try:
                await self.hypervisor.start(facts.uuid)
                log.info("domain started after reprovision")
            except WatcherError as exc:
                log.warning("starting the domain after reprovision failed", error=str(exc))

    async def _resolve(self, facts: DomainFacts, action: Write) -> TargetVolume:
        """Find the root volume and check that the watcher may write it."""
        disk = root_disk(facts.xml, action.rule.root_disk)
        if disk.format not in (None, "raw"):
            raise Refused(f"disk {disk.target} has format {disk.format}; "
                          "only raw volumes are written")
        if disk.type == "volume":
            assert disk.pool is not None and disk.volume is not None
            path = await self.hypervisor.volume_path(disk.pool, disk.volume)
        else:
            assert disk.path is not None
            path = disk.path
        real = await asyncio.to_thread(os.path.realpath, path)
        volume = await self.hypervisor.volume_for_path(path)
        shown = path if real == path else f"{path} ({real})"
        lv = await lvwrite.recognise(real)  # refuses open, inactive, snapshot, thin-pool LVs
        identity = VolumeIdentity(path, real, lv_paths(lv.vg, lv.lv) if lv else (),
                                  lv.vg if lv else None, volume.pool_type if volume else None)
        reason = refusal(identity, self.volumes.allow, self.volumes.lvm_vgs)
        if reason is not None:
            raise Refused(reason)
        try:
            if lv is not None:
                capacity = lv.size
            elif volume is not None:
                capacity = volume.capacity
            else:
                capacity = await asyncio.to_thread(_size_of, real)
        except OSError as exc:
            raise Refused(f"cannot open root disk {shown}: {exc.strerror}") from None
        return TargetVolume(disk, real, capacity, volume, lv)

    def _plan_size(self, target: TargetVolume, entry: CacheEntry, action: Write) -> bool:
        """Whether the volume must grow first; refuses when it is too small and may not."""
        if entry.virtual_size <= target.capacity:
            return False
        need = f"image needs {entry.virtual_size} bytes, volume {target.path} has {target.capacity}"
        if not action.rule.grow:
            raise Refused(f"{need}; the policy does not allow growing it (grow: false)")
        if target.volume is None and target.lv is None:
            raise Refused(f"{need}; it is neither a libvirt storage volume nor an LV, so it "
                          "cannot be grown")
        return True

    async def _write(self, facts: DomainFacts, request: DomainState, action: Write,
                     entry: CacheEntry, target: TargetVolume, grow: bool, log: Any) -> None:
        """Arm the interlock, re-check, grow if planned, write, re-check, record."""
        uuid = facts.uuid
        with telemetry.tracer.start_as_current_span("metadata update"):
            await self.hypervisor.set_state(uuid, DomainState(
                "provisioning", action.image, entry.digest, _now()))
        if not await self.hypervisor.is_shut_off(uuid):
            # Started between the decision and the interlock: keep the request for later.
            await self.hypervisor.set_state(uuid, DomainState("reprovision", request.image))
            raise Deferred("the domain started before the write began")
        lv = target.lv
        if grow and target.volume is not None:
            # In a libvirt pool (a 'logical' pool included): libvirt resizes and knows it.
            grown = await self.hypervisor.grow_volume(target.path, entry.virtual_size)
            if grown.capacity < entry.virtual_size:
                raise Refused(f"growing {target.path} to {entry.virtual_size} bytes left "
                              f"{grown.capacity}")
            log.info("volume grown", path=target.path, capacity=grown.capacity)
            if lv is not None:
                lv = await lvwrite.recognise(target.path)
        elif grow and lv is not None:
            lv = await lvwrite.grow(lv, entry.virtual_size)
            log.info("logical volume grown", lv=lv.name, size=lv.size)
        snapshot = action.rule.snapshot
        if snapshot and lv is None:
            log.warning("policy asks for a rollback snapshot but the root disk is not an LV; "
                        "writing without one", path=target.path)

        last_logged = -10.0

        def progress(percent: float) -> None:
            nonlocal last_logged
            telemetry.write_progress.labels(domain=facts.name).set(percent / 100)
            if percent - last_logged >= 10 or percent >= 100:
                last_logged = percent
                log.info("writing volume", progress=round(percent, 1))

        telemetry.write_progress.labels(domain=facts.name).set(0)
        log.info("writing volume", path=target.path, digest=entry.digest,
                 bytes=entry.virtual_size)
        with telemetry.tracer.start_as_current_span("write"):
            # A failure inside the guard rolls an LV with a snapshot back to its old content.
            try:
                async with lvwrite.guarded_write(lv, snapshot if lv else None) as target_is_zero:
                    await self.write_image(Path(entry.path), entry.format, Path(target.path),
                                           target_is_zero=target_is_zero, on_progress=progress)
                    telemetry.write_progress.labels(domain=facts.name).set(1)
                    if not await self.hypervisor.is_shut_off(uuid):
                        raise Refused("the domain was started while its volume was being "
                                      "written; the volume content is undefined")
            except ImageWriteError as exc:
                # The guard re-raises only after merging the snapshot back.
                exc.rolled_back = bool(lv is not None and snapshot)
                raise
        with telemetry.tracer.start_as_current_span("metadata update"):
            await self.hypervisor.set_state(uuid, DomainState(
                "provisioned", action.image, entry.digest, _now()))

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
