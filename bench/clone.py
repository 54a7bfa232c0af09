"""Thin clone against a full write of the same image on the same thin pool, inside UML.

Why it exists: the clone path's promise is a reprovision whose cost does not grow with the
image. This measures, at 1, 4 and 16 GiB virtual (10% data; ``--quick``: 256 MiB, 1 and
4 GiB), the job's LV steps for each path on real device-mapper in a User-Mode Linux guest
(``scripts/uml-run``), interleaved run by run:

- full write: look up the LV, ``blkdiscard``, write the image sparse (``--target-is-zero``);
- clone: look up the LV (with the interrupted-swap check and the golden lookup in the
  same ``lvs``), rename the old LV away, create the thin snapshot under its name: the new
  LV is in place, where the job records ``provisioned`` and starts the domain. The old
  LV's removal, which the job does after that, and the golden, made once beforehand as
  pre-warming does, are reported apart.

Every LVM command in the guest is slow (hundreds of milliseconds), so their own time is
reported apart, and from it the ratio a host would see where an LVM command takes
``HOST_LVM_SECONDS``.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import MIB, Options, Table, loop_volume_group, lvm, median, spread, verdict

GIB = 1024 * MIB
HOST_LVM_SECONDS = 0.05
"""What one LVM command takes on an ordinary host (an assumption stated in the table)."""
FLAT_TARGET = 1.25
"""The clone at the largest size within this factor of the smallest."""
SPEEDUP_TARGET = 5.0
"""The clone at least this many times faster than the full write at the largest size."""
DATA_FRACTION = 0.10
REPO = Path(__file__).resolve().parent.parent


def sizes(options: Options) -> list[int]:
    return [256 * MIB, GIB, 4 * GIB] if options.quick else [GIB, 4 * GIB, 16 * GIB]


def make_image(directory: Path, virtual_size: int) -> Path:
    """A qcow2 of ``virtual_size`` with 10% random data in ten evenly spread extents."""
    image = directory / f"clone-{virtual_size // MIB}m.qcow2"
    if image.exists():
        return image
    raw = directory / f"clone-{virtual_size // MIB}m.raw"
    chunk = int(virtual_size * DATA_FRACTION / 10) // MIB * MIB
    with raw.open("wb") as handle:
        handle.truncate(virtual_size)
        for index in range(10):
            handle.seek(index * (virtual_size // 10))
            for _ in range(chunk // (4 * MIB)):
                handle.write(os.urandom(4 * MIB))
            handle.write(os.urandom(chunk % (4 * MIB)))
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(image)],
                   check=True, capture_output=True)
    raw.unlink()
    return image


def bench(options: Options) -> list[Table]:
    """Build the images here, run the guest half inside UML, tabulate its JSON lines."""
    directory = options.scratch / "clone"
    directory.mkdir(parents=True, exist_ok=True)
    images = {size: make_image(directory, size) for size in sizes(options)}
    job = {"scratch": str(directory), "runs": options.runs,
           "images": {str(size): str(path) for size, path in images.items()}}
    done = subprocess.run(
        [str(REPO / "scripts" / "uml-run"), "-t", "3600", "-m", "1G", "-w", str(directory),
         "--", sys.executable, "-m", "bench.clone", json.dumps(job)],
        cwd=REPO, capture_output=True, text=True, check=False,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not results:
        raise RuntimeError(f"the guest half failed (exit {done.returncode}): "
                           f"{done.stderr.strip()[-2000:]}")
    return tables(results)


def tables(results: list[dict[str, Any]]) -> list[Table]:
    table = Table("Thin clone vs full write on one thin pool (UML guest, real dm-thin)", [
        "virtual", "data", "golden write (once) s", "full write s", "clone s",
        "clone LVM commands", "clone LVM s", "then old LV removal s", "full / clone",
        "full / clone on a host"])
    by_size = sorted(results, key=lambda r: r["size"])
    for row in by_size:
        full, clone = median(row["full"]), median(row["clone"])
        table.add(f"{row['size'] // MIB} MiB", f"{row['data'] // MIB} MiB",
                  f"{row['golden']:.2f}", f"{full:.2f} ({spread(row['full'])})",
                  f"{clone:.2f} ({spread(row['clone'])})", row["clone_commands"],
                  f"{median(row['clone_lvm']):.2f}", f"{median(row['removal']):.2f}",
                  f"{full / clone:.1f}",
                  f"{host_seconds(row, 'full') / host_seconds(row, 'clone'):.1f}")
    for row in by_size:
        profile = row.get("profile", [])
        if profile:
            parts = ", ".join(
                f"{command} {median([p.get(command, 0.0) for p in profile]):.2f} s"
                for command in sorted(profile[0]))
            table.notes.append(f"clone at {row['size'] // MIB} MiB, median per command: {parts}")
    small, large = by_size[0], by_size[-1]
    flat = median(large["clone"]) / median(small["clone"])
    speedup = median(large["full"]) / median(large["clone"])
    table.notes += [
        f"clone at {large['size'] // MIB} MiB / at {small['size'] // MIB} MiB: {flat:.2f} "
        f"(target <= {FLAT_TARGET}): {verdict(flat <= FLAT_TARGET)}",
        f"full write / clone at {large['size'] // MIB} MiB: {speedup:.1f} "
        f"(target >= {SPEEDUP_TARGET}): {verdict(speedup >= SPEEDUP_TARGET)}",
        "medians of the runs (min-max in brackets); the golden is written once per image and "
        "pool, at pre-warm time, so no reprovision waits for it",
        f"'on a host': each run's time with its LVM commands' own time replaced by "
        f"{HOST_LVM_SECONDS * 1000:.0f} ms per command (an ordinary host's LVM latency, "
        "assumed; inside the guest every LVM command costs hundreds of ms)",
    ]
    return [table]


def host_seconds(row: dict[str, Any], kind: str) -> float:
    commands = int(row[f"{kind}_commands"])
    return (median(row[kind]) - median(row[f"{kind}_lvm"])) + commands * HOST_LVM_SECONDS


# ---- the guest half ------------------------------------------------------------------------


class LvmClock:
    """Wraps the LVM adapter's command runner: time spent in LVM commands, and how many."""

    def __init__(self) -> None:
        from watcher.adapters.lvm import report

        self.seconds = 0.0
        self.commands: Counter[str] = Counter()
        self.by_command: dict[str, float] = {}
        original = report.run

        async def timed(argv: Sequence[str]) -> str:
            started = time.perf_counter()
            try:
                return await original(argv)
            finally:
                if argv[0] != "blkdiscard":  # not an LVM command: a write of its own
                    self.seconds += time.perf_counter() - started
                    self.commands[argv[0]] += 1
                    self.by_command[argv[0]] = (self.by_command.get(argv[0], 0.0)
                                                + time.perf_counter() - started)

        report.run = timed  # every LVM command starts in report.run

    def reset(self) -> None:
        self.seconds = 0.0
        self.commands.clear()
        self.by_command.clear()


async def measure(clock: LvmClock, vg: str, size: int, image: Path,
                  runs: int) -> dict[str, Any]:
    """The golden once, then ``runs`` interleaved full writes and clones at ``size``."""
    from watcher.adapters import lvm
    from watcher.adapters.qemu_img import write_image
    from watcher.core.lvm_rules import carried_tags
    from watcher.core.plan import TargetFacts
    from watcher.reprovision.facts import clone_facts

    digest = f"{size:064x}"

    async def write(path: str) -> None:
        await write_image(image, "qcow2", Path(path), target_is_zero=True)

    started = time.perf_counter()
    await lvm.create_golden(vg, "pool", digest, size, write)
    row: dict[str, Any] = {"size": size, "data": int(size * DATA_FRACTION),
                           "golden": time.perf_counter() - started, "full": [], "clone": [],
                           "full_lvm": [], "clone_lvm": [], "removal": [],
                           "profile": []}
    for run in range(runs + 1):  # the first round warms up (LVM's and qemu-img's caches)
        if run == 1:
            for series in ("full", "clone", "full_lvm", "clone_lvm", "removal", "profile"):
                row[series].clear()
        clock.reset()
        started = time.perf_counter()
        info = await lvm.lv_at(await asyncio.to_thread(os.path.realpath, f"/dev/{vg}/full"))
        assert info is not None
        await lvm.discard(info.path)
        await write_image(image, "qcow2", Path(info.path), target_is_zero=True)
        row["full"].append(time.perf_counter() - started)
        row["full_lvm"].append(clock.seconds)
        row["full_commands"] = sum(clock.commands.values())

        # What the full write left to the pool (its metadata commit, discards passed down to
        # the loop device) is flushed first, not billed to the clone's first command.
        await asyncio.to_thread(os.sync)
        clock.reset()
        started = time.perf_counter()
        path = f"/dev/{vg}/root"
        real = await asyncio.to_thread(os.path.realpath, path)
        info, neighbours = await lvm.lv_with_neighbours(real)
        target = clone_facts(TargetFacts(path, real, None, info), neighbours, digest, clone=True)
        golden = target.golden
        assert info is not None and golden is not None and target.swap is None
        async with lvm.swapping_in(vg, "root") as swap:
            await swap.rename_old()
            await swap.clone(golden.name, carried_tags(info.tags))
            if info.size > golden.size:
                await swap.grow(info.size)
            in_place = time.perf_counter()  # the job records provisioned (and starts) here
            row["clone"].append(in_place - started)
            row["clone_lvm"].append(clock.seconds)
            row["clone_commands"] = sum(clock.commands.values())
            row["profile"].append(dict(clock.by_command))
        row["removal"].append(time.perf_counter() - in_place)
    return row


def guest(job: dict[str, Any]) -> None:
    """Inside UML: a VG with one thin pool on a loop device; one JSON line per size."""
    from watcher.core.lvm_rules import golden_name

    clock = LvmClock()
    scratch = Path(job["scratch"])
    images = {int(size): Path(path) for size, path in job["images"].items()}
    pool_size = int(max(images) * DATA_FRACTION * 2.5) + 512 * MIB
    vg = f"lvwbench_{uuid.uuid4().hex[:8]}"
    with loop_volume_group(scratch / "pv.img", pool_size + 1024 * MIB, vg):
        lvm("lvcreate", "--yes", "--quiet", "--type", "thin-pool", "--name", "pool",
           "--size", f"{pool_size // MIB}m", vg)
        for size, image in sorted(images.items()):
            for name in ("root", "full"):
                lvm("lvcreate", "--yes", "--quiet", "--name", name, "--virtualsize",
                   f"{size // MIB}m", "--thinpool", "pool", vg)
            print(json.dumps(asyncio.run(measure(clock, vg, size, image, job["runs"]))),
                  flush=True)
            for name in ("root", "full", golden_name(f"{size:064x}", "pool")):
                lvm("lvremove", "--yes", "--quiet", f"{vg}/{name}")

if __name__ == "__main__":
    guest(json.loads(sys.argv[1]))
