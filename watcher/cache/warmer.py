"""``Cache``, the cache's async face: images fetched into it, and its reads and changes.

Why it exists: everything outside ``watcher.cache`` (jobs, HTTP routes, the fleet, the
supervisor, the command line) uses the cache through this one object, so none of them
has to remember which calls block, and every change runs on the directory's one worker
thread (``CacheDir.in_worker``), in order. Most of it is fetching: a policy image names
an S3 object (or a prefix), not a digest. Turning it into a verified entry takes the
network (the current object, its sidecar, the bytes), qemu-img (inspection) and memory
across calls: object versions already rejected are not downloaded again, a download
whose sidecar was stale is held aside for a newer one (``watcher.cache.held``: one per
image, bounded), and concurrent requests for the same bytes share one download (the
transfer itself is ``watcher.cache.download``). The files are the directory's
(``watcher.cache.store``); every disk write goes through it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Collection
from datetime import UTC, datetime
from pathlib import Path

from watcher import telemetry
from watcher.adapters.qemu_img import inspect_image_file
from watcher.adapters.s3 import ObjectInfo, S3Store
from watcher.cache.download import Downloader, FetchProgress
from watcher.cache.entry import CacheEntry, Source, VerifyResult, now_stamp
from watcher.cache.flights import SingleFlight
from watcher.cache.held import DEFAULT_HOLD, HeldDownloads
from watcher.cache.store import CacheDir
from watcher.core.errors import ImageRejected, ObjectUnavailable, SidecarUnavailable
from watcher.core.inspect import DEFAULT_MAX_VIRTUAL_SIZE
from watcher.core.paths import digest_file
from watcher.core.policy import SIDECAR_SUFFIX, ImageSpec, PolicySet
from watcher.core.repeats import RepeatFilter
from watcher.core.sidecar import parse_sidecar

REJECTED_KEPT = 1024
"""Rejected object versions remembered (the oldest forgotten first): a forgotten one is
downloaded and refused once more, never cached."""
SYNC_GRACE = 5.0
"""Seconds ``close`` waits for background fsyncs of unsynced entries before cancelling."""


class Cache:
    """The cache in ``directory``: policy images kept current and verified, and its entries."""

    def __init__(
        self,
        directory: Path,
        s3: S3Store,
        *,
        max_size: int,
        max_virtual_size: int = DEFAULT_MAX_VIRTUAL_SIZE,
        max_concurrent_downloads: int = 2,
        policies: Callable[[], PolicySet] | None = None,
        stale_sidecar_hold: float = DEFAULT_HOLD,
    ) -> None:
        self._dir = CacheDir(directory, max_size=max_size)
        self.max_virtual_size = max_virtual_size
        self._policies = policies
        self._flights = SingleFlight()
        self._syncs = SingleFlight()  # durable(): one fsync (or re-hash) per entry at a time
        self._background: set[asyncio.Task[CacheEntry | None]] = set()
        self.log = telemetry.get_logger(component="cache")
        self.held = HeldDownloads(self._dir, stale_sidecar_hold)
        """Downloads whose sidecar did not match yet, kept (and locked) for a newer one."""
        # Object versions already rejected: not downloaded again until they change.
        self._rejected: dict[Source, ImageRejected] = {}
        self._problems = RepeatFilter()
        self._downloader = Downloader(s3, self._dir.new_part, problems=self._problems,
                                      max_concurrent=max_concurrent_downloads)
        self.s3 = s3
        self.fetching: dict[tuple[str, str], FetchProgress] = {}
        """Objects being fetched right now, by (bucket, key)."""
        self.on_evicted: Callable[[list[str]], Awaitable[object]] | None = None
        """Awaited with the digests ``evict`` removed (their golden LVs go with them)."""

    # ---- reading (memory only) ---------------------------------------------------------

    @property
    def count(self) -> int:
        return self._dir.count

    def current(self, image_name: str) -> CacheEntry | None:
        """The last known current version of an image, without touching the network."""
        return self._dir.current(image_name)

    def get(self, digest: str) -> CacheEntry | None:
        return self._dir.get(digest)

    def entries(self) -> list[CacheEntry]:
        """Every committed entry, oldest use first."""
        return self._dir.entries()

    def pinned_digests(self, image_names: Collection[str]) -> set[str]:
        """Digests that are the current version of one of ``image_names``."""
        return {entry.digest for name in image_names
                if (entry := self._dir.current(name)) is not None}

    # ---- the directory, on its worker thread --------------------------------------------

    async def load(self, *, create: bool = False) -> None:
        """Read the records, creating nothing unless ``create`` (a process that writes)."""
        await self._dir.in_worker(self._dir.load, create=create)

    async def recover(self) -> int:
        """The daemon's start-up (``CacheDir.recover``); returns files removed."""
        return await self._dir.in_worker(self._dir.recover)

    async def refreshed(self) -> None:
        """Re-read the records if another process changed them since they were read."""
        await self._dir.refreshed()

    async def remove_leftovers(self) -> int:
        """Remove what a crash left, sparing what a live process locks; files removed."""
        return await self._dir.in_worker(self._dir.remove_leftovers)

    async def remove(self, digest: str, keep_images: Collection[str]) -> CacheEntry | None:
        """Remove the entry ``digest``: the removed entry, or None when there is none;
        ``EntryPinned`` when it is the current version of one of ``keep_images``."""
        return await self._dir.in_worker(self._dir.remove, digest, keep_images)

    async def prune(self, keep_images: Collection[str]) -> list[str]:
        """Remove every entry that is not the current version of one of ``keep_images``."""
        return await self._dir.in_worker(self._dir.prune, keep_images)

    async def verify(self) -> list[VerifyResult]:
        """Re-hash every entry; read-only: a corrupt entry is reported, not removed."""
        return await self._dir.in_worker(self._dir.verify)

    async def remove_corrupt(self) -> list[VerifyResult]:
        """Re-hash every entry, remove the corrupt ones and return them."""
        return await self._dir.in_worker(self._dir.remove_corrupt)

    def release(self) -> None:
        """End the worker thread, once no job may change the cache (after ``close``)."""
        self._dir.close()

    # ---- warming ----------------------------------------------------------------------------

    async def ensure(self, image: ImageSpec, *,
                     before_download: Callable[[Source], Awaitable[None]] | None = None,
                     durable: bool = True,
                     ) -> CacheEntry:
        """The current version of ``image``: from the cache, or downloaded, verified, inspected.

        The entry returned is durable (its data fsynced; see ``durable``), which a volume
        write needs. A pre-warm passes ``durable=False``: its download is not flushed while
        it runs, the entry appears as soon as it is verified, marked unsynced, and is
        fsynced in the background right after.

        ``before_download`` is awaited when this version is not cached, before the download
        is shared with other callers: pre-warming waits its fleet spread there, while a
        reprovision passes none and downloads at once, so a pre-warm that waited may then
        find the version in the cache.

        Raises ``ObjectUnavailable`` or ``SidecarUnavailable`` while the image or the
        sidecar it needs is not uploaded yet, ``ImageRejected`` for a bad image,
        ``UnsafeName`` for an image name that cannot be a file name, ``TemporaryError``
        when S3 is unreachable.
        """
        # Refused before any download: the name becomes a file name once the image is cached.
        self._dir.ref_path(image.name)
        asked = time.monotonic()  # a download held after this may be newer than our answer
        with telemetry.tracer.start_as_current_span("warm", attributes={"image": image.name}):
            obj = await self._resolve(image)
            digest = await self._published_digest(image, obj)
            source = Source(obj.bucket, obj.key, obj.etag)
            known_bad = self._rejected.get(source)
            if known_bad is not None and known_bad.reason != "checksum_mismatch":
                # The same bytes will fail the same way; a new upload has a new ETag.
                self._report_rejection(image, source, digest, known_bad)
                raise known_bad
            await self._dir.refreshed()  # another process may have changed the cache
            hit = self._dir.lookup(digest, source)
            if hit is None and before_download is not None:
                await before_download(source)
                await self._dir.refreshed()
                hit = self._dir.lookup(digest, source)
            if hit is not None:
                used = await self._use(hit, image, source)
                if used is not None:
                    telemetry.cache_hits.inc()
                    await self.held.drop(image.name, "superseded", held_before=asked)
                    return await self._ready(used, image, before_download, durable)
            flight_key = digest or f"{obj.bucket}/{obj.key}@{obj.etag}"
            entry = await self._flights.run(
                flight_key, lambda: self._fetch(image, obj, source, digest, durable))
            # A caller that joined another image's download (same bytes) records its own ref.
            entry = await self._use(entry, image, source) or entry
            # Only now is the new version the image's current one, so the old may go.
            await self.held.drop(image.name, "superseded", held_before=asked)
            await self.evict()
            return await self._ready(entry, image, before_download, durable)

    async def _ready(self, entry: CacheEntry, image: ImageSpec,
                     before_download: Callable[[Source], Awaitable[None]] | None,
                     durable: bool) -> CacheEntry:
        """What ``ensure`` returns: ``entry`` made durable when asked (else synced in the
        background); fetched again if it proved corrupt."""
        if not durable:
            if not entry.durable:
                self._sync_in_background(entry)
            return entry
        synced = await self.durable(entry)
        if synced is None:  # corrupt after a crash, and removed: fetch it again
            return await self.ensure(image, before_download=before_download)
        return synced

    async def durable(self, entry: CacheEntry) -> CacheEntry | None:
        """``entry`` with its data on stable storage, fsynced now if it was committed
        unsynced; None when its bytes no longer match its digest (an unsynced entry left by
        a crash), in which case it was removed and must be fetched again (``ensure``).

        Every volume write must start from a durable entry; ``ensure`` returns one unless
        told otherwise. Callers that take an entry from ``get`` or ``current`` instead call
        this before writing.
        """
        if entry.durable:
            return entry
        return await self._syncs.run(entry.digest, lambda: self._make_durable(entry.digest))

    async def _make_durable(self, digest: str) -> CacheEntry | None:
        while True:
            current = self._dir.get(digest)
            if current is None or current.durable:
                return current
            seen, problem = await asyncio.to_thread(self._dir.sync_data, current)
            if problem is not None:
                await self._dir.in_worker(self._dir.discard, digest, seen, problem)
                return None
            synced = await self._dir.in_worker(self._dir.mark_durable, digest, seen)
            if synced is not None or self._dir.get(digest) is None:
                return synced
            # The file was replaced while it was synced (another process): sync the new one.

    def _sync_in_background(self, entry: CacheEntry) -> None:
        task = asyncio.ensure_future(self.durable(entry))
        self._background.add(task)
        task.add_done_callback(self._synced)

    def _synced(self, task: asyncio.Task[CacheEntry | None]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # Not fatal: the entry stays unsynced, and the next use syncs it (or a restart
            # hashes it again).
            self.log.warning("cache entry not synced", error=repr(task.exception()))

    async def close(self) -> None:
        """Cancel running downloads and drop the ones kept aside (the daemon is stopping)."""
        await self._flights.cancel()
        # A sync left running would cost a full re-hash at the next start: give it a while.
        if self._background:
            await asyncio.wait(set(self._background), timeout=SYNC_GRACE)
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self._syncs.cancel()
        self.held.close()

    async def evict(self) -> list[str]:
        """Evict least-recently-used entries that no policy image needs, then held
        downloads, oldest first, until both fit max_size."""
        if self._dir.total_bytes + self.held.total_bytes <= self._dir.max_size:
            return []  # fits: no need to queue behind the lock (the directory checks again)
        removed = await self._dir.in_worker(self._dir.evict, self._images_to_keep())
        if removed and self.on_evicted is not None:
            await self.on_evicted(removed)
        await self.held.sweep(room=max(0, self._dir.max_size - self._dir.total_bytes))
        return removed

    async def sweep_held(self) -> None:
        """Drop held downloads that expired; the daemon calls this every few seconds."""
        await self.held.sweep()

    def _images_to_keep(self) -> frozenset[str]:
        if self._policies is None:
            return frozenset()
        return frozenset(i.name for i in self._policies().images_to_keep_warm())

    async def _use(self, entry: CacheEntry, image: ImageSpec,
                   source: Source) -> CacheEntry | None:
        """Record a use (LRU time, source, ref); None if the entry went meanwhile."""
        todo = self._dir.use_to_record(entry, image.name, source)
        if not (todo.record or todo.ref):
            return self._dir.get(entry.digest) or entry  # a duplicate: nothing to write
        return await self._dir.in_worker(self._dir.record_use, entry.digest, image.name,
                                          source)

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
                     expected: str | None, durable: bool) -> CacheEntry:
        held = self.held.find(source) if expected is not None else None
        if held is not None and held.record.digest != expected:
            # The held bytes of this very version: refused again, without a new transfer.
            raise self._rejected_now(image, source, self._mismatch(
                image, obj, held.record.digest, expected), held.record.digest)
        taken = await self.held.take(source) if held is not None else None
        if taken is not None:
            # Downloaded earlier against a stale sidecar; the fresh sidecar now matches.
            part, digest, size = taken.part, taken.record.digest, taken.record.size
            durable = False  # it may have been downloaded unsynced; ensure() syncs it
            self.log.info("sidecar now matches an earlier download", image=image.name,
                          digest=digest)
        else:
            telemetry.cache_misses.inc()
            progress = self.fetching[(obj.bucket, obj.key)] = FetchProgress(obj.size)
            try:
                part, digest, size = await self._downloader.download(image, obj, progress,
                                                                      durable)
            except BaseException:
                self.fetching.pop((obj.bucket, obj.key), None)
                raise
            progress.stage = "verifying"
        held_now = False
        try:
            if expected is not None and digest != expected:
                held_now = await self.held.hold(image.name, image.format, source, part,
                                                digest, size)
                if held_now:
                    await self.evict()  # the held bytes count against max_size
                raise self._mismatch(image, obj, digest, expected)
            with telemetry.tracer.start_as_current_span("inspect", attributes={"digest": digest}):
                facts = await inspect_image_file(
                    part.path, image.format, max_virtual_size=self.max_virtual_size)
            now = now_stamp()
            entry = CacheEntry(
                digest=digest, path=digest_file(self._dir.objects, digest, f".{image.format}"),
                format=image.format, virtual_size=facts.virtual_size, size=size,
                image=image.name, bucket=obj.bucket, key=obj.key, etag=obj.etag,
                sources=(source,), created_at=now, last_used_at=now, verified_at=now,
                checksum="sidecar" if expected is not None else "computed",
                durable=durable,
            )
            entry = await self._dir.in_worker(self._dir.commit, part.path, entry)
        except ImageRejected as err:
            self._rejected_now(image, source, err, digest)
            raise
        finally:
            self.fetching.pop((obj.bucket, obj.key), None)
            if not held_now:
                part.release()  # after a commit the file is in objects/: only the lock goes
        self.log.info("image cached", image=image.name, digest=digest, size=size,
                      virtual_size=entry.virtual_size, key=obj.key)
        return entry

    @staticmethod
    def _mismatch(image: ImageSpec, obj: ObjectInfo, digest: str,
                  expected: str | None) -> ImageRejected:
        return ImageRejected(
            "checksum_mismatch",
            f"image {image.name}: s3://{obj.bucket}/{obj.key} has SHA-256 {digest}, "
            f"its sidecar says {expected}; not cached")

    def _rejected_now(self, image: ImageSpec, source: Source, err: ImageRejected,
                      digest: str) -> ImageRejected:
        """Count, remember and report a rejection; returns it, to raise."""
        telemetry.images_rejected.labels(reason=err.reason).inc()
        self._rejected.pop(source, None)
        self._rejected[source] = err  # the newest last: the oldest goes first
        while len(self._rejected) > REJECTED_KEPT:
            del self._rejected[next(iter(self._rejected))]
        self._report_rejection(image, source, digest, err)
        return err

    # ---- reporting ----------------------------------------------------------------------------

    def _report_rejection(self, image: ImageSpec, source: Source, digest: str | None,
                          err: ImageRejected) -> None:
        """A warning per (object version, reason); repeats of one are rate-limited."""
        repeats = self._problems.admit((source, err.reason), time.monotonic())
        if repeats is not None:
            self.log.warning("image rejected", image=image.name, bucket=source.bucket,
                             key=source.key, version=source.etag, digest=digest,
                             reason=err.reason, error=str(err), repeats_unlogged=repeats)
