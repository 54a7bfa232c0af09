"""Downloads kept aside for a corrected sidecar: one per image, for a while, counted.

Why it exists: a download whose hash does not match its sidecar may be right and the
sidecar stale (an image uploaded before its new sidecar). Keeping it lets the corrected
sidecar commit it with no second transfer, but a pipeline publishing with a broken
checksum step must not fill the disk. So a held download is bounded:

- at most one per policy image: its data is ``held/<image>.part``, so a newer refused
  version replaces the older one by rename;
- it is dropped once the image is ready in another version (committed, or found in the
  cache), and ``cache.stale_sidecar_hold`` seconds after it was held. The daemon sweeps
  every few seconds (its cache loop), so expiry needs no new event;
- its bytes count against ``cache.max_size`` (unpinned entries are evicted first, then
  held downloads, oldest first) and in ``volume_watcher_cache_bytes``.

Beside the data, ``held/<image>.json`` describes it (digest, source, size, times), so
``cache list`` in another process lists it with state ``held``. While held, the data
stays flock-ed by the daemon, like any temp file. A held download does not outlive its
process: the daemon's stop removes it, and start-up and ``cache prune`` remove what a
crash left (unlocked data, records without data). It is not adopted again after a
restart: an unsynced download may have been torn by a crash, so adopting would mean a
full re-hash, to save at most one download. ``cache prune`` spares a download a running
daemon holds, as it spares any locked temp file: the daemon may be committing it at that
moment, and it bounds its held downloads itself.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from watcher import telemetry
from watcher.cache.entry import Source
from watcher.cache.files import PartFile, listdir, read_json, write_json
from watcher.cache.records import HELD_DIR
from watcher.core.cache_rules import HeldSlot, holds_to_drop
from watcher.core.paths import image_file, is_digest, is_image_name
from watcher.settings import CacheSettings

if TYPE_CHECKING:
    from watcher.cache.store import CacheDir

"""Under ``cache.dir``: ``<image>.part`` (the data) and ``<image>.json`` (its record)."""
DEFAULT_HOLD = CacheSettings().stale_sidecar_hold


@dataclass(frozen=True)
class HeldRecord:
    """What ``held/<image>.json`` says of the download held for an image."""

    image: str
    digest: str
    """SHA-256 of the downloaded bytes (not what the sidecar said)."""
    size: int
    format: str
    """The policy's declared format; not inspected yet."""
    bucket: str
    key: str
    etag: str
    held_at: str
    expires_at: str

    @property
    def source(self) -> Source:
        return Source(self.bucket, self.key, self.etag)

    def record(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_record(cls, data: dict[str, Any]) -> HeldRecord:
        """``ValueError`` or ``KeyError`` unless every field is there and well formed."""
        values = {f.name: data[f.name] for f in fields(cls)}
        size = values["size"]
        if (not is_image_name(values["image"]) or not is_digest(values["digest"])
                or isinstance(size, bool) or not isinstance(size, int) or size < 0):
            raise ValueError("not a held-download record")
        text = {k: str(v) for k, v in values.items() if k != "size"}
        return cls(size=size, **text)


def read_held(cache_dir: Path) -> list[HeldRecord]:
    """The downloads held in ``cache_dir``, oldest first; reads only (for ``cache list``)."""
    directory = cache_dir / HELD_DIR
    found = []
    for path in listdir(directory):
        if path.suffix != ".json" or not is_image_name(path.stem):
            continue
        data = read_json(path, lambda _p, _e: None)
        try:
            record = HeldRecord.from_record(data or {})
        except (KeyError, ValueError):
            continue
        if record.image == path.stem and image_file(directory, path.stem, ".part").exists():
            found.append(record)
    return sorted(found, key=lambda r: (r.held_at, r.image))


@dataclass
class HeldDownload:
    record: HeldRecord
    part: PartFile
    """The locked data file, at ``held/<image>.part``."""
    since: float
    """``time.monotonic()`` when it was held."""
    deadline: float
    """``time.monotonic()`` at which it expires."""


class HeldDownloads:
    """The downloads this process holds aside, by image name; their files and records."""

    def __init__(self, cache_dir: CacheDir, hold_seconds: float = DEFAULT_HOLD) -> None:
        self.cache_dir = cache_dir
        self.dir = cache_dir.dir / HELD_DIR
        self.hold_seconds = hold_seconds
        """0: a refused download is not held (its bytes are removed at once)."""
        self._by_image: dict[str, HeldDownload] = {}
        self.log = telemetry.get_logger(component="cache")

    @property
    def total_bytes(self) -> int:
        return sum(h.record.size for h in self._by_image.values())

    def images(self) -> list[str]:
        return sorted(self._by_image)

    def records(self) -> list[HeldRecord]:
        """What is held, oldest first."""
        return sorted((h.record for h in self._by_image.values()),
                      key=lambda r: (r.held_at, r.image))

    def find(self, source: Source) -> HeldDownload | None:
        return next((h for h in self._by_image.values() if h.record.source == source), None)

    async def hold(self, image: str, image_format: str, source: Source, part: PartFile,
                   digest: str, size: int) -> bool:
        """Keep ``part`` (locked, in ``tmp/``) for ``image``, replacing the download held for
        it before. False when holding is off or failed: ``part`` stays the caller's."""
        if self.hold_seconds <= 0:
            return False
        now = datetime.now(UTC)
        record = HeldRecord(
            image=image, digest=digest, size=size, format=image_format, bucket=source.bucket,
            key=source.key, etag=source.etag, held_at=_stamp(now),
            expires_at=_stamp(now + timedelta(seconds=self.hold_seconds)))
        old = self._by_image.pop(image, None)
        # In memory first: a drop meanwhile then sees this one, and runs after the write.
        since = time.monotonic()
        self._by_image[image] = HeldDownload(record, part, since, since + self.hold_seconds)
        try:
            await self.cache_dir.in_worker(self._write, part, record)
        except OSError as err:
            self._by_image.pop(image, None)
            if old is not None:
                await self.cache_dir.in_worker(self._remove, old)
            self._publish_bytes()
            self.log.warning("refused download not held", image=image, error=str(err))
            return False
        if old is not None and old.part is not part:
            old.part.release()  # its file was replaced by this one: only the lock goes
            self.log.info("held download replaced by a newer one", image=image,
                          digest=old.record.digest, version=old.record.etag)
        self._publish_bytes()
        self.log.info("refused download held for a corrected sidecar", image=image,
                      digest=digest, version=source.etag, size=size,
                      expires_at=record.expires_at)
        return True

    async def take(self, source: Source) -> HeldDownload | None:
        """The download held for ``source``, no longer held: its record is removed and its
        locked file, moved back to ``tmp/``, is the caller's to commit or release."""
        held = self.find(source)
        if held is None:
            return None
        del self._by_image[held.record.image]
        self._publish_bytes()
        try:
            await self.cache_dir.in_worker(self._unslot, held)
        except OSError as err:  # its file is gone: the caller downloads again
            held.part.release()
            self.log.warning("held download lost", image=held.record.image, error=str(err))
            return None
        return held

    async def drop(self, image: str, reason: str, *, held_before: float | None = None) -> None:
        """Remove the download held for ``image``, if any (and if held before the monotonic
        time ``held_before``: a version refused meanwhile may be newer than the caller's)."""
        held = self._by_image.get(image)
        if held is None or (held_before is not None and held.since >= held_before):
            return
        del self._by_image[image]
        await self.cache_dir.in_worker(self._remove, held)
        self._publish_bytes()
        self.log.info("held download dropped", image=image, digest=held.record.digest,
                      version=held.record.etag, size=held.record.size, reason=reason)

    async def sweep(self, *, room: int | None = None) -> None:
        """Drop held downloads past their time, and over ``room`` bytes (oldest first)."""
        slots = [HeldSlot(image, h.record.size, h.deadline)
                 for image, h in self._by_image.items()]
        limit = room if room is not None else self.total_bytes
        decided = holds_to_drop(slots, now=time.monotonic(), room=limit)
        for image, reason in decided.items():
            await self.drop(image, reason)

    def close(self) -> None:
        """Remove every held download (the process is stopping; none is adopted later)."""
        for held in self._by_image.values():
            self._remove(held)
        self._by_image.clear()
        self._publish_bytes()

    # ---- blocking ----------------------------------------------------------------------------

    def _write(self, part: PartFile, record: HeldRecord) -> None:
        # Under the cache lock, as every record: clean-up never takes a record being staged.
        with self.cache_dir.locked():
            self.dir.mkdir(exist_ok=True)
            part.move(image_file(self.dir, record.image, ".part"))
            write_json(image_file(self.dir, record.image, ".json"), record.record(),
                       self.cache_dir.tmp)

    def _unslot(self, held: HeldDownload) -> None:
        """Out of ``held/<image>.part``, so that a newer refused version of the image can be
        held there while this one is inspected and committed from its own path."""
        self._remove_record(held.record)
        held.part.move(self.cache_dir.tmp / f"{uuid.uuid4().hex}.part")

    def _remove(self, held: HeldDownload) -> None:
        self._remove_record(held.record)
        held.part.release()

    def _remove_record(self, record: HeldRecord) -> None:
        """Unlink ``record``'s file, unless it describes another download by now."""
        path = image_file(self.dir, record.image, ".json")
        if read_json(path, lambda _p, _e: None) == record.record():
            path.unlink(missing_ok=True)

    def _publish_bytes(self) -> None:
        self.cache_dir.held_bytes = self.total_bytes
        telemetry.cache_bytes.set(self.cache_dir.total_bytes + self.cache_dir.held_bytes)


def _stamp(moment: datetime) -> str:
    return moment.isoformat(timespec="seconds")
