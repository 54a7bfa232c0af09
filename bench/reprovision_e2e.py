"""End to end: from a tagged domain's STOPPED event to the domain running again.

The write is the part of a reprovision that grows with the image and is measured by the
writer benchmark; everything around it (the event reaching the daemon, the plan, the
metadata writes, the interlock, the start through libvirt and its hook) is what the
daemon itself adds, and that should cost well under a second. Measured with the real
daemon process (``python -m watcher run``, debug JSON log), real S3, RabbitMQ, libvirtd
and QEMU, on a domain whose policy rule says ``start: true``:

1. the domain runs; ``libvirt-volume-watcher reprovision DOMAIN`` tags it;
2. ``virDomainDestroy`` (the STOPPED event; t0 is when the call returns, which is when
   libvirtd has emitted the event);
3. the domain's state is polled every 5 ms until it runs again (t1);
4. the write's own duration is read from the daemon's log: from its "writing volume"
   line to the next step's line (the write marker, qemu-img and the fsync).

``t1 - t0 - write`` is the overhead; its target is 300 ms. Every log line between t0 and
t1 is kept with its offset from t0, and the medians per line are the profile.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections import defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any

import libvirt
import yaml

from bench.common import MIB, Options, Table, median, verdict
from bench.world import World, world
from tests.bootimage import domain_xml, write_qcow2_image
from testsupport.daemon import WATCHER
from testsupport.polling import wait_for_sync

URI = "qemu:///system"
TARGET_SECONDS = 0.300
POLL_SECONDS = 0.005
HOOK = "/etc/libvirt/hooks/qemu.d/libvirt-volume-watcher"
IMAGE_SIZE = 16 * MIB
"""Virtual size of the boot image: small, since its write is subtracted anyway."""


class LoggedDaemon:
    """``python -m watcher run`` at debug level, its JSON log appended to a file."""

    def __init__(self, config: Path, log: Path) -> None:
        self.log = log
        argv = [*WATCHER, "run", "--config", str(config), "--log-format", "json",
                "--log-level", "debug"]
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)

    def records(self) -> list[tuple[float, dict[str, Any]]]:
        """Every JSON log line so far with its timestamp (seconds since the epoch)."""
        out: list[tuple[float, dict[str, Any]]] = []
        with open(self.log, errors="replace") as text:
            for line in text:
                try:
                    record = json.loads(line)
                    when = datetime.fromisoformat(record["timestamp"]).timestamp()
                except (ValueError, KeyError, TypeError):
                    continue
                out.append((when, record))
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def _label(record: dict[str, Any]) -> str:
    if record.get("logger") != "watcher":
        return ""  # libvirtaio's timers, urllib3's requests: not steps of the job
    event = str(record.get("event", ""))
    if event == "reprovision step":
        return f"step {str(record.get('step', ''))[:60]}"
    if event == "writing volume" and "progress" in record:
        return ""  # progress lines: noise in the profile
    return event


def _state(dom: Any) -> int:
    return int(dom.state()[0])


def _write_policy(here: World, name: str, key: str) -> None:
    here.policies_dir.mkdir(parents=True, exist_ok=True)
    (here.policies_dir / "10-e2e.yaml").write_text(yaml.safe_dump({
        "images": {"boot": {"bucket": here.bucket, "key": key, "format": "qcow2"}},
        "domains": [{"match": name, "image": "boot", "start": True}]}))


def _tag(name: str) -> None:
    subprocess.run([*WATCHER, "reprovision", name, "--connect", URI], check=True,
                   capture_output=True, timeout=60)


def _plain_start(dom: Any) -> float:
    """The same domain destroyed and started directly: what libvirt, the hook and QEMU
    take for a start, with no daemon involved (the daemon sees the STOPPED event but the
    domain is not tagged, so it does nothing)."""
    dom.destroy()
    started = time.time()
    dom.create()
    while _state(dom) != libvirt.VIR_DOMAIN_RUNNING:
        time.sleep(POLL_SECONDS)
    return time.time() - started


def _hook_seconds(xml: str, name: str) -> float:
    """The installed qemu hook alone, run as libvirtd runs it before a start."""
    started = time.perf_counter()
    subprocess.run([HOOK, name, "prepare", "begin", "-"], input=xml.encode(),
                   capture_output=True, check=False, timeout=60)
    return time.perf_counter() - started


def _one_run(dom: Any, name: str, daemon: LoggedDaemon) -> dict[str, Any]:
    """Tag the running domain, destroy it, wait for it to run again; times and log lines."""
    _tag(name)
    time.sleep(1.0)  # a quiet second: the daemon has seen the tag (pending) and settled
    dom.destroy()
    t0 = time.time()
    deadline = t0 + 120
    while _state(dom) != libvirt.VIR_DOMAIN_RUNNING:
        if time.time() > deadline:
            raise RuntimeError(f"{name} was not running again within 120 s")
        time.sleep(POLL_SECONDS)
    t1 = time.time()
    # The lines up to the start are in the log by now; a little slack for the last flush.
    wait_for_sync(lambda: any(r.get("event") == "reprovision finished" and w >= t0
                              for w, r in daemon.records()), 30, interval=0.02,
                  what="the reprovision summary line")
    lines = [(w - t0, r) for w, r in daemon.records() if t0 - 0.05 <= w]
    write_start = next((w for w, r in lines if r.get("event") == "writing volume"
                        and "path" in r), None)
    if write_start is None:
        raise RuntimeError(f"no 'writing volume' line after the destroy: {lines[:10]}")
    write_end = next(w for w, r in lines if w >= write_start and r.get("event") in (
        "reprovision step", "reprovision finished", "domain started after reprovision"))
    summary = next(r for _, r in lines if r.get("event") == "reprovision finished")
    if summary.get("result") != "provisioned":
        raise RuntimeError(f"the reprovision did not succeed: {summary}")
    profile: dict[str, float] = {}
    for offset, record in lines:
        label = _label(record)
        if label and label not in profile and offset <= t1 - t0 + 0.05:
            profile[label] = offset
    return {"total": t1 - t0, "write": write_end - write_start,
            "overhead": t1 - t0 - (write_end - write_start), "profile": profile,
            "job_seconds": float(summary.get("seconds", 0.0))}


def bench(options: Options) -> list[Table]:
    os.umask(0o022)  # QEMU (libvirt-qemu) must reach the disk and console log
    with world(options.scratch, "e2e") as here:
        here.root.chmod(0o755)
        name = f"lvw-bench-e2e-{here.root.name.rsplit('-', 1)[1]}"
        key = "images/boot.qcow2"
        image = write_qcow2_image(here.root / "boot.qcow2", "lvw bench e2e", IMAGE_SIZE)
        disks = here.root / "disks"
        disks.mkdir(mode=0o755)
        volume = disks / f"{name}.img"
        with open(volume, "wb") as fh:
            fh.truncate(IMAGE_SIZE)
        here.write_config(here.root / "cache", volumes={"allow": [str(disks) + "/*"]})
        _write_policy(here, name, key)
        here.upload_with_sidecar(key, image)
        daemon = LoggedDaemon(here.config_path, here.root / "watcher.log")
        conn = libvirt.open(URI)
        dom = None
        try:
            wait_for_sync(lambda: any((here.root / "cache" / "objects").glob("*.json"))
                          or daemon.proc.poll() is not None, 120, interval=0.05,
                          what="the image pre-warmed")
            if daemon.proc.poll() is not None:
                raise RuntimeError(f"the daemon exited with {daemon.proc.returncode}; "
                                   f"see {daemon.log}")
            xml = domain_xml(name, str(volume), here.root / f"{name}.log")
            dom = conn.defineXML(xml)
            dom.create()  # the old content: an empty disk; QEMU runs all the same
            runs: list[dict[str, Any]] = []
            for index in range(options.runs + 1):  # the first run warms up, not counted
                print(f"  e2e: run {index}", flush=True)
                result = _one_run(dom, name, daemon)
                time.sleep(1.0)  # the daemon's job has ended (summary line) and settled
                result["plain_start"] = _plain_start(dom)
                result["hook"] = (_hook_seconds(xml, name) if os.path.exists(HOOK)
                                  else float("nan"))
                if index:
                    runs.append(result)
        finally:
            if dom is not None:
                try:
                    if dom.isActive():
                        dom.destroy()
                finally:
                    dom.undefine()
            conn.close()
            daemon.stop()
            kept = options.scratch / "e2e-watcher.log"
            if daemon.log.exists():
                kept.write_bytes(daemon.log.read_bytes())
    return [_table(runs, options)]


def _table(runs: list[dict[str, Any]], options: Options) -> Table:
    totals = [r["total"] for r in runs]
    writes = [r["write"] for r in runs]
    overheads = [r["overhead"] for r in runs]
    ok = median(overheads) <= TARGET_SECONDS
    table = Table(
        f"Reprovision end to end: STOPPED -> running again, `start: true` "
        f"(median of {options.runs}, min-max in brackets)",
        ["measure", "ms", "target", "verdict"])
    table.add("STOPPED -> running again",
              f"{median(totals) * 1000:.0f} [{_ms_spread(totals)}]", "", "")
    table.add(f"the write itself ({IMAGE_SIZE // MIB} MiB virtual qcow2, from the log)",
              f"{median(writes) * 1000:.0f} [{_ms_spread(writes)}]", "", "")
    table.add("STOPPED -> running again, minus the write",
              f"{median(overheads) * 1000:.0f} [{_ms_spread(overheads)}]",
              f"<= {TARGET_SECONDS * 1000:.0f} ms", verdict(ok))
    plain = [r["plain_start"] for r in runs]
    own = [r["overhead"] - r["plain_start"] for r in runs]
    hooks = [r["hook"] for r in runs]
    table.add("reference: `virDomainCreate` of the same domain -> running (no daemon)",
              f"{median(plain) * 1000:.0f} [{_ms_spread(plain)}]", "", "")
    table.add("  of which the installed qemu hook alone (run by hand, same arguments)",
              f"{median(hooks) * 1000:.0f} [{_ms_spread(hooks)}]", "", "")
    table.add("the daemon's own part: minus the write, minus the reference start",
              f"{median(own) * 1000:.0f} [{_ms_spread(own)}]", "", "")
    offsets: dict[str, list[float]] = defaultdict(list)
    order: dict[str, float] = {}
    for r in runs:
        for label, offset in r["profile"].items():
            offsets[label].append(offset)
    for label, values in offsets.items():
        order[label] = median(values)
    profile = ", ".join(f"+{order[label] * 1000:.0f} {label}"
                        for label in sorted(order, key=order.__getitem__))
    table.notes += [
        "t0: `virDomainDestroy` returned (libvirtd emits the STOPPED event before it "
        f"replies); t1: the first of `virDomainGetState` polls every {POLL_SECONDS * 1000:.0f}"
        " ms to see VIR_DOMAIN_RUNNING; the start goes through the installed libvirt "
        "qemu hook, as in production",
        "the write: the daemon's 'writing volume' log line to the next step's line "
        "(write marker, qemu-img convert, fsync)",
        "a warm-up run first, not counted; each run is tagged with "
        "`libvirt-volume-watcher reprovision` while the domain runs, then destroyed; in "
        "each round, after it, the reference start (destroy, then `virDomainCreate` "
        "directly, polled the same way)",
        f"profile, median ms after t0 of the daemon's own log lines (debug level): {profile}",
        f"the job's own logged seconds (reprovision finished): "
        f"{median([r['job_seconds'] for r in runs]):.2f}",
        "the daemon's log of the last run is kept as e2e-watcher.log in the scratch directory",
    ]
    return table


def _ms_spread(values: list[float]) -> str:
    return f"{min(values) * 1000:.0f}-{max(values) * 1000:.0f}"
