"""The event path: how many bucket notifications per second, and how late each is handled.

A busy bucket produces notifications for keys no policy names; the watcher must shrug
them off fast. Duplicates for a known key share the warm that is running, or the one
follow-up queued behind it (one HEAD and one sidecar GET per run, not per message).

The daemon (without libvirt) runs in this process; its ``handle_message`` is wrapped by
a subclass that records, when the message is handled, the publish time carried in a header
(``bench-published-ns``, set by a publisher in its own process). Handled means
``handle_message`` returned None (nothing to do: the usual case for unknown keys) or the
work it returned finished. The ack follows in the next batch, at most a few ms later.
Two measurements per kind of notification:

- paced: the publisher offers 2,000 notifications/s while the daemon consumes; latency is
  handled minus published (p50/p99), rate is notifications / (last handled - first
  published);
- drain: the notifications are queued while no daemon runs, then a fresh daemon drains
  them; rate is notifications / (first consuming -> last handled).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Coroutine, Mapping
from pathlib import Path
from typing import Any, ClassVar

from bench.common import Options, Table, median, percentile, run, verdict
from bench.world import World, world
from testsupport.daemon import running_daemon
from testsupport.polling import wait_for
from testsupport.services import sha256_file
from watcher.runtime.supervisor import Daemon
from watcher.settings import AmqpSettings

KNOWN_KEY = "images/known.qcow2"
OFFERED_RATE = 2000.0


class TimedDaemon(Daemon):
    """The daemon, noting when each message was handled."""

    expected: ClassVar[int] = 0
    handled: ClassVar[list[tuple[int, int]]] = []
    all_handled: ClassVar[asyncio.Event | None] = None

    def handle_message(
        self, body: bytes, headers: Mapping[str, object],
    ) -> Coroutine[Any, Any, None] | None:
        work = super().handle_message(body, headers)
        if work is None:  # triaged at once: handled now
            _note(headers)
            return None
        return _noted_after(work, headers)


async def _noted_after(work: Coroutine[Any, Any, None], headers: Mapping[str, object]) -> None:
    await work
    _note(headers)


def _note(headers: Mapping[str, object]) -> None:
    published = headers.get("bench-published-ns")
    if isinstance(published, int):
        TimedDaemon.handled.append((published, time.time_ns()))
        if len(TimedDaemon.handled) >= TimedDaemon.expected and TimedDaemon.all_handled:
            TimedDaemon.all_handled.set()


def _expect(count: int) -> asyncio.Event:
    TimedDaemon.handled = []
    TimedDaemon.expected = count
    TimedDaemon.all_handled = asyncio.Event()
    return TimedDaemon.all_handled


def _publisher_argv(here: World, prefix: str, count: int, rate: float,
                    same_key: bool) -> list[str]:
    return [sys.executable, "-m", "bench.publisher", here.exchange, here.bucket, prefix,
            str(count), str(rate), *(["--same-key"] if same_key else [])]


async def _paced(here: World, prefix: str, count: int,
                 same_key: bool) -> tuple[float, float, list[float]]:
    """(offered per second, handled per second, latencies in ms), consuming while publishing."""
    async with running_daemon(here.config_path, TimedDaemon):
        await asyncio.sleep(0.5)  # let the start-up reconcile finish
        done = _expect(count)
        proc = await asyncio.create_subprocess_exec(
            *_publisher_argv(here, prefix, count, OFFERED_RATE, same_key),
            stdout=subprocess.PIPE)
        await asyncio.wait_for(done.wait(), timeout=600)
        output, _ = await proc.communicate()
    offered = count / float(output.decode().strip())
    handled = TimedDaemon.handled
    first_published = min(p for p, _ in handled)
    last_done = max(d for _, d in handled)
    rate = len(handled) / ((last_done - first_published) / 1e9)
    return offered, rate, [(d - p) / 1e6 for p, d in handled]


async def _drain(here: World, prefix: str, count: int, same_key: bool) -> float:
    """Handled per second when ``count`` notifications wait in the queue at start."""
    await asyncio.to_thread(run, _publisher_argv(here, prefix, count, 0, same_key))
    done = _expect(count)
    async with running_daemon(here.config_path, TimedDaemon):
        started = time.time_ns()
        await asyncio.wait_for(done.wait(), timeout=600)
        last_done = max(d for _, d in TimedDaemon.handled)
    return count / ((last_done - started) / 1e9)


async def _prepare(here: World) -> None:
    image = here.root / "known.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "16M"])
    here.upload_with_sidecar(KNOWN_KEY, image)
    here.write_policy({"known": {"key": KNOWN_KEY}})
    here.write_config(here.root / "cache")
    digest = sha256_file(image)
    # The first start declares the queue and warms the known image.
    async with running_daemon(here.config_path) as running:
        await wait_for(lambda: running.daemon.cache.get(digest), timeout=60,
                       what="the known image")


def bench(options: Options) -> list[Table]:
    unknown_count = 2000 if options.quick else 10_000
    known_count = 200 if options.quick else 1000
    table = Table(
        f"Bucket notifications (median of {options.runs} runs; paced = offered at "
        f"{OFFERED_RATE:.0f}/s while consuming; drain = all queued before the daemon starts)",
        ["notifications", "paced: offered/s", "paced: handled/s", "paced: p50 ms", "paced: p99 ms",
         "drain: handled/s", "target", "verdict"])
    with world(options.scratch, "events") as here:
        asyncio.run(_prepare(here))
        for label, prefix, count, same_key in (
            (f"{unknown_count} for keys no policy names", "other/object-", unknown_count, False),
            (f"{known_count} duplicates for a known, cached key", KNOWN_KEY, known_count, True),
        ):
            rates: list[float] = []
            offers: list[float] = []
            p50s: list[float] = []
            p99s: list[float] = []
            drains: list[float] = []
            for _ in range(options.runs):
                offered, rate, latencies = asyncio.run(_paced(here, prefix, count, same_key))
                offers.append(offered)
                rates.append(rate)
                p50s.append(percentile(latencies, 0.50))
                p99s.append(percentile(latencies, 0.99))
                print(f"  {label}: offered {offered:.0f}/s, handled {rate:.0f}/s, "
                      f"p50 {p50s[-1]:.1f} ms, p99 {p99s[-1]:.1f} ms", flush=True)
                drains.append(asyncio.run(_drain(here, prefix, count, same_key)))
                print(f"  {label}: drain {drains[-1]:.0f}/s", flush=True)
            target, ok = "", ""
            if not same_key:  # the target is set for unknown keys; duplicates are reported
                target = ">= 2000/s and p99 < 50 ms"
                ok = verdict(median(drains) >= 2000 and median(rates) >= 0.97 * OFFERED_RATE
                             and median(p99s) < 50)
            paced = [f"{median(offers):.0f}", f"{median(rates):.0f}", f"{median(p50s):.1f}",
                     f"{median(p99s):.1f}"]
            table.add(label, *paced, f"{median(drains):.0f}", target, ok)
    table.notes += [
        "handled = `Daemon.handle_message` returned None, or the work it returned finished "
        "(acks follow in batches, 2 ms later); publisher in a separate process, persistent "
        "messages, no publisher confirms",
        f"consumer prefetch: the config default ({AmqpSettings().prefetch}); daemon logs JSON "
        "at info level to a file "
        f"({Path('watcher.log')} in the scratch directory)",
    ]
    return [table]
