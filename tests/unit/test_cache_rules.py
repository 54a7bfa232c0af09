"""The cache's decisions as tables: hits, what a use records, and what eviction removes."""

from __future__ import annotations

import pytest

from watcher.core.cache_rules import (
    LRU_RESOLUTION,
    EvictionChoice,
    Source,
    Stored,
    UseRecord,
    choose_evictions,
    is_cache_hit,
    use_to_record,
)

ONE = Source("vm", "a/one.qcow2", "etag-1")
ONE_REUPLOADED = Source("vm", "a/one.qcow2", "etag-2")
SAME_BYTES_ELSEWHERE = Source("vm", "b/two.qcow2", "etag-1")


@pytest.mark.parametrize(
    ("source", "known", "published", "hit"),
    [
        pytest.param(ONE, [ONE], True, True, id="known-version-with-sidecar"),
        pytest.param(ONE, [ONE], False, True, id="known-version-without-sidecar"),
        pytest.param(SAME_BYTES_ELSEWHERE, [ONE], True, True,
                     id="same-etag-under-another-key-with-sidecar"),
        pytest.param(SAME_BYTES_ELSEWHERE, [ONE], False, False,
                     id="same-etag-under-another-key-without-sidecar"),
        pytest.param(ONE_REUPLOADED, [ONE], True, False,
                     id="new-version-same-digest-claimed-by-a-maybe-stale-sidecar"),
        pytest.param(ONE, [], True, False, id="entry-without-sources"),
    ],
)
def test_a_hit_needs_a_known_object_version(
        source: Source, known: list[Source], published: bool, hit: bool) -> None:
    assert is_cache_hit(source, known, published_digest=published) is hit


FRESH = 10.0
STALE = LRU_RESOLUTION + 1


@pytest.mark.parametrize(
    ("sources", "entry_image", "ref", "age", "expected"),
    [
        pytest.param([ONE], "base", ("d" * 64, "etag-1"), FRESH, UseRecord(False, False),
                     id="duplicate-notification-writes-nothing"),
        pytest.param([ONE], "base", ("d" * 64, "etag-1"), STALE, UseRecord(True, False),
                     id="stale-lru-time-rewrites-the-record-only"),
        pytest.param([ONE], "base", None, FRESH, UseRecord(True, True),
                     id="image-without-ref-gets-one"),
        pytest.param([ONE], "base", ("e" * 64, "etag-1"), FRESH, UseRecord(True, True),
                     id="ref-pointing-at-another-digest"),
        pytest.param([ONE], "base", ("d" * 64, "etag-0"), FRESH, UseRecord(True, True),
                     id="ref-naming-another-version"),
        pytest.param([ONE], "other", ("d" * 64, "etag-1"), FRESH, UseRecord(True, True),
                     id="entry-last-fetched-for-another-image"),
        pytest.param([SAME_BYTES_ELSEWHERE], "base", ("d" * 64, "etag-1"), FRESH,
                     UseRecord(True, True), id="source-not-yet-recorded"),
    ],
)
def test_a_use_writes_only_what_changed(
        sources: list[Source], entry_image: str, ref: tuple[str, str] | None, age: float,
        expected: UseRecord) -> None:
    assert use_to_record(
        source=ONE, entry_sources=sources, entry_image=entry_image, image="base",
        ref_digest=ref[0] if ref else None, ref_etag=ref[1] if ref else None,
        digest="d" * 64, seconds_since_use=age) == expected


def stored(name: str, size: int, used: str) -> Stored:
    return Stored(name, size, f"2026-11-{used}T00:00:00+00:00")


OLD, MID, NEW = stored("a", 40, "01"), stored("b", 40, "02"), stored("c", 40, "03")


@pytest.mark.parametrize(
    ("entries", "pinned", "limit", "expected"),
    [
        pytest.param([OLD, MID, NEW], set(), 120, EvictionChoice((), 120), id="fits"),
        pytest.param([NEW, OLD, MID], set(), 100, EvictionChoice(("a",), 80),
                     id="least-recently-used-goes-first"),
        pytest.param([OLD, MID, NEW], {"a"}, 100, EvictionChoice(("b",), 80),
                     id="pinned-entry-is-skipped"),
        pytest.param([OLD, MID, NEW], {"a", "b", "c"}, 100, EvictionChoice((), 120),
                     id="only-pinned-left-stays-over-limit"),
        pytest.param([OLD, MID, NEW], {"c"}, 0, EvictionChoice(("a", "b"), 40),
                     id="prune-keeps-only-pinned"),
        pytest.param([stored("y", 10, "01"), stored("x", 10, "01")], set(), 10,
                     EvictionChoice(("x",), 10), id="same-time-ordered-by-digest"),
        pytest.param([], set(), 0, EvictionChoice((), 0), id="empty-cache"),
    ],
)
def test_eviction_removes_least_recently_used_unpinned_entries_until_the_cache_fits(
        entries: list[Stored], pinned: set[str], limit: int, expected: EvictionChoice) -> None:
    assert choose_evictions(entries, pinned, limit) == expected
