"""libvirt events: does the watcher hear every domain stop when many come and go?

A reprovision is triggered by a domain's STOPPED event, so a missed event is a missed
job (until the next sweep). 200 tiny domains (``type='kvm'`` when /dev/kvm exists,
32 MiB, no disk: SeaBIOS finds nothing to boot and idles) with unique names are defined,
started, destroyed and undefined by four worker threads, in five rounds. Two listeners
run on one asyncio loop through ``libvirtaio``:

- the watcher's own ``DomainWatcher``, whose ``on_domain`` callback receives a UUID for
  every stopped domain (latency: destroy() returned -> callback);
- a plain lifecycle callback on a second connection that counts every event per domain.

Every domain is destroyed and undefined afterwards, also when the benchmark fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import libvirt
import libvirtaio

from bench.common import Options, Table, median, percentile, spread, verdict
from testsupport.polling import wait_for
from watcher.adapters.hypervisor import DomainWatcher

URI = "qemu:///system"
ROUNDS = 5
WORKERS = 8


def domain_xml(name: str, metadata: str = "") -> str:
    kind = "kvm" if os.path.exists("/dev/kvm") else "qemu"
    return f"""<domain type='{kind}'>
  <name>{name}</name>
  <memory unit='MiB'>32</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64'>hvm</type><boot dev='hd'/></os>
  <on_poweroff>destroy</on_poweroff>{f"<metadata>{metadata}</metadata>" if metadata else ""}
  <devices><memballoon model='none'/></devices>
</domain>"""


class Tally:
    """What the listeners heard, by domain name / UUID, with arrival times."""

    def __init__(self, names: set[str]) -> None:
        self.names = names
        self.lifecycle: Counter[tuple[str, int]] = Counter()
        self.stopped_at: dict[str, float] = {}
        self.reported_at: dict[str, float] = {}

    def on_lifecycle(self, _conn: Any, dom: Any, event: int, _detail: int,
                     _opaque: object) -> None:
        name = dom.name()
        if name in self.names:
            self.lifecycle[(name, event)] += 1

    def on_domain(self, domain_uuid: str) -> None:
        self.reported_at.setdefault(domain_uuid, time.monotonic())


def _cycle(conn: Any, name: str, tally: Tally) -> str:
    """Define, start, destroy, undefine one domain; returns its UUID."""
    dom = conn.defineXML(domain_xml(name))
    domain_uuid = str(dom.UUIDString())
    try:
        dom.create()
        dom.destroy()
        tally.stopped_at[domain_uuid] = time.monotonic()
    finally:
        dom.undefine()
    return domain_uuid


def remove_domains(prefix: str) -> None:
    conn = libvirt.open(URI)
    try:
        for dom in conn.listAllDomains():
            if dom.name().startswith(prefix):
                with contextlib.suppress(libvirt.libvirtError):
                    if dom.isActive():
                        dom.destroy()
                with contextlib.suppress(libvirt.libvirtError):
                    dom.undefine()
    finally:
        conn.close()


async def _run(options: Options, prefix: str, count: int) -> tuple[Tally, list[float]]:
    names = [f"{prefix}{i:03d}" for i in range(count)]
    tally = Tally(set(names))
    stop = asyncio.Event()
    watcher = DomainWatcher(URI, tally.on_domain)
    watcher_task = asyncio.create_task(watcher.run(stop), name="libvirt")
    counter_conn: Any = None
    callback_id: int | None = None
    round_seconds: list[float] = []
    try:
        await wait_for(lambda: watcher.connected, timeout=30, what="libvirt")
        counter_conn = libvirt.open(URI)
        callback_id = counter_conn.domainEventRegisterAny(
            None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, tally.on_lifecycle, None)
        worker_conn = await asyncio.to_thread(libvirt.open, URI)
        loop = asyncio.get_running_loop()
        try:
            with ThreadPoolExecutor(WORKERS) as pool:
                per_round = count // ROUNDS
                for r in range(ROUNDS):
                    batch = names[r * per_round:(r + 1) * per_round]
                    started = time.monotonic()
                    await asyncio.gather(*(loop.run_in_executor(pool, _cycle, worker_conn, n,
                                                                tally) for n in batch))
                    round_seconds.append(time.monotonic() - started)
        finally:
            await asyncio.to_thread(worker_conn.close)
        with contextlib.suppress(AssertionError):  # let the last events arrive (or time out)
            await wait_for(lambda: len(tally.reported_at) >= count
                           and sum(tally.lifecycle.values()) >= 4 * count,
                           timeout=10, interval=0.1, what="the last events")
    finally:
        if counter_conn is not None:
            with contextlib.suppress(libvirt.libvirtError):
                if callback_id is not None:
                    counter_conn.domainEventDeregisterAny(callback_id)
                counter_conn.close()
        await asyncio.to_thread(remove_domains, prefix)
        stop.set()
        await asyncio.wait_for(watcher_task, 30)
        impl = libvirtaio.getCurrentImpl()
        if impl is not None:  # let libvirt release its handles before the loop closes
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(impl.drain(), timeout=5)
    return tally, round_seconds


def bench(options: Options) -> list[Table]:
    count = 20 if options.quick else 200
    prefix = f"lvw-bench-{uuid.uuid4().hex[:6]}-"
    tally, rounds = asyncio.run(_run(options, prefix, count))
    heard = Counter(event for (_, event), n in tally.lifecycle.items() for _ in range(n))
    started = heard[libvirt.VIR_DOMAIN_EVENT_STARTED]
    stopped = heard[libvirt.VIR_DOMAIN_EVENT_STOPPED]
    total = sum(tally.lifecycle.values())
    latencies = [(tally.reported_at[u] - t) * 1000 for u, t in tally.stopped_at.items()
                 if u in tally.reported_at]
    per_round = count // ROUNDS
    table = Table(
        f"libvirt events: {count} domains defined, started, destroyed, undefined "
        f"({ROUNDS} rounds of {per_round}, {WORKERS} threads)",
        ["measure", "value", "target", "verdict"])
    table.add("STARTED events heard", f"{started} / {count}", "all", verdict(started == count))
    table.add("STOPPED events heard", f"{stopped} / {count}", "all", verdict(stopped == count))
    table.add("all lifecycle events heard (defined, started, stopped, undefined)",
              f"{total} (expected >= {4 * count})", "", "")
    table.add("stopped domains reported by `DomainWatcher.on_domain`",
              f"{len(tally.reported_at)} / {count}", "all",
              verdict(len(tally.reported_at) == count))
    if latencies:
        table.add("destroy() returned -> on_domain, p50 / p99 (negative: before it returned)",
                  f"{percentile(latencies, 0.5):.1f} / {percentile(latencies, 0.99):.1f} ms",
                  "", "")
    table.add("domains cycled per second (median round)",
              f"{per_round / median(rounds):.1f} [{spread(rounds)} s per round]", "", "")
    return [table]
