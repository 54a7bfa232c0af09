"""Memory and start-up: the daemon as systemd runs it, ``python -m watcher run --config``.

A host runs the watcher next to its VMs, so its memory must not grow with image size,
and a restart must be back in business quickly even with a big bucket. Measured on the
real process (libvirt connected too), from ``/proc/PID/status``:

- idle: VmRSS and VmHWM a few seconds after "ready", with nothing to fetch and 500
  domains defined (shut off, each with a ``provisioned`` metadata element, as on a host
  whose VMs the watcher provisioned);
- pre-warming: VmHWM (peak RSS) after the start-up reconcile fetched a large image into
  an empty cache;
- reconcile: with 2,000 objects in the bucket (20 prefixes of 100; one policy image per
  prefix, each the newest qcow2 under it, already cached), the "reconciled" log line's
  ``seconds`` and the time from process start to that line. The reconcile's domain sweep
  and outdated-domain count go through the same 500 domains.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from hashlib import sha256
from pathlib import Path

import libvirt

from bench.common import MIB, Options, Table, median, run, spread, verdict
from bench.domains import domain_xml, remove_domains
from bench.world import World, world
from bench.writer import prepare_images
from testsupport.daemon import DaemonProcess
from watcher.core.domain import NAMESPACE

PREFIXES = 20
OBJECTS_PER_PREFIX = 100
DOMAINS = 500
DOMAIN_PREFIX = "lvw-bench-idle-"


def memory_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of process ``pid`` in KiB."""
    values = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0])
    return values["VmRSS"], values["VmHWM"]


def _big_image(options: Options) -> Path:
    """A 2 GiB qcow2 (full) or the 256 MiB one (quick), built once."""
    images = prepare_images(options, options.image_size)
    if options.quick:
        return next(i for i in images if i.label.startswith("(c)")).qcow2
    data = next(i for i in images if i.label.startswith("(c)")).expanded
    big = options.scratch / "big-2048M-v1.qcow2"
    if not big.exists():
        raw = options.scratch / "big.raw"
        with open(raw, "wb") as out:
            for _ in range(2):
                with open(data, "rb") as src:
                    shutil.copyfileobj(src, out, 4 * MIB)
        run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(big) + ".tmp"])
        os.replace(str(big) + ".tmp", big)
        raw.unlink()
    return big


@contextmanager
def defined_domains(count: int) -> Iterator[None]:
    """``count`` shut-off domains with the watcher's metadata; all undefined afterwards."""
    metadata = (f'<vw:provisioned xmlns:vw="{NAMESPACE}" image="big" '
                f'sha256="{"0" * 64}" finished="2026-01-01T00:00:00Z"/>')
    remove_domains(DOMAIN_PREFIX)
    conn = libvirt.open("qemu:///system")
    try:
        for index in range(count):
            conn.defineXML(domain_xml(f"{DOMAIN_PREFIX}{index:03d}", metadata))
        yield
    finally:
        conn.close()
        remove_domains(DOMAIN_PREFIX)


def _memory_runs(here: World, image: Path, runs: int) -> tuple[list[float], list[float],
                                                                   list[float]]:
    """MiB: idle VmRSS, idle VmHWM, VmHWM after pre-warming ``image``."""
    key = "images/big.qcow2"
    digest = here.upload_with_sidecar(key, image)
    idle_rss: list[float] = []
    idle_hwm: list[float] = []
    warm_hwm: list[float] = []
    for run_number in range(runs):
        cache = here.root / f"cache-{run_number}"
        # Idle: the policy names an object that does not exist yet.
        here.write_policy({"big": {"key": "images/not-yet.qcow2"}})
        here.write_config(cache)
        proc = DaemonProcess(here.config_path).start()
        try:
            proc.wait(partial(proc.find, "reconciled"), 60, "the start-up reconcile")
            time.sleep(3)
            rss, hwm = memory_kib(proc.pid)
        finally:
            proc.stop()
        idle_rss.append(rss / 1024)
        idle_hwm.append(hwm / 1024)
        # Pre-warming: the start-up reconcile downloads the big image into an empty cache.
        shutil.rmtree(cache, ignore_errors=True)
        here.write_policy({"big": {"key": key}})
        proc = DaemonProcess(here.config_path).start()
        record = cache / "objects" / f"{digest}.json"
        try:
            proc.wait(record.exists, 900, "the cache entry")
            _, hwm = memory_kib(proc.pid)
        finally:
            proc.stop()
        warm_hwm.append(hwm / 1024)
        shutil.rmtree(cache, ignore_errors=True)
        print(f"  memory run {run_number + 1}: idle RSS {idle_rss[-1]:.0f} MiB, "
              f"peak while pre-warming {warm_hwm[-1]:.0f} MiB", flush=True)
    return idle_rss, idle_hwm, warm_hwm


def _reconcile_runs(here: World, runs: int) -> tuple[list[float], list[float]]:
    """Seconds: the reconcile's own figure, and process start -> "reconciled"."""
    tiny = here.root / "tiny.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(tiny), "1M"])
    tiny_bytes = tiny.read_bytes()
    digest = sha256(tiny_bytes).hexdigest()
    items: list[tuple[str, bytes]] = []
    for p in range(PREFIXES):
        for i in range(OBJECTS_PER_PREFIX - 2):
            items.append((f"fleet/p{p:02d}/old-{i:03d}.qcow2", f"old {p} {i}".encode()))
    here.upload_many(items)
    newest = []
    for p in range(PREFIXES):  # uploaded last, so newest under each prefix
        newest.append((f"fleet/p{p:02d}/zz-current.qcow2", tiny_bytes))
        newest.append((f"fleet/p{p:02d}/zz-current.qcow2.sha256",
                       f"{digest}  zz-current.qcow2\n".encode()))
    here.upload_many(newest)
    here.write_policy({f"fleet-{p:02d}": {"prefix": f"fleet/p{p:02d}/"}
                       for p in range(PREFIXES)})
    here.write_config(here.root / "cache-reconcile")
    own: list[float] = []
    to_line: list[float] = []
    for attempt in range(runs + 1):  # the first start fills the cache; not counted
        proc = DaemonProcess(here.config_path).start()
        try:
            when, record = proc.wait(partial(proc.find, "reconciled"), 120, "reconcile")
        finally:
            proc.stop()
        if attempt:
            own.append(float(record["seconds"]))
            to_line.append(when - proc.started)
    return own, to_line


def bench(options: Options) -> list[Table]:
    image = _big_image(options)
    size_mib = image.stat().st_size / MIB
    domains = 50 if options.quick else DOMAINS
    with defined_domains(domains):
        with world(options.scratch, "memory") as here:
            idle_rss, idle_hwm, warm_hwm = _memory_runs(here, image, options.runs)
        with world(options.scratch, "reconcile") as here:
            own, to_line = _reconcile_runs(here, options.runs)
    table = Table(f"Memory and start-up of `python -m watcher run` (median of {options.runs})",
                  ["measure", "value", "runs", "target", "verdict"])
    table.add(f"idle VmRSS, {domains} domains defined", f"{median(idle_rss):.0f} MiB",
              spread(idle_rss), "", "")
    table.add("idle VmHWM (peak so far)", f"{median(idle_hwm):.0f} MiB", spread(idle_hwm), "", "")
    table.add(f"VmHWM after pre-warming a {size_mib:.0f} MiB image",
              f"{median(warm_hwm):.0f} MiB", spread(warm_hwm), "<= 150 MB",
              verdict(median(warm_hwm) * MIB <= 150e6))
    count = PREFIXES * OBJECTS_PER_PREFIX
    table.add(f"start-up reconcile, {count} objects, {PREFIXES} prefix images, {domains} "
              "domains (logged seconds)",
              f"{median(own):.2f} s", spread(own), "<= 5 s", verdict(median(own) <= 5))
    table.add("process start -> reconciled", f"{median(to_line):.2f} s", spread(to_line),
              "", "")
    table.notes += [
        "the daemon connects to libvirt (qemu:///system) as in production; its domain sweep "
        f"and outdated count are part of the reconcile and go through the {domains} defined "
        "domains (and any others on this host)",
    ]
    return [table]
