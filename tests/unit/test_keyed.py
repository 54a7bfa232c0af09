"""The keyed worker: serial per key, parallel across keys, bounded, folding, retrying."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from typing import Any

import pytest

from watcher.core.backoff import Backoff
from watcher.core.errors import PermanentError, TemporaryError
from watcher.runtime.keyed import KeyedWorker, _retry_delay

FAST = Backoff(base=0.001, cap=0.01, attempts=3)


class Log:
    """Records (level, message, fields) instead of printing."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def __getattr__(self, level: str) -> Any:
        return lambda message, **fields: self.lines.append((level, message, fields))

    def messages(self, level: str) -> list[str]:
        return [message for lvl, message, _ in self.lines if lvl == level]


class Processor:
    """Counts runs per key; each run waits for its key's gate (open by default)."""

    def __init__(self, failures: list[BaseException] | None = None) -> None:
        self.runs: Counter[str] = Counter()
        self.running: set[str] = set()
        self.peak = 0
        self.overlapped = False
        self.gates: dict[str, asyncio.Event] = {}
        self.started: dict[str, asyncio.Event] = {}
        self.failures = list(failures or [])

    def gate(self, key: str) -> asyncio.Event:
        return self.gates.setdefault(key, asyncio.Event())

    def hold(self, *keys: str) -> None:
        for key in keys:
            self.gate(key)

    def has_started(self, key: str) -> asyncio.Event:
        return self.started.setdefault(key, asyncio.Event())

    async def __call__(self, key: str) -> None:
        self.overlapped |= key in self.running
        self.running.add(key)
        self.peak = max(self.peak, len(self.running))
        self.runs[key] += 1
        self.has_started(key).set()
        try:
            if key in self.gates:
                await self.gates[key].wait()
            if self.failures:
                raise self.failures.pop(0)
        finally:
            self.running.discard(key)


def worker(process: Processor, *, max_concurrent: int = 4, retry: Backoff = FAST,
           log: Log | None = None) -> KeyedWorker[str]:
    return KeyedWorker(process, unit="job", key_field="uuid", max_concurrent=max_concurrent,
                       retry=retry, log=log or Log())


async def settled(jobs: KeyedWorker[str]) -> None:
    """Wait until no worker is left (every one reaped)."""
    async with asyncio.timeout(5):
        await jobs.idle()
    assert jobs.keys == []


async def test_one_submit_runs_once_and_the_idle_worker_is_reaped() -> None:
    process = Processor()
    jobs = worker(process)
    jobs.submit("a")
    assert jobs.keys == ["a"]
    await settled(jobs)
    assert process.runs == {"a": 1}


async def test_submits_during_a_run_fold_into_one_re_run() -> None:
    process = Processor()
    process.hold("a")
    jobs = worker(process)
    jobs.submit("a")
    await process.has_started("a").wait()
    for _ in range(50):
        jobs.submit("a")
    process.gate("a").set()
    await settled(jobs)
    assert process.runs == {"a": 2} == jobs.runs
    assert not process.overlapped


async def test_keys_run_in_parallel_up_to_the_bound() -> None:
    process = Processor()
    keys = [f"k{n}" for n in range(5)]
    process.hold(*keys)
    jobs = worker(process, max_concurrent=2)
    for key in keys:
        jobs.submit(key)
    await process.has_started("k0").wait()
    await process.has_started("k1").wait()
    await asyncio.sleep(0)
    assert len(process.running) == 2
    for key in keys:
        process.gate(key).set()
    await settled(jobs)
    assert process.peak == 2
    assert process.runs == dict.fromkeys(keys, 1)


async def test_a_temporary_error_is_retried_until_it_succeeds() -> None:
    log = Log()
    process = Processor([TemporaryError("busy"), TemporaryError("busy")])
    jobs = worker(process, log=log)
    jobs.submit("a")
    await settled(jobs)
    assert process.runs == {"a": 3}
    assert log.messages("warning") == ["job hit a temporary failure; retrying"] * 2
    assert [fields["attempt"] for _, _, fields in log.lines] == [1, 2]
    assert all(fields["uuid"] == "a" for _, _, fields in log.lines)


async def test_retries_stop_after_the_attempts_and_the_key_waits_for_its_next_request() -> None:
    log = Log()
    process = Processor([TemporaryError("down")] * 3)
    jobs = worker(process, retry=FAST, log=log)
    jobs.submit("a")
    await settled(jobs)
    assert process.runs == {"a": 3}
    assert log.messages("warning")[-1] == (
        "job keeps failing; the request stays for the next event or sweep")
    jobs.submit("a")  # the next event: a fresh schedule
    await settled(jobs)
    assert process.runs == {"a": 4}


async def test_a_permanent_error_is_logged_and_not_retried() -> None:
    log = Log()
    process = Processor([PermanentError("refused")])
    jobs = worker(process, log=log)
    jobs.submit("a")
    await settled(jobs)
    assert process.runs == {"a": 1}
    assert log.messages("warning") == ["job failed; not retried"]


async def test_an_unexpected_error_is_reported_and_the_next_request_runs() -> None:
    log = Log()
    process = Processor([RuntimeError("bug")])
    jobs = worker(process, log=log)
    jobs.submit("a")
    await settled(jobs)
    assert [(lvl, fields["unit"]) for lvl, _, fields in log.lines] == [("exception", "job")]
    jobs.submit("a")
    await settled(jobs)
    assert process.runs == {"a": 2}


async def test_drain_cancels_what_does_not_finish_and_refuses_new_keys() -> None:
    log = Log()
    process = Processor()
    process.hold("stuck")
    jobs = worker(process, log=log)
    jobs.submit("stuck")
    jobs.submit("quick")
    await process.has_started("stuck").wait()
    assert await jobs.drain(0.05) == ["stuck"]
    assert log.messages("warning") == ["cancelled unfinished job runs"]
    jobs.submit("late")
    assert jobs.keys == [] and "late" not in process.runs


async def test_a_retry_wait_ends_at_drain_without_another_run() -> None:
    process = Processor([TemporaryError("later", delay=3600)])
    jobs = worker(process, retry=Backoff(base=1, cap=3600, attempts=3))
    jobs.submit("a")
    await process.has_started("a").wait()
    await asyncio.sleep(0)
    assert await jobs.drain(5) == []
    assert process.runs == {"a": 1}


async def test_run_closes_the_worker_when_stop_is_set() -> None:
    process = Processor()
    jobs = worker(process)
    stop = asyncio.Event()
    runner = asyncio.create_task(jobs.run(stop))
    stop.set()
    await runner
    jobs.submit("a")
    assert jobs.keys == []


# ---- the retry delay -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error_delay", "expected"),
    [
        pytest.param(None, "scheduled", id="no-delay-uses-the-schedule"),
        pytest.param(7.0, 7.0, id="the-error-delay-is-honoured"),
        pytest.param(500.0, 60.0, id="the-error-delay-is-capped"),
        pytest.param(-1.0, 0.0, id="a-negative-delay-is-zero"),
    ],
)
def test_the_retry_delay(error_delay: float | None, expected: float | str) -> None:
    schedule = Backoff(base=2.0, cap=60.0, attempts=6)
    scheduled = next(schedule.delays(random.Random(1)))
    delay = _retry_delay(TemporaryError("x", delay=error_delay),
                         schedule.delays(random.Random(1)), schedule.cap)
    assert delay == (scheduled if expected == "scheduled" else expected)


def test_the_retry_delay_is_none_once_the_attempts_are_spent() -> None:
    delays = Backoff(base=1, cap=1, attempts=2).delays()
    assert _retry_delay(TemporaryError("x", delay=5), delays, 1) == 1
    assert _retry_delay(TemporaryError("x", delay=5), delays, 1) is None
