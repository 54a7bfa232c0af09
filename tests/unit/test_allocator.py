"""The allocator settings ``run`` applies, and the operator's environment winning."""

from __future__ import annotations

import platform

import pytest

from watcher.runtime.allocator import ARENA_MAX, MMAP_THRESHOLD, tune_allocator

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")


@glibc
def test_both_settings_are_applied_without_an_environment_of_the_operators() -> None:
    assert tune_allocator({}) == {"mmap_threshold": MMAP_THRESHOLD, "arena_max": ARENA_MAX}


@glibc
def test_the_operators_malloc_variables_win() -> None:
    assert tune_allocator({"MALLOC_ARENA_MAX": "8"}) == {"mmap_threshold": MMAP_THRESHOLD}
    assert tune_allocator({"MALLOC_MMAP_THRESHOLD_": "0"}) == {"arena_max": ARENA_MAX}
    assert tune_allocator({"GLIBC_TUNABLES": "glibc.malloc.arena_max=4"}) == {}
