"""The job engine: one serial worker per key, parallel across keys, bounded, retrying.

Why it exists: work about one thing (a domain, by UUID; a volume) must run one at a time
and in order, while work about different things runs side by side, up to a limit that
protects the disks. Whatever triggers the work (a libvirt event, a sweep, an API call)
only submits the key; the processor re-reads the state of that thing itself, so:

- a request arriving while the key's run is going is folded into one re-run after it
  (a burst of events costs at most two runs, and the last one sees every change);
- a worker exists only while its key has work: an idle one ends and is forgotten;
- at most ``max_concurrent`` runs go at once; a worker waiting to retry holds no slot;
- a ``TemporaryError`` is retried with capped, jittered backoff, after the delay the
  error names when it names one (never longer than the cap); once the attempts are
  spent the key waits for its next request. A ``PermanentError`` is logged and not
  retried; anything else is an unexpected error of the unit, logged with its traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Awaitable, Callable, Hashable, Iterator
from typing import Any, Generic, TypeVar

from watcher import telemetry
from watcher.core.backoff import Backoff
from watcher.core.errors import PermanentError, TemporaryError

K = TypeVar("K", bound=Hashable)


class KeyedWorker(Generic[K]):
    """Runs ``process(key)`` for submitted keys, one run per key at a time."""

    def __init__(self, process: Callable[[K], Awaitable[None]], *, unit: str,
                 max_concurrent: int, retry: Backoff, key_field: str = "key",
                 log: Any = None, slots: asyncio.Semaphore | None = None) -> None:
        self.process = process
        self.unit = unit
        """Names the work in logs, task names and ``unexpected_errors{unit}``."""
        self.key_field = key_field
        """The log field that carries the key (``uuid`` for a domain)."""
        self.retry = retry
        self.log = log if log is not None else telemetry.get_logger(component=unit)
        self._slots = slots if slots is not None else asyncio.Semaphore(max(1, max_concurrent))
        """Shared with another worker (``slots``) when both write volumes: API jobs and
        tag-triggered reprovisions together stay within ``reprovision.max_concurrent``."""
        self._workers: dict[K, asyncio.Task[None]] = {}
        self._again: set[K] = set()
        self._closing = asyncio.Event()
        self.runs: Counter[K] = Counter()
        """Runs finished per key, whatever their outcome: what a caller waits on to know
        that a request was looked at. One small count per key ever seen."""

    @property
    def keys(self) -> list[K]:
        """Keys with a worker right now: running, waiting for a slot, or waiting to retry."""
        return list(self._workers)

    async def idle(self) -> None:
        """Wait until no key has a worker left."""
        while self._workers:
            await asyncio.wait(list(self._workers.values()))

    def submit(self, key: K) -> None:
        """Have ``key`` processed soon; never blocks. Ignored once draining."""
        if self._closing.is_set():
            return
        if key in self._workers:
            self._again.add(key)  # folded into one re-run after the current one
            return
        self._workers[key] = asyncio.get_running_loop().create_task(
            self._worker(key), name=f"{self.unit} {key}")

    async def run(self, stop: asyncio.Event) -> None:
        """Accept keys until ``stop`` is set; ``drain`` then finishes the running ones."""
        await stop.wait()
        self._closing.set()

    async def drain(self, timeout: float) -> list[K]:
        """Stop taking keys, wait up to ``timeout`` s for the workers, then cancel them.

        Returns the keys whose workers were cancelled.
        """
        self._closing.set()
        workers = dict(self._workers)
        if not workers:
            return []
        _done, pending = await asyncio.wait(workers.values(), timeout=timeout)
        cancelled = [key for key, task in workers.items() if task in pending]
        for task in pending:
            task.cancel()
        if pending:
            self.log.warning(f"cancelled unfinished {self.unit} runs", unit=self.unit,
                             keys=[str(key) for key in cancelled])
            await asyncio.gather(*pending, return_exceptions=True)
        return cancelled

    async def _worker(self, key: K) -> None:
        fields = {self.key_field: key}
        delays = self.retry.delays()
        attempt = 0
        try:
            while True:
                self._again.discard(key)
                try:
                    async with self._slots:
                        try:
                            await self.process(key)
                        finally:
                            self.runs[key] += 1
                    attempt = 0
                    delays = self.retry.delays()
                except TemporaryError as exc:
                    attempt += 1
                    delay = _retry_delay(exc, delays, self.retry.cap)
                    if delay is None:
                        self.log.warning(
                            f"{self.unit} keeps failing; the request stays for the next event "
                            "or sweep", **fields, attempts=attempt, error=str(exc))
                        delays, attempt = self.retry.delays(), 0
                    else:
                        self.log.warning(f"{self.unit} hit a temporary failure; retrying",
                                         **fields, attempt=attempt,
                                         attempts=self.retry.attempts or None,
                                         delay=round(delay, 2), error=str(exc))
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._closing.wait(), timeout=delay)
                        self._again.add(key)
                except PermanentError as exc:
                    self.log.warning(f"{self.unit} failed; not retried", **fields,
                                     error=str(exc))
                except Exception:
                    telemetry.report_unexpected(self.log, self.unit, **fields)
                if key not in self._again or self._closing.is_set():
                    return
        finally:
            self._workers.pop(key, None)
            self._again.discard(key)


def _retry_delay(error: TemporaryError, delays: Iterator[float], cap: float) -> float | None:
    """Seconds before the next attempt, or None when the attempts are spent.

    Every retry spends one attempt of the schedule; the error's own ``delay``, when it
    names one, replaces the schedule's jittered one, within ``cap``.
    """
    scheduled = next(delays, None)
    if scheduled is None:
        return None
    if error.delay is not None:
        return min(max(error.delay, 0.0), cap)
    return scheduled
