"""What every benchmark shares: options, repeated timing, cache dropping, result tables.

A benchmark here is judged by ratios measured side by side in one run (median of at
least five runs per variant, variants interleaved so background load hits all alike),
and every table carries a PASS/MISS verdict against the target the issue set.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import shutil
import statistics
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

S3_ENDPOINT = os.environ.get("LVW_S3_ENDPOINT", "http://127.0.0.1:8333")
S3_ACCESS_KEY = os.environ.get("LVW_S3_ACCESS_KEY", "watcher")
S3_SECRET_KEY = os.environ.get("LVW_S3_SECRET_KEY", "watcher-secret")
AMQP_URL = os.environ.get("LVW_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
MIB = 1024 * 1024


@dataclass(frozen=True)
class Options:
    """How big and how often: the full suite or its ``--quick`` cut."""

    quick: bool
    runs: int
    """Timed runs per variant; the median is reported."""
    scratch: Path
    """Directory for images and volumes; must sit on a real disk (not tmpfs)."""
    writer_mib: int = 0
    """Virtual MiB of the writer's images; 0 = 256 (quick) or 512 (full)."""

    @property
    def image_size(self) -> int:
        """Virtual bytes of the images the writer and pre-warm benchmarks use."""
        return 256 * MIB if self.quick else 1024 * MIB

    @property
    def writer_size(self) -> int:
        """Virtual bytes of the writer's images: every run rewrites the whole volume first,
        so 1 GiB would take the writer alone past ten minutes on a busy 2-core machine."""
        if self.writer_mib:
            return self.writer_mib * MIB
        return 256 * MIB if self.quick else 512 * MIB


@dataclass
class Table:
    """One result table, printed to the terminal and written as Markdown."""

    title: str
    columns: Sequence[str]
    rows: list[Sequence[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *cells: object) -> None:
        self.rows.append([str(c) for c in cells])

    def markdown(self) -> str:
        lines = [f"### {self.title}", "",
                 "| " + " | ".join(self.columns) + " |",
                 "|" + "|".join("---" for _ in self.columns) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        if self.notes:
            lines.append("")
            lines += [f"- {note}" for note in self.notes]
        return "\n".join(lines) + "\n"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (``fraction`` in 0..1) of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(1, round(fraction * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def spread(values: Sequence[float]) -> str:
    """Min-max of the runs, to show how noisy a median is."""
    return f"{min(values):.2f}-{max(values):.2f}"


def drop_caches() -> bool:
    """Flush dirty pages and drop the page cache; False when not allowed (not root)."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3\n")
    except OSError:
        return False
    return True


class Stopwatch:
    """``with Stopwatch() as sw: ...`` then ``sw.seconds``."""

    seconds: float = 0.0

    def __enter__(self) -> Stopwatch:
        self._start = time.perf_counter()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.seconds = time.perf_counter() - self._start


def run(argv: Sequence[str], *, quiet: bool = True) -> str:
    """Run a command, fail loudly, return its stdout."""
    result = subprocess.run(list(argv), check=False, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {result.returncode}: {result.stderr.strip()}")
    if not quiet:
        print(result.stdout, end="")
    return result.stdout


def _first_line(argv: Sequence[str]) -> str:
    try:
        return run(argv).splitlines()[0].strip()
    except (OSError, RuntimeError, IndexError):
        return "unknown"


def machine_description(scratch: Path) -> list[str]:
    """Facts about this machine that explain the numbers, one line each."""
    mem_kib = 0
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    cpu = "unknown"
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    device = _first_line(["findmnt", "-n", "-o", "SOURCE,FSTYPE,OPTIONS", "--target", str(scratch)])
    disk = device
    match = re.match(r"/dev/([a-z]+)", device)
    if match:
        queue = Path("/sys/block") / match[1] / "queue"
        try:
            rotational = (queue / "rotational").read_text().strip()
            scheduler = (queue / "scheduler").read_text().strip()
            disk += f" (rotational={rotational}, scheduler {scheduler})"
        except OSError:
            pass
    free = shutil.disk_usage(scratch)
    return [
        f"nproc: {os.cpu_count()} ({cpu})",
        f"memory: {mem_kib / 1024 / 1024:.1f} GiB",
        f"disk under {scratch}: {disk}, {free.free / 1024**3:.0f} GiB free",
        f"kernel: {platform.release()}",
        f"qemu-img: {_first_line(['qemu-img', '--version'])}",
        f"python: {platform.python_version()}",
    ]


def lvm(*argv: str) -> str:
    """An LVM (or other system) command inside the UML guest; its stdout, or it raises."""
    env = {**os.environ, "LC_ALL": "C", "LVM_SUPPRESS_FD_WARNINGS": "1"}
    return subprocess.run(argv, check=True, capture_output=True, text=True, env=env).stdout


@contextlib.contextmanager
def loop_volume_group(backing: Path, size: int, vg: str) -> Iterator[str]:
    """A volume group ``vg`` on a loop device over a sparse ``backing`` file of ``size``
    bytes, for benchmarks inside the UML guest; yields the loop device. Removed, with the
    file, afterwards."""
    with backing.open("wb") as handle:
        handle.truncate(size)
    loop = lvm("losetup", "--find", "--show", str(backing)).strip()
    try:
        lvm("pvcreate", "--yes", "--quiet", loop)
        lvm("vgcreate", "--yes", "--quiet", vg, loop)
        yield loop
    finally:
        subprocess.run(["vgremove", "--yes", "--force", "--quiet", vg], capture_output=True,
                       check=False)
        subprocess.run(["pvremove", "--yes", "--quiet", loop], capture_output=True, check=False)
        subprocess.run(["losetup", "--detach", loop], capture_output=True, check=False)
        backing.unlink(missing_ok=True)
