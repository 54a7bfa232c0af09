"""Coalescing of repeated warm requests: fewest runs that still see every upload."""

from __future__ import annotations

import asyncio

import pytest

from watcher.runtime.coalesce import Coalescer


class Recorder:
    """A run that waits for a gate, counting how many runs started."""

    def __init__(self) -> None:
        self.started = 0
        self.gate = asyncio.Event()

    async def __call__(self) -> int:
        self.started += 1
        number = self.started
        await self.gate.wait()
        return number


async def test_a_single_request_runs_once() -> None:
    coalescer, work = Coalescer(), Recorder()
    work.gate.set()
    assert await coalescer.run("img", work) == 1
    assert work.started == 1 and coalescer.active == 0


async def test_requests_during_a_run_share_one_follow_up_run() -> None:
    coalescer, work = Coalescer(), Recorder()
    first = asyncio.create_task(coalescer.run("img", work))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert work.started == 1
    duplicates = [asyncio.create_task(coalescer.run("img", work)) for _ in range(50)]
    await asyncio.sleep(0)
    assert work.started == 1, "a follow-up must not start while the first run is going"
    work.gate.set()
    assert await first == 1
    assert await asyncio.gather(*duplicates) == [2] * 50
    assert work.started == 2 and coalescer.active == 0


async def test_different_keys_run_side_by_side() -> None:
    coalescer, a, b = Coalescer(), Recorder(), Recorder()
    ta = asyncio.create_task(coalescer.run("a", a))
    tb = asyncio.create_task(coalescer.run("b", b))
    await asyncio.sleep(0.01)
    assert (a.started, b.started) == (1, 1)
    a.gate.set()
    b.gate.set()
    assert list(await asyncio.gather(ta, tb)) == [1, 1]


async def test_a_failure_reaches_every_caller_of_that_run_and_the_next_run_is_fresh() -> None:
    coalescer, calls = Coalescer(), []

    async def failing() -> None:
        calls.append("fail")
        raise RuntimeError("S3 down")

    results = await asyncio.gather(*(coalescer.run("img", failing) for _ in range(3)),
                                   return_exceptions=True)
    assert [type(r) for r in results] == [RuntimeError] * 3
    assert calls == ["fail"]

    async def ok() -> str:
        return "warm"

    assert await coalescer.run("img", ok) == "warm"


async def test_cancelling_one_caller_leaves_the_shared_run_to_the_others() -> None:
    coalescer, work = Coalescer(), Recorder()
    leaving = asyncio.create_task(coalescer.run("img", work))
    staying = asyncio.create_task(coalescer.run("img", work))
    await asyncio.sleep(0.01)
    leaving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leaving
    work.gate.set()
    assert await staying == 1


async def test_close_cancels_running_and_waiting_runs_and_later_requests_still_work() -> None:
    coalescer, work = Coalescer(), Recorder()
    running = asyncio.create_task(coalescer.run("img", work))
    await asyncio.sleep(0.01)
    waiting = asyncio.create_task(coalescer.run("img", work))
    await asyncio.sleep(0.01)
    await coalescer.close()
    for task in (running, waiting):
        with pytest.raises(asyncio.CancelledError):
            await task
    assert coalescer.active == 0
    work.gate.set()
    assert await coalescer.run("img", work) == 2
