"""Scale curves: the start-up reconcile and the daemon's memory as the world grows.

A host's bucket, cache and domain list only grow, so the reconcile (list every prefix
image's objects, sweep every domain, count the outdated ones) and the daemon's resident
memory must grow at most linearly with them. The world of ``bench.memory`` (2,000 objects
in 20 prefixes, 500 domains; here also 50 cache records) is grown to 10x and 100x in
place, step by step, and at each step the real process, ``python -m watcher run``, is
started a few times: the "reconciled" log line's ``seconds``, and VmRSS / VmHWM once it
has reconciled.

- objects: 100, 1,000, 10,000 per prefix (20 prefixes, one policy image each, the newest
  object under each prefix is the current, cached image);
- cache records: entries for old versions (small data files with real digests), read at
  start-up like any other;
- domains: shut off, each with a ``provisioned`` metadata element; they stop growing at
  ``DOMAIN_CAP`` (5,000): the libvirtd is shared, and 50,000 defined domains would slow
  everyone else's calls to it.

Each step's growth factor is its time (or RSS) divided by the previous step's, next to
how much the world grew; "super-linear" means the figure grew faster than the world.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import libvirt

from bench.common import MIB, Options, Table, median, run, verdict
from bench.domains import domain_xml, remove_domains
from bench.memory import memory_kib
from bench.world import World, world
from testsupport.daemon import DaemonProcess
from watcher.core.domain import NAMESPACE

PREFIXES = 20
BASE_OBJECTS = 2000
BASE_RECORDS = 50
BASE_DOMAINS = 500
DOMAIN_CAP = 5000
DOMAIN_PREFIX = "lvw-bench-scale-"
RUNS_PER_STEP = 3


@dataclass
class Step:
    factor: int
    objects: int
    records: int
    domains: int
    reconcile: list[float]
    rss_mib: list[float]
    hwm_mib: list[float]
    grow_seconds: float
    """Seconds it took to grow the world to this step (uploads, records, domains)."""


class Growing:
    """The world, grown in place: objects in the bucket, cache records, libvirt domains."""

    def __init__(self, here: World, cache: Path) -> None:
        self.here = here
        self.cache = cache
        self.objects = 0
        self.records = 0
        self.domains = 0
        self.tiny = here.root / "tiny.qcow2"
        run(["qemu-img", "create", "-q", "-f", "qcow2", str(self.tiny), "1M"])
        self.tiny_bytes = self.tiny.read_bytes()
        self.digest = hashlib.sha256(self.tiny_bytes).hexdigest()
        self.conn = libvirt.open("qemu:///system")

    def close(self) -> None:
        self.conn.close()

    def to_objects(self, total: int) -> None:
        """Old versions up to ``total`` objects, then each prefix's current image (and its
        sidecar) uploaded again, so it stays the newest."""
        current = 2 * PREFIXES
        per_prefix = (total - current) // PREFIXES
        have = max(0, (self.objects - current) // PREFIXES)
        items = [(f"fleet/p{p:02d}/old-{i:06d}.qcow2", f"old {p} {i}".encode())
                 for p in range(PREFIXES) for i in range(have, per_prefix)]
        self.here.upload_many(items, threads=16)
        newest = []
        for p in range(PREFIXES):
            newest.append((f"fleet/p{p:02d}/zz-current.qcow2", self.tiny_bytes))
            newest.append((f"fleet/p{p:02d}/zz-current.qcow2.sha256",
                           f"{self.digest}  zz-current.qcow2\n".encode()))
        self.here.upload_many(newest)
        self.objects = per_prefix * PREFIXES + current

    def to_records(self, total: int) -> None:
        """Cache entries for old versions (the current image is one) up to ``total``."""
        objects = self.cache / "objects"
        objects.mkdir(parents=True, exist_ok=True)
        for i in range(max(self.records, 1), total):
            data = f"an old version {i}".encode()
            digest = hashlib.sha256(data).hexdigest()
            (objects / f"{digest}.qcow2").write_bytes(data)
            stamp = "2026-01-01T00:00:00+00:00"
            record = {
                "digest": digest, "path": f"{digest}.qcow2", "format": "qcow2",
                "virtual_size": MIB, "size": len(data), "image": f"fleet-{i % PREFIXES:02d}",
                "bucket": self.here.bucket, "key": f"fleet/p{i % PREFIXES:02d}/gone-{i}.qcow2",
                "etag": f"{i:032x}", "sources": [{
                    "bucket": self.here.bucket, "key": f"fleet/p{i % PREFIXES:02d}/gone-{i}.qcow2",
                    "etag": f"{i:032x}"}],
                "created_at": stamp, "last_used_at": stamp, "verified_at": stamp,
                "checksum": "sidecar", "durable": True}
            (objects / f"{digest}.json").write_text(json.dumps(record))
        self.records = max(self.records, total)

    def to_domains(self, total: int) -> None:
        metadata = (f'<vw:provisioned xmlns:vw="{NAMESPACE}" image="fleet-00" '
                    f'sha256="{"0" * 64}" finished="2026-01-01T00:00:00Z"/>')
        names = [f"{DOMAIN_PREFIX}{i:05d}" for i in range(self.domains, total)]
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda name: self.conn.defineXML(domain_xml(name, metadata)), names))
        self.domains = max(self.domains, total)


def _measure(here: World, runs: int) -> tuple[list[float], list[float], list[float]]:
    """Reconcile seconds, VmRSS and VmHWM (MiB) once reconciled, per start."""
    seconds: list[float] = []
    rss: list[float] = []
    hwm: list[float] = []
    for _ in range(runs):
        proc = DaemonProcess(here.config_path).start()
        try:
            _, record = proc.wait(partial(proc.find, "reconciled"), 900, "reconcile")
            time.sleep(1)
            now, peak = memory_kib(proc.pid)
        finally:
            proc.stop()
        seconds.append(float(record["seconds"]))
        rss.append(now / 1024)
        hwm.append(peak / 1024)
    return seconds, rss, hwm


@contextmanager
def _domains_removed() -> Iterator[None]:
    remove_domains(DOMAIN_PREFIX)
    try:
        yield
    finally:
        remove_domains(DOMAIN_PREFIX)


def _growth(value: float, before: float | None) -> str:
    return "" if before is None or before <= 0 else f"{value / before:.1f}x"


def _kind(value: float, before: float | None, world_growth: float) -> str:
    """Linear or better, or super-linear: the figure against how much the world grew."""
    if before is None or before <= 0:
        return ""
    ratio = value / before
    return "super-linear" if ratio > 1.25 * world_growth else (
        "linear" if ratio > 0.5 * world_growth else "sub-linear")


def bench(options: Options) -> list[Table]:
    factors = (1, 10) if options.quick else (1, 10, 100)
    steps: list[Step] = []
    with _domains_removed(), world(options.scratch, "scale") as here:
        cache = here.root / "cache"
        here.write_policy({f"fleet-{p:02d}": {"prefix": f"fleet/p{p:02d}/"}
                           for p in range(PREFIXES)})
        here.write_config(cache)
        growing = Growing(here, cache)
        try:
            for factor in factors:
                started = time.monotonic()
                domains = min(BASE_DOMAINS * factor, DOMAIN_CAP)
                growing.to_objects(BASE_OBJECTS * factor)
                growing.to_records(BASE_RECORDS * factor)
                growing.to_domains(domains)
                grown = time.monotonic() - started
                print(f"  {factor}x: {growing.objects} objects, {growing.records} records, "
                      f"{growing.domains} domains, grown in {grown:.0f} s", flush=True)
                if not steps:
                    _measure(here, 1)  # the first start caches the current image: not counted
                seconds, rss, hwm = _measure(here, RUNS_PER_STEP)
                steps.append(Step(factor, growing.objects, growing.records, growing.domains,
                                  seconds, rss, hwm, grown))
                print(f"  {factor}x: reconcile {median(seconds):.2f} s, "
                      f"RSS {median(rss):.0f} MiB", flush=True)
        finally:
            growing.close()
    table = Table(
        f"Scale: start-up reconcile and memory of `python -m watcher run` (median of "
        f"{RUNS_PER_STEP} starts per step)",
        ["step", "objects", "cache records", "domains", "reconcile s", "growth", "kind",
         "VmRSS MiB", "growth", "kind", "VmHWM MiB", "target", "verdict"])
    previous: Step | None = None
    for step in steps:
        world_growth = step.objects / previous.objects if previous else 1.0
        t, mem = median(step.reconcile), median(step.rss_mib)
        t0 = median(previous.reconcile) if previous else None
        r0 = median(previous.rss_mib) if previous else None
        kinds = (_kind(t, t0, world_growth), _kind(mem, r0, world_growth))
        table.add(f"{step.factor}x", step.objects, step.records, step.domains,
                  f"{t:.2f}", _growth(t, t0), kinds[0], f"{mem:.0f}", _growth(mem, r0),
                  kinds[1], f"{median(step.hwm_mib):.0f}",
                  "linear or better" if previous else "",
                  verdict("super-linear" not in kinds) if previous else "")
        previous = step
    table.notes += [
        "growth = this step's figure / the previous step's; kind compares it with how much "
        "the objects and records grew (10x per step): linear (0.5-1.25x of that), sub-linear "
        "below, super-linear above",
        f"domains stop at {DOMAIN_CAP} (the issue's 10x): this libvirtd is shared, and tens "
        "of thousands of defined domains would slow every other user's calls; time to grow "
        "each step (uploads, records, domains): "
        + ", ".join(f"{s.factor}x {s.grow_seconds:.0f} s" for s in steps),
        "the daemon connects to libvirt (qemu:///system); its sweep and outdated count also "
        "go through any other domains on this host",
    ]
    return [table]
