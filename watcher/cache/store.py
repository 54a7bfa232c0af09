"""The content-addressed cache on disk, and an in-memory index of it.

Why it exists: every host keeps the images its policies name ready on local disk, so a
reprovision never waits on the network, and an image is trusted only once. ``CacheDir``
owns the layout and when it changes (the files themselves: ``watcher.cache.records``);
fetching images is ``Cache``'s business.

Layout under ``cache.dir``::

    objects/<sha256>.<format>   the image as uploaded (qcow2 stays compressed)
    objects/<sha256>.json       its record: sources (bucket/key/ETag), sizes, times
    refs/<image name>.json      the digest of the image's current version
    tmp/                        downloads in progress (each ``.part`` flock-ed by its owner)
    held/<image>.part, .json    a refused download kept for a corrected sidecar (``held``)
    .lock                       serialises changes between processes; holds a generation

An entry exists when its record exists. Both files appear by atomic rename after the
download was hashed, compared with the sidecar and inspected, so a crash leaves at most
a temp file. Records are small JSON files so an operator can read them with ``cat``.

A pre-warm may commit its entry before the data is on stable storage, marked
``"durable": false``: its bytes were verified in memory, but a crash of the machine may
lose or tear what the page cache held. Such an entry is fsynced and marked durable before
a volume is written from it (``sync_data``, ``mark_durable``; ``Cache.durable``), and one
still marked at start-up is hashed again (``recover``), removed if its bytes differ.

Records are read once (``load``) into an immutable index that lookups, listings and
counts use without touching the disk; every change writes the files, then publishes a
new index. Another process (``cache prune``) may change the directory too: every change
renews the generation in ``.lock``, and a ``CacheDir`` that finds a generation it did not
publish reads the records again, under the lock (``refresh``, and before any change).

Every method blocks: ``Cache`` (``watcher.cache.warmer``) runs them on the directory's one
worker thread (``in_worker``), so the event loop never waits on a disk, an fsync or another
process's lock, and changes apply in order. Reading (``load``, lookups, ``verify``)
creates, changes and removes nothing, so ``status`` and ``cache list`` are safe while the
daemon runs. Only ``remove_leftovers`` (start-up, ``cache prune``) removes what a crash
left, under the lock, sparing any temp file its owner still locks: a running download,
or one kept aside until a newer sidecar matches it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import ParamSpec, TypeVar

from watcher import telemetry
from watcher.adapters.filesink import fsync_path
from watcher.cache.entry import CacheEntry, Source, VerifyResult, age_seconds, now_stamp
from watcher.cache.files import (
    CacheLock,
    LockHandle,
    PartFile,
    stat_key,
)
from watcher.cache.index import Draft, Index, Ref
from watcher.cache.records import (
    read_all,
    rehash,
    remove_crash_leftovers,
    remove_files,
    write_record,
    write_ref,
)
from watcher.core.cache_rules import (
    UseRecord,
    choose_evictions,
    is_cache_hit,
    use_to_record,
)
from watcher.core.paths import image_file

P = ParamSpec("P")
T = TypeVar("T")


class EntryPinned(Exception):
    """The entry is the current version of a policy image."""

    def __init__(self, digest: str, images: list[str]) -> None:
        super().__init__(f"{digest} is the current version of {', '.join(images)}")
        self.images = images


class CacheDir:
    """The cache directory: records, refs, commits, removals, leftovers, verification."""

    def __init__(self, directory: Path, *, max_size: int) -> None:
        self.dir = directory
        self.objects = directory / "objects"
        self.refs = directory / "refs"
        self.tmp = directory / "tmp"
        self.max_size = max_size
        self.log = telemetry.get_logger(component="cache")
        self._lock = CacheLock(directory / ".lock", on_wait=lambda: self.log.info(
            "waiting for the cache lock another process holds"))
        self._index = Index()
        self.held_bytes = 0
        """Bytes this process holds aside (``watcher.cache.held``); counted in ``max_size``."""
        self._worker: ThreadPoolExecutor | None = None
        # Unsynced entries this process wrote, by digest -> file identity at commit: their
        # bytes are still the verified ones in the page cache, so an fsync suffices.
        self._written_here: dict[str, tuple[int, ...] | None] = {}

    # ---- the worker thread --------------------------------------------------------------

    async def in_worker(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run a blocking method on the directory's worker thread; changes run one at a time."""
        if self._worker is None:
            self._worker = ThreadPoolExecutor(1, thread_name_prefix="cache-store")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._worker, functools.partial(fn, *args, **kwargs))

    def close(self) -> None:
        """Stop waiting for the lock and let the worker end; for the daemon's stop."""
        self._lock.close()
        if self._worker is not None:
            self._worker.shutdown(wait=False, cancel_futures=True)

    def locked(self) -> contextlib.AbstractContextManager[LockHandle]:
        """Hold the cache lock over a write outside the records (a held download's)."""
        return self._lock.held()

    # ---- start-up ------------------------------------------------------------------------

    def prepare(self) -> None:
        """Create the layout; for processes that write (the daemon, ``cache warm|prune``)."""
        for d in (self.objects, self.refs, self.tmp):
            d.mkdir(parents=True, exist_ok=True)

    def recover(self) -> int:
        """Create the layout, remove leftovers, read the records, hash again every entry
        still marked unsynced; returns files removed."""
        self.prepare()
        removed = self.remove_leftovers()
        self.load()
        return removed + self.rehash_unsynced()

    def rehash_unsynced(self) -> int:
        """Hash every entry marked unsynced that this process did not write (a crash may
        have lost or torn its bytes): fsync and mark the intact ones, remove the others.
        Returns the entries removed."""
        removed = 0
        for entry in self.entries():
            if entry.durable or entry.digest in self._written_here:
                continue
            seen, problem = self.sync_data(entry)
            if problem is None:
                self.mark_durable(entry.digest, seen)
                self.log.info("unsynced cache entry verified after a restart",
                              digest=entry.digest, image=entry.image)
            elif self.discard(entry.digest, seen, problem):
                removed += 1
        return removed

    def load(self, *, create: bool = False) -> None:
        """Read every record and ref (without the lock: a reader changes nothing); with
        ``create``, make the layout first."""
        if create:
            self.prepare()
        generation = self._lock.generation()  # before reading: a change meanwhile shows later
        self._publish(read_all(self.objects, self.refs, self.log), generation)

    async def refreshed(self) -> None:
        """Re-read the records if another process changed them since they were read."""
        if await asyncio.to_thread(self._lock.generation) != self._index.generation:
            await self.in_worker(self.refresh)

    def refresh(self) -> None:
        if self._lock.generation() == self._index.generation:
            return
        with self._lock.held() as held:
            self._publish(read_all(self.objects, self.refs, self.log), held.mark())

    def remove_leftovers(self) -> int:
        """Remove what a crash left behind, under the cache lock; returns files removed.

        Temp files still locked by their owner (a download in this or another process)
        are kept.
        """
        if not self.dir.is_dir():
            return 0
        with self._lock.held():
            removed = remove_crash_leftovers(self.dir, self.objects, self.tmp)
        if removed:
            self.log.info("removed leftover temporary files", count=removed)
        return removed

    # ---- reading (memory only) -----------------------------------------------------------

    @property
    def count(self) -> int:
        return len(self._index.entries)

    @property
    def total_bytes(self) -> int:
        return self._index.total_bytes

    def entries(self) -> list[CacheEntry]:
        """Every committed entry, oldest use first."""
        return sorted(self._index.entries.values(), key=lambda e: (e.last_used_at, e.digest))

    def get(self, digest: str) -> CacheEntry | None:
        return self._index.entries.get(digest)

    def current(self, image_name: str) -> CacheEntry | None:
        """The last known current version of an image, without touching the network."""
        ref = self._index.refs.get(image_name)
        return self.get(ref.digest) if ref else None

    def ref_path(self, image_name: str) -> Path:
        """Where an image's ref lives; ``UnsafeName`` for a name that is no identifier."""
        return image_file(self.refs, image_name, ".json")

    def lookup(self, digest: str | None, source: Source) -> CacheEntry | None:
        """The entry that answers a request for ``source`` (with ``digest`` if published)."""
        if digest is None:
            found = self._index.by_source.get(source)
            entry = self.get(found) if found else None
        else:
            entry = self.get(digest)
        if entry is not None and is_cache_hit(source, entry.sources,
                                              published_digest=digest is not None):
            return entry
        return None

    def use_to_record(self, entry: CacheEntry, image_name: str, source: Source) -> UseRecord:
        return _todo(self.get(entry.digest) or entry, self._index.refs.get(image_name),
                     image_name, source)

    # ---- changes (blocking) ----------------------------------------------------------------

    def new_part(self) -> PartFile:
        """A temp file for a download, locked as live."""
        return PartFile.create(self.tmp)

    def commit(self, part: Path, entry: CacheEntry) -> CacheEntry:
        """Make ``entry`` (its data in ``part``) visible as its image's current version.

        The data file first, then its record, each by atomic rename; then the image's ref,
        all under one hold of the lock so no prune sees the entry without its ref. Same
        bytes already cached under another key: one file, one more source.
        """
        with self._changing() as draft:
            existing = draft.entries.get(entry.digest)
            base = existing or entry
            final = replace(base, last_used_at=now_stamp(), image=entry.image,
                            bucket=entry.bucket, key=entry.key, etag=entry.etag,
                            sources=_merge(base.sources, entry.sources))
            if existing is None:
                part.replace(entry.path)
                if not entry.durable:
                    self._written_here[entry.digest] = stat_key(entry.path)
            self._write_record(final, draft)
            if existing is None:
                fsync_path(self.objects)
            self._write_ref(entry.image, final, Source(entry.bucket, entry.key, entry.etag),
                            draft)
        return final

    def record_use(self, digest: str, image_name: str, source: Source) -> CacheEntry | None:
        """Record a use: LRU time, the source, the image's ref; None if the entry is gone."""
        with self._changing() as draft:
            latest = draft.entries.get(digest)
            if latest is None:
                return None  # removed by another process meanwhile
            todo = _todo(latest, draft.refs.get(image_name), image_name, source)
            if not todo.record:
                return latest
            updated = replace(latest, last_used_at=now_stamp(), image=image_name,
                              bucket=source.bucket, key=source.key, etag=source.etag,
                              sources=_merge(latest.sources, (source,)))
            self._write_record(updated, draft)
            if todo.ref:
                self._write_ref(image_name, updated, source, draft)
        return updated

    def evict(self, keep_images: Collection[str]) -> list[str]:
        """Remove least-recently-used entries not current for ``keep_images`` until they and
        the held downloads fit ``max_size``."""
        return self._remove_unpinned(max(0, self.max_size - self.held_bytes), keep_images)

    def prune(self, keep_images: Collection[str]) -> list[str]:
        """Remove every entry that is not the current version of one of ``keep_images``."""
        return self._remove_unpinned(0, keep_images)

    def _remove_unpinned(self, limit: int, keep_images: Collection[str]) -> list[str]:
        with self._changing() as draft:
            if draft.total_bytes <= limit:
                return []  # the usual case: no candidate list to build for thousands of entries
            pinned = {ref.digest for name, ref in draft.refs.items() if name in keep_images}
            choice = choose_evictions((e.stored() for e in draft.entries.values()),
                                      pinned, limit)
            for digest in choice.evict:
                entry = draft.entries[digest]
                self._remove(entry, draft)
                telemetry.cache_evictions.inc()
                self.log.info("evicted", digest=digest, image=entry.image, size=entry.size)
            if choice.remaining_bytes > limit > 0:
                self.log.warning("cache is over max_size with only pinned images left",
                                 bytes=choice.remaining_bytes, max_size=limit)
        return list(choice.evict)

    def remove(self, digest: str, keep_images: Collection[str]) -> CacheEntry | None:
        """Remove the entry ``digest`` unless it is current for one of ``keep_images``.

        Returns the removed entry; None when there is none. Raises ``EntryPinned`` when a
        kept image's current version is this entry (it would be fetched again at once).
        """
        with self._changing() as draft:
            entry = draft.entries.get(digest)
            if entry is None:
                return None
            pinned = sorted(name for name, ref in draft.refs.items()
                            if name in keep_images and ref.digest == digest)
            if pinned:
                raise EntryPinned(digest, pinned)
            self._remove(entry, draft)
        self.log.info("cache entry removed", digest=digest, image=entry.image, size=entry.size)
        return entry

    def sync_data(self, entry: CacheEntry) -> tuple[tuple[int, ...] | None, str | None]:
        """Bring an unsynced entry's data to stable storage, without the lock (an fsync of
        gigabytes must not hold up other changes): ``(file identity, None)`` when done,
        ``(identity, what is wrong)`` when its bytes no longer hash to its digest.

        Data this process wrote is fsynced; any other is hashed first, since a crash may
        have lost what the page cache held. For ``mark_durable`` or ``discard`` next.
        """
        seen = stat_key(entry.path)
        if seen is None or seen != self._written_here.get(entry.digest):
            result, seen = rehash(entry)
            if not result.ok:
                return seen, result.detail
        fsync_path(entry.path)
        return seen, None

    def mark_durable(self, digest: str, seen: tuple[int, ...] | None) -> CacheEntry | None:
        """Record that the data ``sync_data`` saw as ``seen`` is durable; None when the
        entry is gone or its file was replaced meanwhile (sync it again)."""
        with self._changing() as draft:
            now = draft.entries.get(digest)
            if now is None or stat_key(now.path) != seen:
                return None
            if now.durable:
                return now
            updated = replace(now, durable=True)
            self._write_record(updated, draft)
        self._written_here.pop(digest, None)
        return updated

    def discard(self, digest: str, seen: tuple[int, ...] | None, detail: str) -> bool:
        """Remove a corrupt entry (it is fetched again when needed), unless its file was
        replaced since it was hashed as ``seen``; True when removed."""
        with self._changing() as draft:
            now = draft.entries.get(digest)
            if now is None or stat_key(now.path) != seen:
                return False
            self._remove(now, draft)
        self._written_here.pop(digest, None)
        self.log.warning("corrupt cache entry removed", digest=digest, detail=detail)
        return True

    def verify(self) -> list[VerifyResult]:
        """Re-hash every entry; read-only: a corrupt entry is reported, not removed."""
        return [rehash(entry)[0] for entry in self.entries()]

    def remove_corrupt(self) -> list[VerifyResult]:
        """Re-hash every entry: remove the corrupt ones (fetched again when needed), stamp
        ``verified_at`` on the others. Hashes outside the cache lock; returns the corrupt."""
        corrupt = []
        for entry in self.entries():
            result, seen = rehash(entry)
            with self._changing() as draft:
                # Act only on the file that was hashed: it may have been replaced meanwhile.
                now = draft.entries.get(entry.digest)
                if now is None or stat_key(now.path) != seen:
                    continue
                if result.ok:
                    self._write_record(replace(now, verified_at=now_stamp()), draft)
                    continue
                self._remove(now, draft)
            corrupt.append(result)
            self.log.warning("corrupt cache entry removed", digest=entry.digest,
                             detail=result.detail)
        return corrupt

    # ---- files and the index -----------------------------------------------------------------

    @contextlib.contextmanager
    def _changing(self) -> Iterator[Draft]:
        """Hold the lock over a change; publish the result, and a new generation, after it.

        Records another process changed are read again first, so a change never works on
        what it read before.
        """
        with self._lock.held() as held:
            if held.mark() != self._index.generation:
                self._publish(read_all(self.objects, self.refs, self.log), held.mark())
            draft = Draft.of(self._index)
            try:
                yield draft
            finally:
                if draft.changed:  # also after a failure: what was written is on disk
                    self._install(draft.index(held.renew()))

    def _publish(self, maps: tuple[dict[str, CacheEntry], dict[str, Ref]],
                 generation: str | None) -> None:
        entries, refs = maps
        by_source = {s: e.digest for e in entries.values() for s in e.sources}
        total = sum(e.size for e in entries.values())
        self._install(Index(entries, refs, by_source, total, generation))

    def _install(self, index: Index) -> None:
        self._index = index  # one assignment: readers see the old index or the new one
        telemetry.cache_entries.set(len(index.entries))
        telemetry.cache_bytes.set(index.total_bytes + self.held_bytes)

    def _write_record(self, entry: CacheEntry, draft: Draft) -> None:
        draft.changed = True
        write_record(self.objects, self.tmp, entry)
        draft.put(entry)

    def _write_ref(self, image_name: str, entry: CacheEntry, source: Source,
                   draft: Draft) -> None:
        draft.changed = True
        write_ref(self.ref_path(image_name), self.tmp, entry.digest, source)
        draft.refs[image_name] = Ref(entry.digest, source.etag)

    def _remove(self, entry: CacheEntry, draft: Draft) -> None:
        draft.drop(entry.digest)
        remove_files(self.objects, entry)


def _merge(old: Collection[Source], new: Collection[Source]) -> tuple[Source, ...]:
    return tuple(dict.fromkeys([*old, *new]))


def _todo(latest: CacheEntry, ref: Ref | None, image_name: str, source: Source) -> UseRecord:
    return use_to_record(
        source=source, entry_sources=latest.sources, entry_image=latest.image,
        image=image_name, ref_digest=ref.digest if ref else None,
        ref_etag=ref.etag if ref else None, digest=latest.digest,
        seconds_since_use=age_seconds(latest.last_used_at))
