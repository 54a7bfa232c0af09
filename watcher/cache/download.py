"""One object version's bytes into a temp file: the transfer, its progress and its reports.

Why it exists: ``Cache.ensure`` decides whether and what to fetch; how the bytes arrive is
mechanics of another kind, changed for other reasons: a bound on transfers at once, a
thread per transfer that stops at its next chunk when cancelled, the download metrics,
progress that API job status reads, and one rate-limited warning per failing version.
"""

from __future__ import annotations

import asyncio
import errno
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from watcher import telemetry
from watcher.adapters.s3 import DownloadResult, ObjectInfo, S3Store
from watcher.cache.entry import Source
from watcher.cache.files import PartFile
from watcher.core.errors import PermanentError, TemporaryError
from watcher.core.policy import ImageSpec
from watcher.core.repeats import RepeatFilter


@dataclass
class FetchProgress:
    """One object being fetched: bytes downloaded so far, then verification.

    Read by API job status (``GET /api/v1/jobs/{id}``): progress comes from the transfer
    itself, never from elapsed time.
    """

    total: int
    """Bytes of the object, as S3 listed it."""
    done: int = 0
    started: float = field(default_factory=time.monotonic)
    stage: str = "downloading"
    """``downloading``, then ``verifying`` (hash check and inspection) until committed."""

    def add(self, count: int) -> None:
        self.done += count  # from the download thread: one int store, atomic in CPython


class Downloader:
    """Downloads into temp files, ``max_concurrent`` at a time; failures reported once."""

    def __init__(self, s3: S3Store, new_part: Callable[[], PartFile], *, max_concurrent: int,
                 problems: RepeatFilter) -> None:
        self.s3 = s3
        self._new_part = new_part
        self._slots = asyncio.Semaphore(max_concurrent)
        self._problems = problems
        self.log = telemetry.get_logger(component="cache")

    async def download(self, image: ImageSpec, obj: ObjectInfo, progress: FetchProgress,
                       durable: bool) -> tuple[PartFile, str, int]:
        """The object's bytes in a new temp file, with their SHA-256 and size."""
        part = await asyncio.to_thread(self._new_part)
        started = time.monotonic()
        async with self._slots:
            transfer_started = time.monotonic()  # the histogram leaves out the queueing
            telemetry.jobs_in_progress.labels(kind="download").inc()
            try:
                with telemetry.tracer.start_as_current_span(
                        "download", attributes={"bucket": obj.bucket, "key": obj.key}):
                    result = await self._transfer(obj, part, progress, durable)
            except BaseException as err:
                telemetry.downloads.labels(result="failed").inc()
                part.release()
                if isinstance(err, Exception):
                    self._report_failure(image, obj, err)
                raise
            finally:
                telemetry.jobs_in_progress.labels(kind="download").dec()
        telemetry.downloads.labels(result="ok").inc()
        telemetry.download_seconds.observe(time.monotonic() - transfer_started)
        self.log.info("downloaded", image=image.name, key=obj.key, bytes=result.size,
                      seconds=round(time.monotonic() - started, 3), resumed=result.resumed)
        return part, result.sha256, result.size

    async def _transfer(self, obj: ObjectInfo, part: PartFile, progress: FetchProgress,
                        durable: bool) -> DownloadResult:
        """The download in a thread; cancelling this stops the thread and waits for it."""
        stop = threading.Event()

        def on_bytes(count: int) -> None:
            telemetry.download_bytes.inc(count)
            progress.add(count)

        transfer = asyncio.ensure_future(asyncio.to_thread(
            self.s3.download, obj.bucket, obj.key, part.path,
            expected_etag=obj.etag, on_bytes=on_bytes, stop=stop, durable=durable))
        try:
            return await asyncio.shield(transfer)
        except asyncio.CancelledError:
            stop.set()  # the thread ends at its next chunk and removes the file
            await asyncio.gather(transfer, return_exceptions=True)
            raise

    def _report_failure(self, image: ImageSpec, obj: ObjectInfo, err: Exception) -> None:
        reason = failure_reason(err)
        source = Source(obj.bucket, obj.key, obj.etag)
        repeats = self._problems.admit((source, reason), time.monotonic())
        if repeats is not None:
            self.log.warning("image download failed", image=image.name, bucket=obj.bucket,
                             key=obj.key, version=obj.etag, reason=reason,
                             error=f"{type(err).__name__}: {err}", repeats_unlogged=repeats)


def failure_reason(err: BaseException) -> str:
    """A short stable word for a failed download: the errno name (``ENOSPC``) when the
    cause was an OS error, else whether it was temporary or permanent."""
    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno is not None:
            return errno.errorcode.get(cause.errno, f"errno {cause.errno}")
        cause = cause.__cause__
    if isinstance(err, TemporaryError):
        return "temporary"
    return "permanent" if isinstance(err, PermanentError) else type(err).__name__
