"""The S3 edge: look objects up and download images, verified and resumable.

Images are gigabytes and hosts sit behind flaky links, so a download is hashed while it
streams to disk (never read back; ``filesink`` overlaps writing, hashing and flushing),
survives interruptions by resuming with a ranged GET from the last byte written, and pins
the object's version with ``If-Match`` so an image replaced mid-download is caught rather
than spliced. Every call here blocks: the caller runs it in an executor thread
(``asyncio.to_thread``). Nothing is logged here; the caller logs, optionally fed attempt
messages through ``log``.
"""

from __future__ import annotations

import http.client
import io
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import certifi
import urllib3
from minio import Minio
from minio.error import InvalidResponseError, S3Error, ServerError

from watcher.adapters.filesink import HashingFileSink
from watcher.core.backoff import Backoff
from watcher.core.errors import PermanentError, TemporaryError
from watcher.settings import S3_TUNING, S3Settings

_MISSING_CODES = frozenset({"NoSuchKey", "NoSuchBucket", "NoSuchObject", "ResourceNotFound"})
_TRANSIENT_CODES = frozenset({
    "SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout", "OperationAborted",
    "RequestTimeTooSkewed", "XMinioServerNotInitialized", "XMinioStorageFull",
})
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")

T = TypeVar("T")


@dataclass(frozen=True)
class ObjectInfo:
    """What the bucket says about one object."""

    bucket: str
    key: str
    size: int
    """Bytes."""
    etag: str
    """Without quotes; an MD5 for simple uploads, ``<md5>-<parts>`` for multipart ones."""
    last_modified: datetime | None


@dataclass(frozen=True)
class DownloadResult:
    """A finished download: what was written and how it went."""

    sha256: str
    """Lowercase hex digest of the bytes written, computed while they streamed."""
    size: int
    etag: str
    """The object version that was downloaded; every resumed range matched it."""
    resumed: int
    """Ranged requests needed after interruptions; 0 for a clean run."""


class _Transient(Exception):
    """An interruption worth retrying; wraps the original error."""


class _ObjectChanged(Exception):
    """The object is not the version the download started with (or was asked for)."""


class S3Store:
    """Blocking S3 client; every method may be called from any executor thread."""

    def __init__(
        self,
        settings: S3Settings,
        *,
        backoff: Backoff = S3_TUNING.retry_backoff,
        chunk_size: int = 1024 * 1024,
        timeout: float = 30.0,
        log: Callable[[str], None] | None = None,
    ) -> None:
        """``timeout`` (seconds) bounds connecting and each socket read; ``log`` receives
        one line per retry, e.g. ``"GET bucket/key: attempt 2/6 in 1.3s (...)"``."""
        self._backoff = backoff
        self._chunk_size = chunk_size
        self._log = log
        # Retries are ours (with jitter, resume and cancellation), not urllib3's.
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=timeout, read=timeout),
            maxsize=8,
            retries=False,
            cert_reqs="CERT_REQUIRED",
            ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
        )
        self._client = Minio(
            settings.host,
            access_key=settings.access_key or None,
            secret_key=settings.secret_key or None,
            secure=settings.secure,
            region=settings.region or None,
            http_client=http,
        )

    # -- lookups -----------------------------------------------------------------------------

    def stat(self, bucket: str, key: str) -> ObjectInfo | None:
        """The object's metadata, or None when the object or its bucket does not exist."""

        def attempt() -> ObjectInfo | None:
            try:
                found = self._client.stat_object(bucket, key)
            except S3Error as exc:
                if exc.code in _MISSING_CODES:
                    return None
                raise
            return _object_info(bucket, found)

        return self._retrying(f"HEAD {bucket}/{key}", attempt)

    def list_objects(self, bucket: str, prefix: str = "") -> list[ObjectInfo]:
        """Every object under ``prefix``, recursively; PermanentError for a missing bucket."""

        def attempt() -> list[ObjectInfo]:
            listing = self._client.list_objects(bucket, prefix=prefix or None, recursive=True)
            return [_object_info(bucket, obj) for obj in listing if not obj.is_dir]

        return self._retrying(f"LIST {bucket}/{prefix}", attempt)

    def read_small(self, bucket: str, key: str, limit: int = 4096) -> bytes | None:
        """The whole content of a small object (a sidecar), or None when it does not exist.

        Objects larger than ``limit`` bytes raise PermanentError without being read.
        """

        def attempt() -> bytes | None:
            try:
                response = self._client.get_object(bucket, key)
            except S3Error as exc:
                if exc.code in _MISSING_CODES:
                    return None
                raise
            try:
                declared = response.headers.get("Content-Length")
                if declared is not None and int(declared) > limit:
                    raise PermanentError(
                        f"{bucket}/{key} is {declared} bytes, more than the {limit} expected"
                    )
                data: bytes = response.read(limit + 1)
                if len(data) > limit:
                    raise PermanentError(f"{bucket}/{key} is more than the {limit} bytes expected")
                return data
            finally:
                response.close()
                response.release_conn()

        return self._retrying(f"GET {bucket}/{key}", attempt)

    def put_small(self, bucket: str, key: str, data: bytes,
                  content_type: str = "application/json") -> None:
        """Write a small object (a fleet status document) in one PUT."""

        def attempt() -> None:
            self._client.put_object(bucket, key, io.BytesIO(data), len(data),
                                    content_type=content_type)

        self._retrying(f"PUT {bucket}/{key}", attempt)

    # -- download ----------------------------------------------------------------------------

    def download(
        self,
        bucket: str,
        key: str,
        dest: Path,
        *,
        expected_etag: str | None = None,
        on_bytes: Callable[[int], None] | None = None,
        stop: threading.Event | None = None,
        durable: bool = True,
    ) -> DownloadResult:
        """Stream ``bucket/key`` into a fresh file at ``dest`` while hashing it.

        ``expected_etag`` pins the version from the start (e.g. the one a notification
        announced); otherwise the version served first is pinned. ``on_bytes`` is called
        with the size of every chunk written. ``durable=False`` leaves the data to the page
        cache (no writeback, no fsync: the caller syncs it later). On any failure ``dest``
        is removed.
        Raises PermanentError (missing object, access denied) or TemporaryError
        (interruptions past the retry budget, object replaced meanwhile, ``stop`` set).
        """
        where = f"{bucket}/{key}"
        stop = stop or threading.Event()
        transfer = _Transfer(expected_etag.strip('"') if expected_etag else None)
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        # Truncated only when not empty: ext4 (auto_da_alloc) answers a truncation, even of
        # an empty file, by writing back everything written since when the file is
        # closed, which cost an unsynced 1 GiB download a third of a second at close().
        if os.fstat(fd).st_size:
            os.ftruncate(fd, 0)
        sink = HashingFileSink(fd, durable=durable)
        finished = False
        try:
            delays = self._delays()
            attempt = 1
            while True:
                if stop.is_set():
                    raise TemporaryError(f"download cancelled: {where}")
                written_before = transfer.offset
                try:
                    self._fetch(bucket, key, transfer, sink, on_bytes, stop)
                    break
                except _ObjectChanged as exc:
                    raise TemporaryError(f"{where} changed while downloading: {exc}") from None
                except _Transient as exc:
                    if transfer.offset > written_before:
                        delays = self._delays()  # progress was made: a fresh retry budget
                        attempt = 1
                    delay = next(delays, None)
                    if delay is None:
                        raise TemporaryError(
                            f"downloading {where} failed after {attempt} attempts "
                            f"at byte {transfer.offset}: {exc}"
                        ) from exc.__cause__
                    attempt += 1
                    self._note(f"GET {where}", attempt, delay, exc)
                    if stop.wait(delay):
                        raise TemporaryError(f"download cancelled: {where}") from None
            sha256 = sink.finish()
            finished = True
        except OSError as exc:
            raise TemporaryError(f"writing {where} to {dest} failed: {exc}") from exc
        finally:
            if not finished:
                sink.abort()
            os.close(fd)
            if not finished:
                dest.unlink(missing_ok=True)
        return DownloadResult(
            sha256=sha256, size=transfer.offset, etag=transfer.etag or "",
            resumed=transfer.resumed,
        )

    def _fetch(
        self,
        bucket: str,
        key: str,
        transfer: _Transfer,
        out: HashingFileSink,
        on_bytes: Callable[[int], None] | None,
        stop: threading.Event,
    ) -> None:
        """One GET from ``transfer.offset`` to the end; raises _Transient when interrupted."""
        headers: dict[str, str | list[str] | tuple[str]] = (
            {"If-Match": f'"{transfer.etag}"'} if transfer.etag else {}
        )
        if transfer.offset > 0:
            transfer.resumed += 1
        try:
            response = self._client.get_object(
                bucket, key, offset=transfer.offset, request_headers=headers
            )
        except S3Error as exc:
            if exc.code == "PreconditionFailed":
                raise _ObjectChanged(f"ETag is no longer {transfer.etag}") from None
            raise _classified(exc, f"{bucket}/{key}") from exc
        except Exception as exc:
            if _http_status(exc) == 412:  # a 412 without an XML body
                raise _ObjectChanged(f"ETag is no longer {transfer.etag}") from None
            raise _classified(exc, f"{bucket}/{key}") from exc

        try:
            transfer.accept(response)
            for chunk in _chunks(response, self._chunk_size, f"{bucket}/{key}"):
                out.write(chunk)
                transfer.offset += len(chunk)
                if on_bytes is not None:
                    on_bytes(len(chunk))
                if stop.is_set():
                    raise TemporaryError(f"download cancelled: {bucket}/{key}")
            if transfer.total is not None and transfer.offset != transfer.total:
                raise _Transient(f"response ended at byte {transfer.offset} of {transfer.total}")
        finally:
            response.close()
            response.release_conn()

    # -- retries -----------------------------------------------------------------------------

    def _delays(self) -> Iterator[float]:
        return self._backoff.delays()

    def _retrying(self, what: str, operation: Callable[[], T]) -> T:
        """Run ``operation``, retrying transient failures on the backoff schedule."""
        delays = self._delays()
        attempt = 1
        while True:
            try:
                return operation()
            except (PermanentError, TemporaryError):
                raise
            except Exception as exc:
                failure = _classified(exc, what)
                if isinstance(failure, PermanentError):
                    raise failure from exc
                delay = next(delays, None)
                if delay is None:
                    raise TemporaryError(
                        f"{what} failed after {attempt} attempts: {exc}"
                    ) from exc
                attempt += 1
                self._note(what, attempt, delay, exc)
                time.sleep(delay)

    def _note(self, what: str, attempt: int, delay: float, exc: BaseException) -> None:
        if self._log is not None:
            total = self._backoff.attempts or "∞"
            self._log(f"{what}: attempt {attempt}/{total} in {delay:.1f}s ({_describe(exc)})")


class _Transfer:
    """Progress of one download across its ranged requests."""

    def __init__(self, etag: str | None) -> None:
        self.etag = etag
        self.offset = 0
        self.total: int | None = None
        self.resumed = 0

    def accept(self, response: Any) -> None:
        """Check that a response continues this download exactly where it stopped."""
        served_etag = (response.headers.get("ETag") or "").strip().strip('"') or None
        if self.etag is not None and served_etag is not None and served_etag != self.etag:
            # A server that ignores If-Match still reports which version it sent.
            raise _ObjectChanged(f"ETag {served_etag} instead of {self.etag}")
        if self.etag is None:
            self.etag = served_etag

        if self.offset == 0:
            length = response.headers.get("Content-Length")
            self.total = int(length) if length is not None else None
            return
        match = _CONTENT_RANGE.match(response.headers.get("Content-Range") or "")
        if response.status != 206 or match is None:
            raise _Transient(f"server ignored the range request from byte {self.offset}")
        start, total = int(match[1]), match[3]
        if start != self.offset:
            raise _Transient(f"server resumed at byte {start}, not {self.offset}")
        if total != "*" and self.total is not None and int(total) != self.total:
            raise _ObjectChanged(f"size {total} instead of {self.total}")


def _chunks(response: Any, size: int, where: str) -> Iterator[bytes]:
    """The response body in pieces of up to ``size`` bytes; interruptions become _Transient."""
    while True:
        try:
            chunk: bytes = response.read(size)
        except Exception as exc:
            raise _classified(exc, where) from exc
        if not chunk:
            return
        yield chunk


def _classified(exc: BaseException, where: str) -> Exception:
    """Map an SDK or network error to _Transient (retry) or PermanentError (give up)."""
    if isinstance(exc, S3Error):
        status = getattr(exc.response, "status", 0) or 0
        if exc.code in _TRANSIENT_CODES or status >= 500 or status == 429:
            return _Transient(_describe(exc))
        return PermanentError(f"{where}: {exc.code}: {exc.message or 'S3 request refused'}")
    status = _http_status(exc)
    if isinstance(exc, ServerError | InvalidResponseError):
        if status is None or status >= 500 or status == 429:
            return _Transient(_describe(exc))
        return PermanentError(f"{where}: unexpected response (HTTP {status})")
    if isinstance(exc, urllib3.exceptions.HTTPError | http.client.HTTPException | OSError):
        return _Transient(_describe(exc))
    return PermanentError(f"{where}: {_describe(exc)}")


def _http_status(exc: BaseException) -> int | None:
    """The HTTP status behind an SDK error, when it carries one."""
    if isinstance(exc, ServerError):
        return int(exc.status_code)
    if isinstance(exc, InvalidResponseError):
        return int(getattr(exc, "_code", 0)) or None
    return None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, S3Error):
        return f"{exc.code}: {exc.message}"
    return f"{type(exc).__name__}: {exc}"


def _object_info(bucket: str, found: Any) -> ObjectInfo:
    return ObjectInfo(
        bucket=bucket,
        key=found.object_name,
        size=int(found.size or 0),
        etag=(found.etag or "").strip('"'),
        last_modified=found.last_modified,
    )
