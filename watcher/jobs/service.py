"""The HTTP job API's jobs: accepted, stored, run on the job engine, followed, cancelled.

Why it exists: an API job is the same kind of job as a tag-triggered reprovision (a
verified image onto a volume, with the same checks), requested over HTTP instead of by
domain metadata. This module is the job's life between the routes
(``watcher.http.job_routes``) and the engine (``watcher.runtime.keyed``):

- ``submit_*`` stores the job ``pending`` in the job database (``state.dir``) and
  submits its key: the volume (``pool/volume``) for a provision, so jobs for one volume
  run one after another, in the order they were accepted; the image for a fetch.
- ``process(key)`` (the engine's processor) runs every pending job of its key, oldest
  first. A job runs in its own task, so ``cancel`` can stop it mid-download or
  mid-write; the engine's slots (shared with reprovisions) bound how many run at once.
- Progress is read from the transfer and from qemu-img's ``-p`` output while the job
  runs, and written to the database on every stage change and at most every
  ``PROGRESS_EVERY`` seconds, so a status read after a restart is recent.
- At start-up every job that was ``pending`` or ``running`` runs (again): a running one
  is started over from its first step. Finished jobs are pruned after ``KEEP_FINISHED``.

Where the contract is silent, docs/http-api.md gives what was decided (a job without a
correlation id, the stage words, temporary failures retried by the engine with no write
slot held, a cancelled job read as ``failed``); ``watcher.core.api_shapes`` shapes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import structlog
from opentelemetry import propagate
from opentelemetry.context import Context

from watcher import telemetry
from watcher.adapters import qemu_img
from watcher.adapters.jobstore import FINISHED, JobRecord, JobStore
from watcher.adapters.qemu_img import WriteImageFunction
from watcher.cache import Cache, CacheEntry
from watcher.core.api_requests import FetchRequest, ImageRef, ProvisionRequest
from watcher.core.api_shapes import Stage
from watcher.core.backoff import Backoff
from watcher.core.errors import (
    ImageRejected,
    NotUploadedYet,
    PermanentError,
    TemporaryError,
)
from watcher.core.plan import ImageFacts
from watcher.core.policy import ImageSpec
from watcher.executor import Executor, Target, WriteFailed
from watcher.jobs.names import api_image_name, fetch_key, volume_key
from watcher.jobs.progress import PROGRESS_EVERY, Live, left_behind, read_transfer
from watcher.jobs.volume import StorageCalls, gather, plan_or_refuse

KEEP_FINISHED = 7 * 86400.0
"""Seconds a finished job stays readable (then pruned)."""
RETRY = Backoff(base=1.0, cap=30.0, attempts=6)
"""The retry of API jobs; the supervisor gives the same to their keyed worker."""


class JobNotFound(Exception):
    pass


class JobEnded(Exception):
    """The job has finished already: nothing to cancel."""

    def __init__(self, record: JobRecord) -> None:
        super().__init__(f"job {record.job_id} has already ended ({record.status})")
        self.record = record


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@dataclass
class _Running:
    task: asyncio.Task[None]
    live: Live
    cancelled: bool = False
    digest: str | None = None


class ApiJobs:
    """Accepts, runs and reports the API's jobs."""

    def __init__(
        self,
        store: JobStore,
        cache: Cache,
        calls: StorageCalls,
        pool: str,
        submit: Callable[[str], None],
        *,
        write_image: WriteImageFunction = qemu_img.write_image,
        log: Any = None,
        retry: Backoff = RETRY,
    ) -> None:
        self.store = store
        self.cache = cache
        self.calls = calls
        self.pool = pool
        self.submit = submit
        """The engine's ``submit``: runs ``process(key)`` soon."""
        self.write_image = write_image
        self.log = log if log is not None else telemetry.get_logger(component="api-jobs")
        self.retry = retry
        """Must be the job engine's: a job's last attempt is the engine's last retry."""
        self._attempts: dict[str, int] = {}
        """Temporary failures so far, by job id (since the daemon started)."""
        self._running: dict[str, _Running] = {}
        self._versions: dict[str, int] = {}
        """A running job's count of status and stage changes (see ``version``)."""

    # ---- the routes' side ---------------------------------------------------------------

    def submit_provision(self, request: ProvisionRequest,
                         traceparent: str | None = None) -> JobRecord:
        return self._accept("provision", {
            "image_url": request.image_url, "bucket": request.image.bucket,
            "key": request.image.key, "image_type": request.image_type,
            "volume_name": request.volume_name, "volume_size_gb": request.volume_size_gb,
            "pool": self.pool,
        }, volume_key(self.pool, request.volume_name), request.correlation_id, traceparent)

    def submit_fetch(self, request: FetchRequest, traceparent: str | None = None) -> JobRecord:
        return self._accept("fetch", {
            "image_url": request.image_url, "bucket": request.image.bucket,
            "key": request.image.key, "image_type": request.image_type,
        }, fetch_key(request.image), None, traceparent)

    def get(self, job_id: str) -> JobRecord | None:
        """The job as stored, with a running job's live progress on top."""
        record = self.store.get(job_id)
        if record is None:
            return None
        running = self._running.get(job_id)
        if running is None or record.status in FINISHED:
            return record
        live = running.live
        read_transfer(live, self.cache.fetching)
        return replace(record, **live.fields())

    def cancel(self, job_id: str) -> JobRecord:
        """Cancel a pending or running job; ``JobNotFound``, ``JobEnded``."""
        record = self.store.get(job_id)
        if record is None:
            raise JobNotFound(job_id)
        if record.status in FINISHED:
            raise JobEnded(record)
        running = self._running.get(job_id)
        if running is not None:
            running.cancelled = True
            if running.task.cancel():
                return replace(record, status="cancelled")
            ended = self.store.get(job_id)  # it finished just now, between two awaits
            assert ended is not None
            raise JobEnded(ended)
        finished = self.store.finish(job_id, "cancelled", stage=record.stage,
                                     error="cancelled before it started; nothing was changed")
        self._versions.pop(job_id, None)
        if finished is None:  # it ended meanwhile
            ended = self.store.get(job_id)
            assert ended is not None
            raise JobEnded(ended)
        telemetry.api_jobs.labels(kind=finished.kind, result=finished.status).inc()
        return finished

    def version(self, job_id: str) -> int:
        """Changes whenever the job's status or stage does; 0 once it is not running.

        Lets a reader keep a job's status for a moment and still see a new stage or the
        end at once.
        """
        return self._versions.get(job_id, 0)

    def _changed(self, job_id: str) -> None:
        self._versions[job_id] = self._versions.get(job_id, 0) + 1

    def digests_in_use(self) -> set[str]:
        """Cache entries running jobs are writing from (not to be deleted)."""
        return {r.digest for r in self._running.values() if r.digest is not None}

    @property
    def running(self) -> int:
        return len(self._running)

    # ---- start-up and upkeep -----------------------------------------------------------------

    def resume(self) -> int:
        """Queue every unfinished job again (a restart); returns how many."""
        jobs = self.store.unfinished()
        for record in jobs:
            if record.status == "running":
                self.store.update(record.job_id, status="pending", stage="initializing",
                                  percent=0.0,
                                  bytes_processed=0, eta_sec=None)
                self.log.info("api job resumes after a restart", job_id=record.job_id,
                              correlation_id=_correlation(record), was_stage=record.stage)
        for key in dict.fromkeys(self._key(record) for record in jobs):
            self.submit(key)
        return len(jobs)

    def prune(self) -> int:
        removed = self.store.prune(older_than=KEEP_FINISHED)
        if removed:
            self.log.info("finished api jobs pruned", jobs=removed)
        return removed

    async def run(self, stop: asyncio.Event, every: float = 3600.0) -> None:
        """Prune finished jobs now and every ``every`` seconds until ``stop``."""
        while not stop.is_set():
            try:
                self.prune()
            except Exception:
                telemetry.report_unexpected(self.log, "api")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=every)

    # ---- the engine's side --------------------------------------------------------------------

    async def process(self, key: str) -> None:
        """Run every pending job of ``key``, oldest first (the engine's processor)."""
        volume = key if key.startswith("volume ") else None
        while True:
            record = (self.store.next_pending(volume) if volume is not None
                      else self._next_fetch(key))
            if record is None:
                return
            await self._run_one(record)

    def _next_fetch(self, key: str) -> JobRecord | None:
        for record in self.store.unfinished():
            if record.kind == "fetch" and record.status == "pending" and self._key(record) == key:
                return record
        return None

    async def _run_one(self, record: JobRecord) -> None:
        live = Live()
        task = asyncio.ensure_future(self._execute(record, live))
        running = self._running[record.job_id] = _Running(task, live)
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if not running.cancelled:
                # The daemon is stopping: the job stays running and resumes after a restart.
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                raise
        finally:
            self._running.pop(record.job_id, None)
            self._versions.pop(record.job_id, None)

    async def _execute(self, record: JobRecord, live: Live) -> None:
        began = time.monotonic()
        context: Context | None = (propagate.extract({"traceparent": record.traceparent})
                                   if record.traceparent else None)
        with (structlog.contextvars.bound_contextvars(job_id=record.job_id,
                                                       correlation_id=_correlation(record)),
              telemetry.tracer.start_as_current_span(f"api job {record.kind}", context=context)
              as span, telemetry.jobs_in_progress.labels(kind="api").track_inprogress()):
            span.set_attribute("job_id", record.job_id)
            span.set_attribute("correlation_id", _correlation(record))
            log = self.log.bind(kind=record.kind, image_url=record.request["image_url"])
            self.store.update(record.job_id, status="running", stage="checking_cache")
            live.begin("checking_cache")
            self._changed(record.job_id)
            log.info("api job started", volume=record.request.get("volume_name"))
            target = Target(str(record.request.get("pool", self.pool)),
                                  str(record.request.get("volume_name", "")))
            try:
                result = await self._steps(record, live, target, log)
            except TemporaryError as exc:
                if not self._retry_later(record, live, began, log, exc):
                    span.set_attribute("result", "failed")
                    return
                span.set_attribute("result", "retrying")
                raise  # the engine runs the key again after its backoff, with no slot held
            except asyncio.CancelledError:
                running = self._running.get(record.job_id)
                if running is None or not running.cancelled:
                    raise
                state = left_behind(record, live, target)
                self._finish(record, "cancelled", live, began, log, error=state)
                span.set_attribute("result", "cancelled")
                return
            except PermanentError as exc:
                cause = exc.cause if isinstance(exc, WriteFailed) else exc  # no snapshot here
                self._finish(record, "failed", live, began, log,
                             error=f"{cause}; {left_behind(record, live, target)}")
                span.set_attribute("result", "failed")
                return
            except Exception as exc:
                telemetry.report_unexpected(log, "api", job_id=record.job_id)
                self._finish(record, "failed", live, began, log,
                             error=f"unexpected error ({type(exc).__name__}); "
                                   f"{left_behind(record, live, target)}")
                span.set_attribute("result", "failed")
                return
            live.begin("finalizing")
            live.percent = 100.0
            self._finish(record, "completed", live, began, log, **result)
            span.set_attribute("result", "completed")

    def _retry_later(self, record: JobRecord, live: Live, began: float, log: Any,
                     exc: TemporaryError) -> bool:
        """Put the job back to ``pending`` for the engine's retry; False (and the job failed)
        when this was its last attempt."""
        attempt = self._attempts.get(record.job_id, 0) + 1
        if self.retry.attempts and attempt >= self.retry.attempts:
            self._attempts.pop(record.job_id, None)
            self._finish(record, "failed", live, began, log,
                         error=f"{exc} (gave up after {attempt} attempts)")
            return False
        self._attempts[record.job_id] = attempt
        log.warning("api job hit a temporary failure; retrying", error=str(exc),
                    attempt=attempt, attempts=self.retry.attempts or None)
        self.store.update(record.job_id, status="pending", stage="initializing", percent=0.0,
                          bytes_processed=0, bytes_total=0, eta_sec=None,
                          error=f"retrying: {exc}")
        self._changed(record.job_id)
        return True

    async def _steps(self, record: JobRecord, live: Live, target: Target,
                     log: Any) -> dict[str, Any]:
        request = record.request
        image = ImageRef(request["bucket"], request["key"])
        entry, hit = await self._image(record, live, image, request["image_type"])
        result: dict[str, Any] = {"cache_hit": hit, "image_path": str(entry.path),
                                  "digest": entry.digest}
        if record.kind == "fetch":
            return result
        running = self._running.get(record.job_id)
        if running is not None:
            running.digest = entry.digest
        self._stage(record, live, "creating_volume", cache_hit=hit,
                    image_path=str(entry.path), digest=entry.digest)
        size = int(request["volume_size_gb"]) * 1024**3
        assert target.pool is not None and target.volume is not None
        facts = await gather(self.calls, target.pool, target.volume, size,
                             ImageFacts(api_image_name(image), entry.digest, entry.format,
                                        entry.virtual_size))
        plan = plan_or_refuse(facts)
        log.info("api job planned", steps=plan.describe())

        def progress(percent: float) -> None:
            live.advance(int(entry.virtual_size * percent / 100), entry.virtual_size)
            self._save_progress(record, live)

        target.found(facts.existing)
        await Executor(
            self.calls, self.write_image, facts.image, entry.path, target, log, record.job_id,
            on_progress=progress,
            on_writing=lambda: self._stage(record, live, "converting", entry.virtual_size),
        ).run(plan)
        assert target.path is not None
        path = target.path
        self._stage(record, live, "finalizing", entry.virtual_size)
        live.advance(entry.virtual_size, entry.virtual_size)
        telemetry.written_bytes.inc(entry.virtual_size)
        result["volume_path"] = path
        return result

    async def _image(self, record: JobRecord, live: Live, image: ImageRef,
                     image_type: str) -> tuple[CacheEntry, bool]:
        spec = ImageSpec(api_image_name(image), image.bucket, image.key, None,
                         "raw" if image_type == "raw" else "qcow2", checksum_required=True,
                         origin=f"api job {record.job_id}")
        hit = True

        async def downloading(_source: object) -> None:
            nonlocal hit
            hit = False
            self._stage(record, live, "downloading")
            live.fetching = (image.bucket, image.key)

        try:
            entry = await self.cache.ensure(spec, before_download=downloading)
        except NotUploadedYet as exc:
            raise PermanentError(f"{exc}: the image and its .sha256 sidecar must both be in "
                                 "the bucket") from exc
        except ImageRejected as exc:
            raise PermanentError(str(exc)) from exc
        finally:
            live.fetching = None
        return entry, hit

    # ---- bookkeeping ------------------------------------------------------------------------

    def _accept(self, kind: str, request: dict[str, Any], key: str,
                correlation_id: str | None, traceparent: str | None) -> JobRecord:
        job_id = str(uuid.uuid4())
        record = self.store.insert(JobRecord(
            job_id=job_id, kind=kind,  # type: ignore[arg-type]
            request=request, volume=key if kind == "provision" else None,
            correlation_id=correlation_id, traceparent=traceparent))
        self.log.info("api job accepted", job_id=job_id, kind=kind,
                      correlation_id=_correlation(record), image_url=request["image_url"],
                      volume=request.get("volume_name"))
        self.submit(key)
        return record

    def _key(self, record: JobRecord) -> str:
        if record.kind == "provision":
            assert record.volume is not None
            return record.volume
        return fetch_key(ImageRef(record.request["bucket"], record.request["key"]))

    def _stage(self, record: JobRecord, live: Live, stage: Stage, total: int = 0,
               **fields: Any) -> None:
        self._changed(record.job_id)
        live.begin(stage, total)
        self.store.update(record.job_id, **live.fields(), **fields)
        live.saved = time.monotonic()

    def _save_progress(self, record: JobRecord, live: Live) -> None:
        now = time.monotonic()
        if now - live.saved >= PROGRESS_EVERY:
            live.saved = now
            self.store.update(record.job_id, **live.fields())

    def _finish(self, record: JobRecord, status: str, live: Live, began: float, log: Any,
                *, error: str | None = None, **fields: Any) -> None:
        self._attempts.pop(record.job_id, None)
        finished = self.store.finish(record.job_id, status,  # type: ignore[arg-type]
                                     error=error, **live.fields(), **fields)
        self._changed(record.job_id)
        seconds = time.monotonic() - began
        telemetry.api_job_seconds.labels(kind=record.kind).observe(seconds)
        if finished is not None:
            telemetry.api_jobs.labels(kind=finished.kind, result=finished.status).inc()
        line = log.info if status == "completed" else log.warning
        line("api job finished", result=status, seconds=round(seconds, 3), error=error,
             volume_path=fields.get("volume_path"), cache_hit=fields.get("cache_hit"))


def _correlation(record: JobRecord) -> str:
    """The id a job's log lines and spans carry: the client's, else the job's own."""
    return record.correlation_id or record.job_id
