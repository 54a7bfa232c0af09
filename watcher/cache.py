"""The content-addressed image cache: verified, inspected images named by their SHA-256.

Why it exists: every host keeps the images its policies name ready on local disk, so a
reprovision never waits on the network, and an image is trusted only once.

Layout under ``cache.dir``::

    objects/<sha256>.<format>   the image as uploaded (qcow2 stays compressed)
    objects/<sha256>.json       its record: sources (bucket/key/ETag), sizes, times
    refs/<image name>.json      the digest of the image's current version
    tmp/                        downloads in progress (each ``.part`` flock-ed by its owner)
    .lock                       serialises changes between processes

An entry exists when its record exists. Both files appear by atomic rename after the
download was hashed, compared with the sidecar and inspected, so a crash leaves at most
a temp file. Records are small JSON files so an operator can read them with ``cat``.

Reading (``entries``, ``current``, ``verify``) creates, changes and removes nothing, so
``status`` and ``cache list`` are safe while the daemon runs. Leftovers of a crash are
removed only by ``remove_leftovers`` (the daemon at start-up, ``cache prune``), under the
cache lock, and never a temp file whose owner still holds its lock: a running download,
or one kept aside until a newer sidecar matches it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import stat
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from watcher import telemetry
from watcher.adapters.filesink import fsync_path
from watcher.adapters.qemu_img import inspect_image_file
from watcher.adapters.s3 import ObjectInfo, S3Store
from watcher.core.errors import (
    ImageRejected,
    ObjectUnavailable,
    PermanentError,
    SidecarUnavailable,
    TemporaryError,
    UnsafeName,
)
from watcher.core.inspect import DEFAULT_MAX_VIRTUAL_SIZE
from watcher.core.paths import digest_file, image_file, is_digest
from watcher.core.policy import SIDECAR_SUFFIX, ImageFormat, ImageSpec, PolicySet
from watcher.core.repeats import RepeatFilter
from watcher.core.sidecar import parse_sidecar

_T = TypeVar("_T")


LRU_RESOLUTION = 300.0
"""Seconds: a use within this time of the recorded one is not written again."""


def _age_seconds(stamp: str) -> float:
    try:
        return (datetime.now(UTC) - datetime.fromisoformat(stamp)).total_seconds()
    except ValueError:
        return float("inf")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Source:
    """Where a cached file came from; one digest may have several."""

    bucket: str
    key: str
    etag: str


@dataclass(frozen=True)
class CacheEntry:
    """A verified, inspected image file, named by its SHA-256."""

    digest: str
    path: Path
    format: ImageFormat
    virtual_size: int
    size: int
    image: str
    """Policy image name it was last fetched for."""
    bucket: str
    key: str
    etag: str
    sources: tuple[Source, ...] = ()
    created_at: str = ""
    last_used_at: str = ""
    verified_at: str = ""
    checksum: str = "sidecar"
    """``sidecar``: compared with a published checksum; ``computed``: optional-checksum image."""

    def record(self) -> dict[str, Any]:
        data = asdict(self)
        data["path"] = self.path.name
        data["sources"] = [asdict(s) for s in self.sources]
        return data

    @classmethod
    def from_record(cls, directory: Path, data: dict[str, Any]) -> CacheEntry:
        """The entry a record describes; ``ValueError`` unless it names its own data file."""
        fields = dict(data)
        digest, fmt = str(data["digest"]), str(data["format"])
        if fmt not in ("qcow2", "raw") or str(data["path"]) != f"{digest}.{fmt}":
            raise ValueError(f"record names data file {data['path']!r}, not {digest}.{fmt}")
        fields["path"] = digest_file(directory, digest, f".{fmt}")
        fields["sources"] = tuple(Source(**s) for s in data.get("sources", ()))
        return cls(**fields)


@dataclass(frozen=True)
class VerifyResult:
    digest: str
    ok: bool
    detail: str


class PartFile:
    """A temp file in ``tmp/`` and the flock that marks it as owned by a live process.

    The lock is held from creation until the file is renamed into place or removed, so
    clean-up in any process can tell a live download from a crash's leftover.
    """

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def create(cls, directory: Path, suffix: str = ".part") -> PartFile:
        while True:
            path = directory / f"{uuid.uuid4().hex}{suffix}"
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                # Clean-up may have locked and removed the file before we locked it.
                if _same_file(os.stat(path), os.fstat(fd)):
                    return cls(path, fd)
            except (BlockingIOError, FileNotFoundError):
                pass
            os.close(fd)

    def release(self) -> None:
        """Remove the file if it is still in ``tmp/``, then drop the lock."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)
            self._fd = None


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _remove_unless_locked(path: Path) -> bool:
    """Remove a regular file nobody holds a lock on; False if it is live or gone."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return False
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if not _same_file(os.stat(path), st):
            return False
        path.unlink()
        return True
    except OSError:  # BlockingIOError: its owner is alive
        return False
    finally:
        os.close(fd)


@dataclass
class _SingleFlight:
    """Concurrent callers asking for the same key share one running task."""

    running: dict[str, asyncio.Task[Any]] = field(default_factory=dict)

    async def run(self, key: str, work: Callable[[], Awaitable[_T]]) -> _T:
        task = self.running.get(key)
        if task is None:
            task = asyncio.ensure_future(work())
            self.running[key] = task
            task.add_done_callback(lambda _t: self.running.pop(key, None))
        # shield: one caller being cancelled must not cancel the others' download.
        return await asyncio.shield(task)


class ImageCache:
    """Keeps the current version of every policy image on local disk, verified."""

    def __init__(
        self,
        directory: Path,
        s3: S3Store,
        *,
        max_size: int,
        max_virtual_size: int = DEFAULT_MAX_VIRTUAL_SIZE,
        max_concurrent_downloads: int = 2,
        pinned: Callable[[], PolicySet] | None = None,
    ) -> None:
        self.dir = directory
        self.objects = directory / "objects"
        self.refs = directory / "refs"
        self.tmp = directory / "tmp"
        self.s3 = s3
        self.max_size = max_size
        self.max_virtual_size = max_virtual_size
        self._policies = pinned
        self._downloads = asyncio.Semaphore(max_concurrent_downloads)
        self._flights = _SingleFlight()
        self.log = telemetry.get_logger(component="cache")
        # Downloads whose sidecar did not match yet, kept (and locked) for a newer one.
        self._pending: dict[tuple[str, str, str], tuple[PartFile, str, int]] = {}
        # Object versions already rejected: not downloaded again until they change.
        self._rejected: dict[Source, ImageRejected] = {}
        self._problems = RepeatFilter()

    # ---- start-up -------------------------------------------------------------------

    def prepare(self) -> None:
        """Create the layout; for processes that write (the daemon, ``cache warm|prune``)."""
        for d in (self.objects, self.refs, self.tmp):
            d.mkdir(parents=True, exist_ok=True)

    async def recover(self) -> int:
        """The daemon's start-up: create the layout, remove leftovers; returns files removed."""
        self.prepare()
        removed = await asyncio.to_thread(self.remove_leftovers)
        self._update_gauges()
        return removed

    def remove_leftovers(self) -> int:
        """Remove what a crash left behind, under the cache lock; returns files removed.

        Temp files still locked by their owner (a download in this or another process)
        are kept. Blocking: run it in a thread from async code.
        """
        if not self.dir.is_dir():
            return 0
        removed = 0
        with self._locked():
            # Every other temp file (records being written) is written under this lock.
            for leftover in _listdir(self.tmp):
                removed += _remove_unless_locked(leftover)
            # A data file without its record was never committed (crash between the renames).
            for data in _listdir(self.objects):
                if data.suffix != ".json" and not data.with_suffix(".json").exists():
                    data.unlink(missing_ok=True)
                    removed += 1
        if removed:
            self.log.info("removed leftover temporary files", count=removed)
        return removed

    # ---- reading ----------------------------------------------------------------------

    def entries(self) -> list[CacheEntry]:
        """Every committed entry, oldest use first."""
        found = []
        for record in self.objects.glob("*.json"):
            entry = self._read_entry(record)
            if entry is not None:
                found.append(entry)
        return sorted(found, key=lambda e: (e.last_used_at, e.digest))

    def get(self, digest: str) -> CacheEntry | None:
        if not is_digest(digest):
            return None  # no file is named by anything else
        return self._read_entry(digest_file(self.objects, digest, ".json"))

    def current(self, image_name: str) -> CacheEntry | None:
        """The last known current version of an image, without touching the network."""
        try:
            ref = self._read_json(self._ref_path(image_name))
        except UnsafeName:
            return None  # such an image cannot have been cached
        return self.get(str(ref["digest"])) if ref else None

    def _ref_path(self, image_name: str) -> Path:
        return image_file(self.refs, image_name, ".json")

    def find_source(self, source: Source) -> CacheEntry | None:
        """The entry already holding exactly this object version, if any."""
        for entry in self.entries():
            if source in entry.sources:
                return entry
        return None

    # ---- warming ----------------------------------------------------------------------

    async def ensure(self, image: ImageSpec, *,
                     before_download: Callable[[Source], Awaitable[None]] | None = None,
                     ) -> CacheEntry:
        """The current version of ``image``: from the cache, or downloaded, verified, inspected.

        ``before_download`` is awaited when this version must be downloaded, before the
        download is shared with other callers (pre-warming waits its fleet spread there;
        a reprovision passes none and downloads at once, and a pre-warm that waited then
        finds its download in the cache).

        Raises ``ObjectUnavailable`` or ``SidecarUnavailable`` while the image or the
        sidecar it needs is not uploaded yet, ``ImageRejected`` for a bad image,
        ``UnsafeName`` for an image name that cannot be a file name, ``TemporaryError``
        when S3 is unreachable.
        """
        # Refused before any download: the name becomes a file name once the image is cached.
        self._ref_path(image.name)
        with telemetry.tracer.start_as_current_span("warm", attributes={"image": image.name}):
            obj = await self._resolve(image)
            digest = await self._published_digest(image, obj)
            source = Source(obj.bucket, obj.key, obj.etag)
            known_bad = self._rejected.get(source)
            if known_bad is not None and known_bad.reason != "checksum_mismatch":
                # The same bytes will fail the same way; a new upload has a new ETag.
                self._report_rejection(image, source, digest, known_bad)
                raise known_bad
            hit = self._lookup(digest, source)
            if hit is None and before_download is not None:
                await before_download(source)
                hit = self._lookup(digest, source)
            if hit is not None:
                telemetry.cache_hits.inc()
                return self._use(hit, image, source)
            flight_key = digest or f"{obj.bucket}/{obj.key}@{obj.etag}"
            entry = await self._flights.run(
                flight_key, lambda: self._fetch(image, obj, source, digest)
            )
            entry = self._use(entry, image, source)
            # Only now is the new version the image's current one, so the old may go.
            self.evict()
            return entry

    def _lookup(self, digest: str | None, source: Source) -> CacheEntry | None:
        if digest is not None:
            entry = self.get(digest)
            # Same digest but an unknown object version: the sidecar may be stale, so only a
            # known ETag counts as proof; otherwise download and hash again.
            if entry is not None and (source in entry.sources or source.etag in
                                      {s.etag for s in entry.sources}):
                return entry
            return None
        return self.find_source(source)

    async def _resolve(self, image: ImageSpec) -> ObjectInfo:
        if image.key is not None:
            obj = await asyncio.to_thread(self.s3.stat, image.bucket, image.key)
            if obj is None:
                raise ObjectUnavailable(
                    f"image {image.name}: waiting for s3://{image.bucket}/{image.key}")
            return obj
        assert image.prefix is not None
        listed = await asyncio.to_thread(self.s3.list_objects, image.bucket, image.prefix)
        versions = [o for o in listed if not o.key.endswith(SIDECAR_SUFFIX)]
        if not versions:
            raise ObjectUnavailable(
                f"image {image.name}: waiting for an object under "
                f"s3://{image.bucket}/{image.prefix}")
        return max(versions, key=lambda o: (o.last_modified or datetime.min.replace(tzinfo=UTC),
                                            o.key))

    async def _published_digest(self, image: ImageSpec, obj: ObjectInfo) -> str | None:
        sidecar_key = obj.key + SIDECAR_SUFFIX
        content = await asyncio.to_thread(self.s3.read_small, obj.bucket, sidecar_key)
        if content is None:
            if image.checksum_required:
                raise SidecarUnavailable(
                    f"image {image.name}: waiting for s3://{obj.bucket}/{sidecar_key}")
            return None
        return parse_sidecar(content, obj.key.rsplit("/", 1)[-1])

    async def _fetch(self, image: ImageSpec, obj: ObjectInfo, source: Source,
                     expected: str | None) -> CacheEntry:
        pending = self._pending.get((source.bucket, source.key, source.etag))
        if pending is not None and expected is not None and pending[1] == expected:
            # Downloaded earlier against a stale sidecar; the fresh sidecar now matches.
            part, digest, size = pending
            del self._pending[(source.bucket, source.key, source.etag)]
            self.log.info("sidecar now matches an earlier download", image=image.name,
                          digest=digest)
        else:
            telemetry.cache_misses.inc()
            part, digest, size = await self._download(image, obj)
        path = part.path
        try:
            if expected is not None and digest != expected:
                self._keep_pending(source, part, digest, size)
                raise ImageRejected(
                    "checksum_mismatch",
                    f"image {image.name}: s3://{obj.bucket}/{obj.key} has SHA-256 {digest}, "
                    f"its sidecar says {expected}; not cached",
                )
            with telemetry.tracer.start_as_current_span("inspect", attributes={"digest": digest}):
                facts = await inspect_image_file(
                    path, image.format, max_virtual_size=self.max_virtual_size)
            now = _now()
            entry = CacheEntry(
                digest=digest, path=digest_file(self.objects, digest, f".{image.format}"),
                format=image.format, virtual_size=facts.virtual_size, size=size,
                image=image.name, bucket=obj.bucket, key=obj.key, etag=obj.etag,
                sources=(source,), created_at=now, last_used_at=now, verified_at=now,
                checksum="sidecar" if expected is not None else "computed",
            )
            self._commit(path, entry)
        except ImageRejected as err:
            telemetry.images_rejected.labels(reason=err.reason).inc()
            self._rejected[source] = err
            self._report_rejection(image, source, digest, err)
            raise
        finally:
            if not self._is_pending(part):
                part.release()  # after a commit the file is in objects/: only the lock goes
        self.log.info("image cached", image=image.name, digest=digest, size=size,
                      virtual_size=entry.virtual_size, key=obj.key)
        return entry

    async def _download(self, image: ImageSpec, obj: ObjectInfo) -> tuple[PartFile, str, int]:
        part = PartFile.create(self.tmp)
        started = time.monotonic()
        async with self._downloads:
            telemetry.jobs_in_progress.labels(kind="download").inc()
            try:
                with telemetry.tracer.start_as_current_span(
                        "download", attributes={"bucket": obj.bucket, "key": obj.key}):
                    result = await asyncio.to_thread(
                        self.s3.download, obj.bucket, obj.key, part.path,
                        expected_etag=obj.etag, on_bytes=telemetry.download_bytes.inc)
            except BaseException as err:
                telemetry.downloads.labels(result="failed").inc()
                part.release()
                if isinstance(err, Exception):
                    self._report_download_failure(image, obj, err)
                raise
            finally:
                telemetry.jobs_in_progress.labels(kind="download").dec()
        telemetry.downloads.labels(result="ok").inc()
        self.log.info("downloaded", image=image.name, key=obj.key, bytes=result.size,
                      seconds=round(time.monotonic() - started, 3), resumed=result.resumed)
        return part, result.sha256, result.size

    def _report_rejection(self, image: ImageSpec, source: Source, digest: str | None,
                          err: ImageRejected) -> None:
        """A warning per (object version, reason); repeats of one are rate-limited."""
        repeats = self._problems.admit((source, err.reason), time.monotonic())
        if repeats is not None:
            self.log.warning("image rejected", image=image.name, bucket=source.bucket,
                             key=source.key, version=source.etag, digest=digest,
                             reason=err.reason, error=str(err), repeats_unlogged=repeats)

    def _report_download_failure(self, image: ImageSpec, obj: ObjectInfo,
                                 err: Exception) -> None:
        reason = _failure_reason(err)
        source = Source(obj.bucket, obj.key, obj.etag)
        repeats = self._problems.admit((source, reason), time.monotonic())
        if repeats is not None:
            self.log.warning("image download failed", image=image.name, bucket=obj.bucket,
                             key=obj.key, version=obj.etag, reason=reason,
                             error=f"{type(err).__name__}: {err}", repeats_unlogged=repeats)

    def _keep_pending(self, source: Source, part: PartFile, digest: str, size: int) -> None:
        old = self._pending.pop((source.bucket, source.key, source.etag), None)
        if old is not None and old[0] is not part:
            old[0].release()
        self._pending[(source.bucket, source.key, source.etag)] = (part, digest, size)

    def _is_pending(self, part: PartFile) -> bool:
        return any(p is part for p, _, _ in self._pending.values())

    def _commit(self, part: Path, entry: CacheEntry) -> None:
        """Make the entry visible: data file first, then its record, each by atomic rename."""
        with self._locked():
            existing = self.get(entry.digest)
            if existing is not None:
                # Same bytes under another key: one file, one more source.
                merged = replace(existing, sources=_merge(existing.sources, entry.sources))
                self._write_record(merged)
                return
            os.replace(part, entry.path)
            self._write_record(entry)
            fsync_path(self.objects)
        self._update_gauges()

    def _use(self, entry: CacheEntry, image: ImageSpec, source: Source) -> CacheEntry:
        """Record a use: LRU time, the source, and the image's current-version ref."""
        latest = self.get(entry.digest) or entry
        ref = self._read_json(self._ref_path(image.name)) or {}
        unchanged = (source in latest.sources and latest.image == image.name
                     and ref.get("digest") == entry.digest and ref.get("etag") == source.etag)
        if unchanged and _age_seconds(latest.last_used_at) < LRU_RESOLUTION:
            # A duplicate notification: nothing to record, so no file write on the loop.
            return latest
        with self._locked():
            updated = replace(latest, last_used_at=_now(), image=image.name,
                              bucket=source.bucket, key=source.key, etag=source.etag,
                              sources=_merge(latest.sources, (source,)))
            self._write_record(updated)
            if not unchanged:
                self._write_json(self._ref_path(image.name), {
                    "digest": entry.digest, "bucket": source.bucket, "key": source.key,
                    "etag": source.etag, "resolved_at": _now()})
        return updated

    # ---- maintenance ------------------------------------------------------------------

    def pinned_digests(self) -> set[str]:
        """Digests that are the current version of an image the policies define."""
        if self._policies is None:
            return set()
        pinned = set()
        for image in self._policies().images_to_keep_warm():
            entry = self.current(image.name)
            if entry is not None:
                pinned.add(entry.digest)
        return pinned

    def evict(self) -> list[str]:
        """Remove least-recently-used unpinned entries until the cache fits ``max_size``."""
        return self._remove_unpinned(limit=self.max_size)

    def prune(self) -> list[str]:
        """Remove every entry that is not the current version of a policy image."""
        return self._remove_unpinned(limit=0)

    def _remove_unpinned(self, *, limit: int) -> list[str]:
        removed = []
        with self._locked():
            pinned = self.pinned_digests()
            entries = self.entries()
            total = sum(e.size for e in entries)
            for entry in entries:
                if total <= limit:
                    break
                if entry.digest in pinned:
                    continue
                self._remove(entry)
                total -= entry.size
                removed.append(entry.digest)
                telemetry.cache_evictions.inc()
                self.log.info("evicted", digest=entry.digest, image=entry.image, size=entry.size)
            if total > limit and limit > 0:
                self.log.warning("cache is over max_size with only pinned images left",
                                 bytes=total, max_size=limit)
        self._update_gauges()
        return removed

    def verify(self) -> list[VerifyResult]:
        """Re-hash every entry; read-only: a corrupt entry is reported, not removed."""
        return [self._check(entry)[0] for entry in self.entries()]

    def remove_corrupt(self) -> list[VerifyResult]:
        """Re-hash every entry: remove the corrupt ones (fetched again when needed), stamp
        ``verified_at`` on the others. Hashes outside the cache lock; returns the corrupt."""
        corrupt = []
        for entry in self.entries():
            result, seen = self._check(entry)
            with self._locked():
                # Act only on the file that was hashed: it may have been replaced meanwhile.
                now = self.get(entry.digest)
                if now is None or _stat_key(now.path) != seen:
                    continue
                if result.ok:
                    self._write_record(replace(now, verified_at=_now()))
                    continue
                self._remove(now)
            corrupt.append(result)
            self.log.warning("corrupt cache entry removed", digest=entry.digest,
                             detail=result.detail)
        self._update_gauges()
        return corrupt

    def _check(self, entry: CacheEntry) -> tuple[VerifyResult, tuple[int, ...] | None]:
        seen = _stat_key(entry.path)
        try:
            digest = _sha256_file(entry.path)
        except OSError as err:
            return VerifyResult(entry.digest, False, f"unreadable: {err}"), seen
        if digest != entry.digest:
            return VerifyResult(entry.digest, False, f"content hashes to {digest}"), seen
        return VerifyResult(entry.digest, True, "ok"), seen

    # ---- files ------------------------------------------------------------------------

    def _remove(self, entry: CacheEntry) -> None:
        # Record first: without it the entry no longer exists, even if unlinking data fails.
        digest_file(self.objects, entry.digest, ".json").unlink(missing_ok=True)
        entry.path.unlink(missing_ok=True)

    def _read_entry(self, record: Path) -> CacheEntry | None:
        data = self._read_json(record)
        if not data:
            return None
        try:
            entry = CacheEntry.from_record(self.objects, data)
        except (TypeError, KeyError, ValueError, UnsafeName) as err:
            self.log.warning("unreadable cache record ignored", record=str(record), error=str(err))
            return None
        return entry

    def _read_json(self, path: Path) -> dict[str, Any] | None:
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            self.log.warning("unreadable cache file ignored", file=str(path), error=str(err))
            return None
        return data if isinstance(data, dict) else None

    def _write_record(self, entry: CacheEntry) -> None:
        self._write_json(digest_file(self.objects, entry.digest, ".json"), entry.record())

    def _write_json(self, path: Path, data: dict[str, Any]) -> None:
        tmp = self.tmp / f"{uuid.uuid4().hex}.json"
        with open(tmp, "w") as fh:
            json.dump(data, fh, indent=2, sort_keys=True)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialises changes with other processes (``cache prune`` while the daemon runs)."""
        with open(self.dir / ".lock", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _update_gauges(self) -> None:
        entries = self.entries()
        telemetry.cache_entries.set(len(entries))
        telemetry.cache_bytes.set(sum(e.size for e in entries))


def _failure_reason(err: BaseException) -> str:
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


def _listdir(directory: Path) -> list[Path]:
    try:
        return list(directory.iterdir())
    except FileNotFoundError:
        return []


def _stat_key(path: Path) -> tuple[int, ...] | None:
    """Identity and version of a file, to notice a replacement; None when missing."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _merge(old: Sequence[Source], new: Sequence[Source]) -> tuple[Source, ...]:
    return tuple(dict.fromkeys([*old, *new]))


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def is_permanent(err: BaseException) -> bool:
    """True for errors a retry cannot fix (used by callers deciding to dead-letter)."""
    return isinstance(err, PermanentError)
