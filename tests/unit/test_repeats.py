"""Keyed problems: every new one is said, repeats of one only once per interval."""

from __future__ import annotations

from watcher.core.repeats import RepeatFilter


def test_a_new_problem_is_always_said() -> None:
    repeats = RepeatFilter(interval=60)
    assert repeats.admit(("etag1", "download_failed"), 0.0) == 0
    # Another reason for the same object version is another problem.
    assert repeats.admit(("etag1", "checksum_mismatch"), 1.0) == 0
    # Another object version with the same reason too.
    assert repeats.admit(("etag2", "checksum_mismatch"), 2.0) == 0


def test_repeats_are_said_once_per_interval_with_their_count() -> None:
    repeats = RepeatFilter(interval=60)
    assert repeats.admit("k", 0.0) == 0
    assert [repeats.admit("k", t) for t in (1.0, 30.0, 59.9)] == [None, None, None]
    assert repeats.admit("k", 60.0) == 3
    assert repeats.admit("k", 61.0) is None
    assert repeats.admit("k", 120.0) == 1


def test_a_forgotten_problem_is_new_again() -> None:
    repeats = RepeatFilter(interval=60)
    repeats.admit("k", 0.0)
    repeats.forget("k")
    assert repeats.admit("k", 1.0) == 0


def test_memory_is_bounded_and_forgets_the_least_recently_said() -> None:
    repeats = RepeatFilter(interval=60, max_keys=2)
    repeats.admit("a", 0.0)
    repeats.admit("b", 0.0)
    repeats.admit("c", 0.0)  # "a" is forgotten
    assert repeats.admit("b", 1.0) is None
    assert repeats.admit("a", 1.0) == 0
