"""The cache's decisions, pure: what counts as a hit, what a use must record, what to evict.

Why it exists: these rules decide whether a host downloads again and which images it
throws away, and each is easy to get subtly wrong (the predecessor's cache never hit).
Kept apart from the files and the network they are plain functions tested by tables.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Set
from dataclasses import dataclass

LRU_RESOLUTION = 300.0
"""Seconds: a use within this time of the recorded one is not written again."""


@dataclass(frozen=True)
class Source:
    """One object version a cached file came from; one digest may have several."""

    bucket: str
    key: str
    etag: str


def is_cache_hit(source: Source, entry_sources: Collection[Source], *,
                 published_digest: bool) -> bool:
    """Whether an entry may answer a request for ``source`` without a download.

    With a published digest (a sidecar) the entry was found by that digest, but the
    sidecar may be stale, so only a known object version counts as proof: this exact
    source, or one with the same ETag (the same bytes under another key). Without one
    (an optional-checksum image) only this exact object version is the same image.
    """
    if source in entry_sources:
        return True
    return published_digest and source.etag in {s.etag for s in entry_sources}


@dataclass(frozen=True)
class UseRecord:
    """What recording one use of an entry must write."""

    record: bool
    """Rewrite the entry's record (LRU time, latest source, image)."""
    ref: bool
    """Rewrite the image's ref (its current version)."""


def use_to_record(*, source: Source, entry_sources: Collection[Source], entry_image: str,
                  image: str, ref_digest: str | None, ref_etag: str | None, digest: str,
                  seconds_since_use: float) -> UseRecord:
    """Duplicate notifications for a known version write nothing; anything new does."""
    unchanged = (source in entry_sources and entry_image == image
                 and ref_digest == digest and ref_etag == source.etag)
    if unchanged:
        return UseRecord(record=seconds_since_use >= LRU_RESOLUTION, ref=False)
    return UseRecord(record=True, ref=True)


@dataclass(frozen=True)
class Stored:
    """What eviction needs to know of one entry."""

    digest: str
    size: int
    last_used_at: str
    """ISO-8601 UTC, as records hold it; compares in time order as text."""


@dataclass(frozen=True)
class EvictionChoice:
    evict: tuple[str, ...]
    """Digests to remove, least recently used first."""
    remaining_bytes: int
    """Bytes the cache holds once they are gone."""


def choose_evictions(entries: Iterable[Stored], pinned: Set[str], limit: int) -> EvictionChoice:
    """Least recently used unpinned entries go until the total fits ``limit``.

    Pinned entries (the current version of a policy image) never go, even when the
    cache stays over ``limit`` (``remaining_bytes`` says by how much).
    """
    ordered = sorted(entries, key=lambda e: (e.last_used_at, e.digest))
    total = sum(e.size for e in ordered)
    evict = []
    for entry in ordered:
        if total <= limit:
            break
        if entry.digest in pinned:
            continue
        evict.append(entry.digest)
        total -= entry.size
    return EvictionChoice(tuple(evict), total)


@dataclass(frozen=True)
class HeldSlot:
    """What bounding downloads kept aside for a corrected sidecar needs to know of one."""

    image: str
    size: int
    deadline: float
    """Monotonic seconds at which it expires (``cache.stale_sidecar_hold`` after holding)."""


def holds_to_drop(held: Iterable[HeldSlot], *, now: float, room: int) -> dict[str, str]:
    """Held downloads to drop, by image, with the reason: ``expired`` past their deadline,
    then ``max_size``, oldest deadline first, until the rest fit in ``room`` bytes.

    ``room`` is what ``max_size`` leaves once the entries are counted: eviction removes
    unpinned entries first, so a held download never pushes out a current version and a
    full cache does not drop a download the moment it is held.
    """
    drop: dict[str, str] = {}
    kept = []
    for slot in sorted(held, key=lambda s: (s.deadline, s.image)):
        if now >= slot.deadline:
            drop[slot.image] = "expired"
        else:
            kept.append(slot)
    total = sum(slot.size for slot in kept)
    for slot in kept:
        if total <= room:
            break
        drop[slot.image] = "max_size"
        total -= slot.size
    return drop
