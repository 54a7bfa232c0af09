"""The record files: an entry's record and an image's ref, as they are on disk.

Why it exists: ``CacheDir`` decides when the cache changes (under the lock, at a new
generation, published as a new index); this module is only the files and their format:
every record and ref read at once (an unreadable one is skipped with a warning, never
fatal), one written by atomic rename, an entry's two files removed record first, its
bytes hashed again against its name, and what a crash left of them removed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from watcher.cache.entry import CacheEntry, Source, VerifyResult, now_stamp
from watcher.cache.files import (
    listdir,
    read_json,
    remove_unless_locked,
    sha256_file,
    stat_key,
    write_json,
)
from watcher.cache.index import Ref
from watcher.core.errors import UnsafeName
from watcher.core.paths import digest_file, is_digest, is_image_name

HELD_DIR = "held"
"""Downloads held for a corrected sidecar (``watcher.cache.held``), under the cache dir."""


def read_all(objects: Path, refs: Path, log: Any) -> tuple[dict[str, CacheEntry], dict[str, Ref]]:
    """Every readable record under ``objects`` by digest, every ref under ``refs`` by name."""
    def read(path: Path) -> dict[str, Any] | None:
        return read_json(path, lambda p, err: log.warning(
            "unreadable cache file ignored", file=str(p), error=str(err)))

    entries = {}
    for record in objects.glob("*.json"):
        data = read(record)
        if not data:
            continue
        try:
            entry = CacheEntry.from_record(objects, data)
        except (TypeError, KeyError, ValueError, UnsafeName) as err:
            log.warning("unreadable cache record ignored", record=str(record), error=str(err))
            continue
        entries[entry.digest] = entry
    found = {}
    for path in refs.glob("*.json"):
        data = read(path)
        if data and is_image_name(path.stem) and is_digest(data.get("digest")):
            etag = data.get("etag")
            found[path.stem] = Ref(str(data["digest"]), str(etag) if etag else None)
    return entries, found


def write_record(objects: Path, tmp: Path, entry: CacheEntry) -> None:
    write_json(digest_file(objects, entry.digest, ".json"), entry.record(), tmp)


def write_ref(path: Path, tmp: Path, digest: str, source: Source) -> None:
    """The ref at ``path``: ``digest`` is the image's current version, read from ``source``."""
    write_json(path, {"digest": digest, "bucket": source.bucket, "key": source.key,
                      "etag": source.etag, "resolved_at": now_stamp()}, tmp)


def remove_files(objects: Path, entry: CacheEntry) -> None:
    # Record first: without it the entry no longer exists, even if unlinking data fails.
    digest_file(objects, entry.digest, ".json").unlink(missing_ok=True)
    entry.path.unlink(missing_ok=True)


def rehash(entry: CacheEntry) -> tuple[VerifyResult, tuple[int, ...] | None]:
    """Whether the entry's bytes still hash to its digest, and the file identity hashed."""
    seen = stat_key(entry.path)
    try:
        digest = sha256_file(entry.path)
    except OSError as err:
        return VerifyResult(entry.digest, False, f"unreadable: {err}"), seen
    if digest != entry.digest:
        return VerifyResult(entry.digest, False, f"content hashes to {digest}"), seen
    return VerifyResult(entry.digest, True, "ok"), seen


def remove_held_leftovers(cache_dir: Path) -> int:
    """Remove held data nobody holds a lock on (a crash's), and records without data;
    returns files removed. Blocking; the caller holds the cache lock."""
    directory = cache_dir / HELD_DIR
    removed = 0
    for path in listdir(directory):
        if path.suffix == ".part":
            removed += remove_unless_locked(path)
    for path in listdir(directory):
        if path.suffix == ".part":
            continue
        if path.suffix != ".json" or not path.with_suffix(".part").exists():
            removed += remove_unless_locked(path)
    return removed


def remove_crash_leftovers(directory: Path, objects: Path, tmp: Path) -> int:
    """Remove the unlocked temp files, held downloads and data files without a record in
    ``directory``; the caller holds the cache lock. Returns files removed."""
    # Every other temp file (records being written) is written under the cache lock.
    removed = sum(remove_unless_locked(leftover) for leftover in listdir(tmp))
    removed += remove_held_leftovers(directory)
    # A data file without its record was never committed (crash between the renames).
    for data in listdir(objects):
        if data.suffix != ".json" and not data.with_suffix(".json").exists():
            data.unlink(missing_ok=True)
            removed += 1
    return removed
