"""A running API job's progress, and what a job that ended early left on its volume.

Why it exists: a status read (``GET /api/v1/status/{id}``) answers from memory while the
job runs, so the live progress (stage, percent, bytes, ETA) is kept apart from the
database, which lags by at most ``PROGRESS_EVERY``; the transfer's own counters feed
the ``downloading`` stage. When a job fails or is cancelled, its ``error`` says what
state it left the volume in, worked out here from how far it came.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from watcher.core.api_shapes import Stage

if TYPE_CHECKING:
    from watcher.adapters.jobstore import JobRecord
    from watcher.cache.download import FetchProgress
    from watcher.executor import Target

PROGRESS_EVERY = 2.0
"""Seconds between progress writes to the job database while a stage runs."""


@dataclass
class Live:
    """A running job's progress, in memory; ``GET`` reads it, the database lags behind."""

    stage: Stage = "initializing"
    percent: float = 0.0
    bytes_processed: int = 0
    bytes_total: int = 0
    eta_sec: float | None = None
    stage_started: float = field(default_factory=time.monotonic)
    saved: float = 0.0
    fetching: tuple[str, str] | None = None
    """(bucket, key) while the stage reads the warmer's transfer progress."""

    def begin(self, stage: Stage, total: int = 0) -> None:
        self.stage, self.percent, self.bytes_processed = stage, 0.0, 0
        self.bytes_total, self.eta_sec = total, None
        self.stage_started = time.monotonic()

    def advance(self, done: int, total: int) -> None:
        self.bytes_processed, self.bytes_total = done, total
        self.percent = round(100.0 * done / total, 1) if total > 0 else 0.0
        elapsed = time.monotonic() - self.stage_started
        if done > 0 and total >= done and elapsed > 0:
            self.eta_sec = round((total - done) * elapsed / done, 1)

    def fields(self) -> dict[str, Any]:
        return {"stage": self.stage, "percent": self.percent,
                "bytes_processed": self.bytes_processed, "bytes_total": self.bytes_total,
                "eta_sec": self.eta_sec}


def read_transfer(live: Live, fetching: Mapping[tuple[str, str], FetchProgress]) -> None:
    """Take the ``downloading`` stage's progress from the cache's transfer of the object."""
    if live.fetching is None or live.stage != "downloading":
        return
    progress = fetching.get(live.fetching)
    if progress is None:
        return
    if progress.stage == "verifying":  # the transfer is over: hashed, now inspected
        live.advance(progress.total, progress.total)
    else:
        live.advance(progress.done, progress.total)


def left_behind(record: JobRecord, live: Live, target: Target) -> str:
    """What state the job left its volume in, for ``error``."""
    if record.kind != "provision":
        return "no volume is written by a fetch"
    shown = f"{target.pool}/{target.volume}"
    if not target.touched:
        return f"volume {shown} was not changed"
    if target.wrote:
        return (f"volume {shown} holds a partial image ({live.bytes_processed} of "
                f"{live.bytes_total} bytes written); run the job again before using it")
    return f"volume {shown} was created or grown but not written"
