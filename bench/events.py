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

- paced: the publisher offers 5,000 notifications/s while the daemon consumes; latency is
  handled minus published (p50/p99), rate is notifications / (last handled - first
  published);
- drain: the notifications are queued while no daemon runs, then a fresh daemon drains
  them; rate is notifications / (first consuming -> last handled).

Nothing may be lost: every published notification must be handled, and afterwards the
queue and its dead-letter queue must be empty.

The reference, in the same rounds: a bare aio-pika consumer in this process, on the
same queue with the same prefetch, that does nothing but ack each message (``ack each``),
and one that consumes with ``no_ack`` (the broker settles on delivery: what the client
library can receive at all). Absolute rates drift with the machine's load; the daemon's
drain rate is stated as a fraction of the bare consumer's.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Coroutine, Mapping
from pathlib import Path
from typing import Any, ClassVar

import aio_pika

from bench.common import AMQP_URL, Options, Table, median, percentile, run, verdict
from bench.world import World, world
from testsupport.daemon import running_daemon
from testsupport.polling import wait_for
from testsupport.services import ready_count, sha256_file
from watcher.config import load_config
from watcher.runtime.supervisor import Daemon
from watcher.settings import AmqpSettings

KNOWN_KEY = "images/known.qcow2"
OFFERED_RATE = 5000.0
P99_TARGET_MS = 20.0
BARE_FRACTION_TARGET = 0.8


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


async def _bare_drain(here: World, prefix: str, count: int, *, no_ack: bool,
                      paced: bool = False) -> tuple[float, list[float]]:
    """Handled per second by a consumer that only acks (or consumes with ``no_ack``), and
    the latencies in ms; ``paced``: consuming while the publisher offers ``OFFERED_RATE``."""
    if not paced:
        await asyncio.to_thread(run, _publisher_argv(here, prefix, count, 0, False))
    latencies: list[float] = []
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel(publisher_confirms=False)
        await channel.set_qos(prefetch_count=AmqpSettings().prefetch)
        queue = await channel.get_queue(_queue_name(here))
        done = asyncio.Event()
        seen = 0

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal seen
            if not no_ack:
                await message.ack()
            published = message.headers.get("bench-published-ns")
            if isinstance(published, int):
                latencies.append((time.time_ns() - published) / 1e6)
            seen += 1
            if seen >= count:
                done.set()

        started = time.perf_counter()
        tag = await queue.consume(on_message, no_ack=no_ack)
        proc = None
        if paced:
            proc = await asyncio.create_subprocess_exec(
                *_publisher_argv(here, prefix, count, OFFERED_RATE, False),
                stdout=subprocess.PIPE)
        await asyncio.wait_for(done.wait(), timeout=600)
        seconds = time.perf_counter() - started
        await queue.cancel(tag)
        if proc is not None:
            await proc.communicate()
    return count / seconds, latencies


def _queue_name(here: World) -> str:
    return load_config(here.config_path).amqp.queue_name()


async def _lost(here: World) -> int:
    """Messages left behind: still queued, or dead-lettered."""
    name = _queue_name(here)
    return await ready_count(name) + await ready_count(f"{name}.dead")


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
         "drain: handled/s", "drain / bare consumer (ack each; no_ack)", "lost", "target",
         "verdict"])
    bare = Table(
        f"A bare aio-pika consumer on the same queue, drain of {unknown_count} (median of "
        f"{options.runs}, in the same rounds as the daemon's)",
        ["consumer", "handled/s", "runs"])
    bare_ack: list[float] = []
    bare_no_ack: list[float] = []
    bare_paced: list[float] = []
    bare_p99: list[float] = []
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
                if not same_key:  # the reference, in the same round as the daemon
                    bare_ack.append(asyncio.run(
                        _bare_drain(here, prefix, count, no_ack=False))[0])
                    bare_no_ack.append(asyncio.run(
                        _bare_drain(here, prefix, count, no_ack=True))[0])
                    rate, latencies = asyncio.run(
                        _bare_drain(here, prefix, count, no_ack=False, paced=True))
                    bare_paced.append(rate)
                    bare_p99.append(percentile(latencies, 0.99))
                    print(f"  bare consumer: ack each {bare_ack[-1]:.0f}/s, "
                          f"no_ack {bare_no_ack[-1]:.0f}/s, paced {rate:.0f}/s "
                          f"p99 {bare_p99[-1]:.1f} ms", flush=True)
                offered, rate, latencies = asyncio.run(_paced(here, prefix, count, same_key))
                offers.append(offered)
                rates.append(rate)
                p50s.append(percentile(latencies, 0.50))
                p99s.append(percentile(latencies, 0.99))
                print(f"  {label}: offered {offered:.0f}/s, handled {rate:.0f}/s, "
                      f"p50 {p50s[-1]:.1f} ms, p99 {p99s[-1]:.1f} ms", flush=True)
                drains.append(asyncio.run(_drain(here, prefix, count, same_key)))
                print(f"  {label}: drain {drains[-1]:.0f}/s", flush=True)
            lost_here = asyncio.run(_lost(here))
            target, ok, fraction = "", "", ""
            if not same_key:  # the target is set for unknown keys; duplicates are reported
                share = median(drains) / median(bare_ack)
                fraction = f"{share:.2f}; {median(drains) / median(bare_no_ack):.2f}"
                target = (f"{OFFERED_RATE:.0f}/s handled, p99 < {P99_TARGET_MS:.0f} ms, none "
                          f"lost, drain >= {BARE_FRACTION_TARGET}x bare (ack each)")
                ok = verdict(median(rates) >= 0.97 * OFFERED_RATE and median(p99s) < P99_TARGET_MS
                             and lost_here == 0 and share >= BARE_FRACTION_TARGET)
            paced = [f"{median(offers):.0f}", f"{median(rates):.0f}", f"{median(p50s):.1f}",
                     f"{median(p99s):.1f}"]
            table.add(label, *paced, f"{median(drains):.0f}", fraction, str(lost_here), target, ok)
    table.notes += [
        "handled = `Daemon.handle_message` returned None, or the work it returned finished "
        "(acks follow in batches, 2 ms later); publisher in a separate process, persistent "
        "messages, no publisher confirms",
        f"consumer prefetch: the config default ({AmqpSettings().prefetch}); daemon logs JSON "
        "at info level to a file "
        f"({Path('watcher.log')} in the scratch directory)",
        "lost = messages still queued or dead-lettered after the runs (every published "
        "message was also handled, or the run would have timed out)",
    ]
    bare.add("ack each message (`await message.ack()`)", f"{median(bare_ack):.0f}",
             f"{min(bare_ack):.0f}-{max(bare_ack):.0f}")
    bare.add("`no_ack=True` (settled by the broker on delivery)", f"{median(bare_no_ack):.0f}",
             f"{min(bare_no_ack):.0f}-{max(bare_no_ack):.0f}")
    bare.add(f"ack each, paced: consuming while {OFFERED_RATE:.0f}/s are offered",
             f"{median(bare_paced):.0f} (p99 {median(bare_p99):.1f} ms)",
             f"{min(bare_paced):.0f}-{max(bare_paced):.0f}")
    bare.notes.append(f"same queue, prefetch {AmqpSettings().prefetch}, in this process; "
                      "queued by the same publisher before the consumer starts")
    return [table, bare]
