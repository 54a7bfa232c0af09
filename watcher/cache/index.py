"""The cache directory's in-memory index: what the records and refs on disk say, at one generation.

Why it exists: lookups, listings and counts run on the event loop, so they must not
touch the disk; the index answers them. A published index is never changed (readers on
the loop can hold it while the directory's worker thread builds the next one from a draft).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from watcher.cache.entry import CacheEntry, Source


@dataclass(frozen=True)
class Ref:
    """An image's current version."""

    digest: str
    etag: str | None


@dataclass(frozen=True)
class Index:
    """What the records and refs said at one generation; never changed once published."""

    entries: Mapping[str, CacheEntry] = field(default_factory=dict)
    refs: Mapping[str, Ref] = field(default_factory=dict)
    by_source: Mapping[Source, str] = field(default_factory=dict)
    total_bytes: int = 0
    generation: str | None = None


@dataclass
class Draft:
    """A change in the making, under the lock: copies of the index's maps, kept in step
    entry by entry (a copy is cheap; rebuilding 5,000 entries' maps on every commit is not)."""

    entries: dict[str, CacheEntry]
    refs: dict[str, Ref]
    by_source: dict[Source, str]
    total_bytes: int
    changed: bool = False

    @classmethod
    def of(cls, index: Index) -> Draft:
        return cls(dict(index.entries), dict(index.refs), dict(index.by_source),
                   index.total_bytes)

    def put(self, entry: CacheEntry) -> None:
        self.drop(entry.digest)
        self.entries[entry.digest] = entry
        self.total_bytes += entry.size
        self.by_source.update(dict.fromkeys(entry.sources, entry.digest))
        self.changed = True

    def drop(self, digest: str) -> None:
        old = self.entries.pop(digest, None)
        if old is not None:
            self.total_bytes -= old.size
            for source in old.sources:
                if self.by_source.get(source) == digest:
                    del self.by_source[source]
        self.changed = True

    def index(self, generation: str | None) -> Index:
        return Index(self.entries, self.refs, self.by_source, self.total_bytes, generation)
