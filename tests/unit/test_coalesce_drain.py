"""Draining coalesced runs at stop: what ends in time ends, what does not is named."""

from __future__ import annotations

import asyncio

from watcher.runtime.coalesce import Coalescer


async def test_drain_waits_for_runs_that_end_in_time_and_names_none() -> None:
    coalescer = Coalescer()
    release = asyncio.Event()

    async def work() -> str:
        await release.wait()
        return "done"

    caller = asyncio.create_task(coalescer.run("base", work))
    await asyncio.sleep(0)  # the run starts
    release.set()
    assert await coalescer.drain(5.0) == []
    assert await caller == "done"


async def test_drain_cancels_and_names_runs_still_going_at_the_deadline() -> None:
    coalescer = Coalescer()
    never = asyncio.Event()
    callers = [asyncio.create_task(coalescer.run(key, never.wait)) for key in ("b", "a", "b")]
    await asyncio.sleep(0)
    assert await coalescer.drain(0.01) == ["a", "b"]
    results = await asyncio.gather(*callers, return_exceptions=True)
    assert all(isinstance(r, asyncio.CancelledError) for r in results)
    assert coalescer.active == 0


async def test_drain_with_nothing_running_returns_at_once() -> None:
    assert await Coalescer().drain(0.0) == []
