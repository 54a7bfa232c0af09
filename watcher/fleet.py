"""This host's part in a fleet: spreading downloads and publishing its status.

Hosts never talk to each other; pre-warming runs each warm through ``FleetMember.warm``
so that each host, on its own:

- waits its fixed per-host share of ``prewarm.spread`` before downloading a new version
  (the cache's ``before_download``), so a hundred hosts do not fetch one upload in the
  same second. Only pre-warming waits: a reprovision asks the cache directly and
  downloads at once;
- keeps what ``fleet status`` shows (images warming, failed with their reason, outdated
  domains) and writes it to ``fleet.status_bucket`` after every change and every
  reconcile, at most once per ``FleetTuning.min_write_interval``, from one task that
  never blocks the loop.

The decisions (delay, document shape) are ``watcher.core.fleet``'s; the bucket is
``watcher.adapters.fleet_status``'s.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

from watcher import __version__, telemetry
from watcher.adapters.fleet_status import FleetStatusStore
from watcher.cache import Cache, Source
from watcher.core.errors import ImageRejected, NotUploadedYet, UnsafeName
from watcher.core.fleet import spread_delay, status_document
from watcher.core.policy import PolicySet
from watcher.core.waiting import wait_any
from watcher.settings import FLEET_TUNING, Config, FleetTuning

log = telemetry.get_logger(component="fleet")

T = TypeVar("T")
BeforeDownload = Callable[[Source], Awaitable[None]]


class FleetMember:
    """Spread and status for one host; ``run`` is the status writer task."""

    def __init__(self, config: Config, cache: Cache, policies: Callable[[], PolicySet],
                 stop: asyncio.Event, *, tuning: FleetTuning = FLEET_TUNING) -> None:
        self.host = config.host.resolved
        self.spread = config.prewarm.spread
        self.reconcile_interval = config.reconcile_interval
        self.cache = cache
        self._policies = policies
        self._stop = stop
        self._min_write_interval = tuning.min_write_interval
        bucket = config.fleet.status_bucket
        self._store = FleetStatusStore(config.s3, bucket, tuning=tuning) if bucket else None
        self.warming: set[str] = set()
        self.failed: dict[str, str] = {}
        self.outdated: tuple[str, ...] = ()
        self._due = asyncio.Event()
        self._forced = False
        self._last: dict[str, Any] | None = None
        self._write_failing = False

    @property
    def publishes(self) -> bool:
        """True when a status bucket is set, so ``run`` has work to do."""
        return self._store is not None

    # ---- pre-warming ------------------------------------------------------------------

    async def warm(self, image: str, ensure: Callable[[BeforeDownload], Awaitable[T]]) -> T:
        """Run ``ensure(before_download)`` for a pre-warm of ``image``: spread, and tracked."""

        async def before_download(source: Source) -> None:
            self.warming.add(image)
            self.changed()
            await self._wait_spread(image, source)

        try:
            result = await ensure(before_download)
        except NotUploadedYet:
            raise  # waiting for an upload is no failure
        except ImageRejected as err:
            self._fail(image, err.reason)
            raise
        except UnsafeName:
            self._fail(image, "unsafe_name")
            raise
        except Exception as err:
            self._fail(image, type(err).__name__)
            raise
        else:
            if self.failed.pop(image, None) is not None:
                self.changed()
            return result
        finally:
            if image in self.warming:
                self.warming.discard(image)
                self.changed()

    async def _wait_spread(self, image: str, source: Source) -> None:
        delay = spread_delay(self.host, f"{source.bucket}/{source.key}@{source.etag}",
                             self.spread)
        if delay <= 0:
            return
        log.info("waiting before the download (prewarm.spread)", image=image, key=source.key,
                 delay=round(delay, 3))
        await wait_any(self._stop, timeout=delay)
        if self._stop.is_set():
            # Stopping: the message goes back to the queue and the next run downloads it.
            raise asyncio.CancelledError

    def _fail(self, image: str, reason: str) -> None:
        if self.failed.get(image) != reason:
            self.failed[image] = reason
            self.changed()

    # ---- status -----------------------------------------------------------------------

    def changed(self) -> None:
        """Something the status shows may have changed: write it soon, if it did."""
        self._due.set()

    def reconciled(self, outdated: list[str] | None) -> None:
        """A reconcile ended (``outdated``: domain names, None when unknown): write now."""
        if outdated is not None:
            self.outdated = tuple(sorted(outdated))
        self._forced = True
        self._due.set()

    def document(self) -> dict[str, Any]:
        """This host's status now; the cache's index is in memory, so no I/O."""
        cached = {}
        for name in sorted(self._policies().images):
            entry = self.cache.current(name)
            if entry is not None:
                cached[name] = entry.digest
        return status_document(
            host=self.host, version=__version__, cached=cached, warming=self.warming,
            failed=self.failed, outdated=self.outdated, updated_at=datetime.now(UTC),
            reconcile_interval=self.reconcile_interval)

    async def run(self) -> None:
        """Write the status when due, at most once per ``min_write_interval``."""
        if self._store is None:
            return
        while not self._stop.is_set():
            await wait_any(self._stop, self._due)
            if self._stop.is_set():
                return
            self._due.clear()
            forced, self._forced = self._forced, False
            started = time.monotonic()
            doc = self.document()
            if forced or _without_time(doc) != _without_time(self._last):
                await self._write(self._store, doc)
            await wait_any(self._stop, timeout=self._min_write_interval
                           - (time.monotonic() - started))

    async def _write(self, status: FleetStatusStore, doc: dict[str, Any]) -> None:
        try:
            await asyncio.to_thread(status.write, doc)
        except Exception as err:
            if not self._write_failing:
                log.warning("fleet status not written; retrying at the next change or "
                            "reconcile", bucket=status.bucket, error=str(err))
            self._write_failing = True
            return
        if self._write_failing:
            log.info("fleet status written again", bucket=status.bucket, recovered=True)
        self._write_failing = False
        self._last = doc


def _without_time(doc: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if doc is None else {k: v for k, v in doc.items() if k != "updated_at"}
