"""The C allocator's settings for a process that runs for months.

Why it exists: in an hour-long soak the daemon's RSS kept creeping (about 5% between the
second and the last quarter) while its live heap stayed flat (tracemalloc and a native
allocation profile agree: no leak). The creep is glibc's: a freed mmap-ed block raises
its *dynamic* mmap threshold, after which big short-lived buffers (2 MiB image headers,
download chunks, HTTP bodies) are carved out of the heap and the per-thread arenas of
the worker threads, which fragment and never shrink. A fixed threshold keeps such
buffers in mmap (given back on free), and two arenas bound what threads can strand.

Applied once, at ``run``, before any thread starts. An operator's own ``MALLOC_*``
environment (glibc's tunables) wins; a libc without ``mallopt`` (musl) is left alone.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Mapping

M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
MMAP_THRESHOLD = 256 * 1024
"""Blocks from this size up are mmap-ed and returned to the system when freed."""
ARENA_MAX = 2
"""Malloc arenas at most: the event loop's and one shared by the worker threads."""


def tune_allocator(environ: Mapping[str, str] = os.environ) -> dict[str, int]:
    """Set the fixed mmap threshold and the arena limit; returns what was set."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return {}
    wanted = {"mmap_threshold": (M_MMAP_THRESHOLD, MMAP_THRESHOLD, "MALLOC_MMAP_THRESHOLD_"),
              "arena_max": (M_ARENA_MAX, ARENA_MAX, "MALLOC_ARENA_MAX")}
    done = {}
    for name, (option, value, variable) in wanted.items():
        if variable in environ or "GLIBC_TUNABLES" in environ:
            continue
        if mallopt(ctypes.c_int(option), ctypes.c_int(value)) == 1:
            done[name] = value
    return done
