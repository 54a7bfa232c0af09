"""Writing a volume: the watcher's writer against the predecessor's command and raw ``dd``.

A reprovision is dominated by this write, so it has to beat what it replaces and stay
close to what the disk can take. Four commands write the same image onto the same
volume, interleaved, each from a cold page cache onto a volume in the same state:

- writer: ``watcher.adapters.qemu_img.write_image`` (its ``convert_argv`` plus fsync);
- predecessor: ``qemu-img convert -f qcow2 -O raw SRC DST``, untuned, plus fsync;
- predecessor, newest: ``qemu-img convert -f qcow2 -O raw -T none -t none SRC DST`` (its
  last release bypasses the page cache on both ends), plus fsync;
- reference: ``dd`` of the already-expanded raw image, ``bs=4M oflag=direct conv=fsync``.

Volumes: a loop block device (``losetup --direct-io=on`` on a file under the scratch
directory, so writes reach the disk once, as on an LV) and a file volume (a raw file, as
in a ``dir`` pool). Before every run the volume is overwritten end to end with non-zero
bytes and flushed: the state of a volume that held a VM, and the same for every command.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import mmap
import os
import random
import subprocess
import sys
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import (
    MIB,
    Options,
    Stopwatch,
    Table,
    drop_caches,
    loop_volume_group,
    lvm,
    median,
    run,
    spread,
    verdict,
)
from watcher.adapters.filesink import fsync_path
from watcher.adapters.qemu_img import convert_argv, write_image

REPO = Path(__file__).resolve().parent.parent
FILL_BYTE = 0x5A
"""What a volume holds before each run: non-zero, so nothing can pass it off as empty."""


@dataclass(frozen=True)
class Image:
    """One test image and the raw file it expands to (the ``dd`` reference's input)."""

    label: str
    qcow2: Path
    expanded: Path


def _pattern_block(index: int) -> bytes:
    """1 MiB that compresses well but is not zero: text that varies per block."""
    line = f"block {index:08d} of a benchmark image; compressible, never zero.\n".encode()
    return (line * (MIB // len(line) + 1))[:MIB]


def _random_block(index: int) -> bytes:
    """1 MiB of incompressible bytes, reproducible so cached images stay valid."""
    seed = hashlib.sha256(f"bench-{index}".encode()).digest()
    return hashlib.shake_256(seed).digest(MIB)


def prepare_images(options: Options, size: int) -> list[Image]:
    """Build (once per size; reused by later runs) the three images of the issue."""
    where = options.scratch / f"images-{size // MIB}M-v1"
    ready = where / "ready"
    data, sparse = where / "data.raw", where / "sparse.raw"
    a, b, c = where / "a-compressed.qcow2", where / "b-sparse.qcow2", where / "c-plain.qcow2"
    if not ready.exists():
        where.mkdir(parents=True, exist_ok=True)
        print(f"  preparing images in {where} (once)", flush=True)
        with open(data, "wb") as fh:
            for i in range(size // MIB):
                fh.write(_random_block(i) if i % 2 == 0 else _pattern_block(i))
        with open(sparse, "wb") as fh:
            fh.truncate(size)
            for i in range(0, size // MIB, 10):  # every tenth MiB: about 10% allocated
                fh.seek(i * MIB)
                fh.write(_random_block(i))
        run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-c", str(data), str(a)])
        run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(sparse), str(b)])
        run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(data), str(c)])
        ready.touch()
    return [
        Image("(a) compressed qcow2, half random", a, data),
        Image("(b) sparse qcow2, ~10% allocated", b, sparse),
        Image("(c) uncompressed qcow2, fully allocated", c, data),
    ]


def fill(target: Path, size: int) -> None:
    """Overwrite ``target`` end to end with non-zero bytes, bypassing the page cache."""
    block = mmap.mmap(-1, 4 * MIB)  # page-aligned, as O_DIRECT requires
    block.write(bytes([FILL_BYTE]) * len(block))
    fd = os.open(target, os.O_WRONLY | os.O_DIRECT | os.O_CREAT, 0o644)
    try:
        written = 0
        while written < size:
            written += os.write(fd, block)
        os.fsync(fd)
    finally:
        os.close(fd)
        block.close()


def write_with_watcher(image: Image, target: Path) -> None:
    asyncio.run(write_image(image.qcow2, "qcow2", target))


def write_like_predecessor(image: Image, target: Path) -> None:
    run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(image.qcow2), str(target)])
    fsync_path(target)


def write_like_newest_predecessor(image: Image, target: Path) -> None:
    run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", "-T", "none", "-t", "none",
         str(image.qcow2), str(target)])
    fsync_path(target)


def write_with_dd(image: Image, target: Path) -> None:
    run(["dd", f"if={image.expanded}", f"of={target}", "bs=4M", "oflag=direct",
         "conv=notrunc,fsync", "status=none"])


@contextmanager
def loop_device(backing: Path, size: int) -> Iterator[Path]:
    """A loop block device over ``backing``; always detached afterwards."""
    with open(backing, "wb") as fh:
        fh.truncate(size)
    device = Path(run(["losetup", "--find", "--show", "--direct-io=on", str(backing)]).strip())
    try:
        yield device
    finally:
        subprocess.run(["losetup", "--detach", str(device)], check=False)
        backing.unlink(missing_ok=True)


Command = Callable[[Image, Path], None]


def _measure(
    images: list[Image], target: Path, options: Options,
) -> dict[tuple[str, str], list[float]]:
    """Seconds per (command, key), key = image label, or the expanded file for ``dd``.

    Variants are interleaved within each round, in a shuffled order, so background load
    and the after-effects of one command hit all of them alike.
    """
    variants: list[tuple[str, str, Image, Command]] = []
    for image in images:
        variants.append(("writer", image.label, image, write_with_watcher))
        variants.append(("predecessor", image.label, image, write_like_predecessor))
        variants.append(("newest", image.label, image, write_like_newest_predecessor))
    for expanded in dict.fromkeys(image.expanded for image in images):
        image = next(i for i in images if i.expanded == expanded)
        variants.append(("dd", str(expanded), image, write_with_dd))
    times: dict[tuple[str, str], list[float]] = defaultdict(list)
    for round_number in range(options.runs):
        # A fresh order each round: a command that frees blocks (the predecessor punches
        # holes, which this disk discards in the background) must not always slow the same
        # successor.
        random.Random(round_number).shuffle(variants)
        for name, key, image, command in variants:
            fill(target, options.writer_size)
            drop_caches()
            with Stopwatch() as sw:
                command(image, target)
            times[(name, key)].append(sw.seconds)
    return times


def _check_written(image: Image, target: Path, size: int) -> None:
    """The writer really wrote the image: compare the volume with the source."""
    fill(target, size)
    write_with_watcher(image, target)
    run(["qemu-img", "compare", "-q", "-f", "qcow2", "-F", "raw", str(image.qcow2), str(target)])


def _add_rows(table: Table, volume_name: str, images: list[Image],
              times: dict[tuple[str, str], list[float]], size: int) -> None:
    """One row per image: the four commands' speeds, their ratios and the verdict."""
    for image in images:
        t_writer = median(times[("writer", image.label)])
        t_pred = median(times[("predecessor", image.label)])
        t_newest = median(times[("newest", image.label)])
        dd_times = times[("dd", str(image.expanded))]
        t_dd = median(dd_times)
        speedup = t_pred / t_writer
        vs_newest = t_newest / t_writer
        vs_dd = t_writer / t_dd
        if image.label.startswith("(b)"):
            target_text, ok = ">= 1.3x predecessor", speedup >= 1.3
        elif image.label.startswith("(c)"):
            target_text = ">= 1.0x predecessor, <= 1.2x dd time"
            ok = speedup >= 1.0 and vs_dd <= 1.2
        else:
            target_text, ok = ">= 1.0x predecessor", speedup >= 1.0
        target_text += ", >= 1.0x newest"
        ok = ok and vs_newest >= 1.0
        table.add(
            volume_name, image.label,
            f"{size / t_writer / 1e6:.0f} [{spread(times[('writer', image.label)])}]",
            f"{size / t_pred / 1e6:.0f} [{spread(times[('predecessor', image.label)])}]",
            f"{size / t_newest / 1e6:.0f} [{spread(times[('newest', image.label)])}]",
            f"{size / t_dd / 1e6:.0f} [{spread(dd_times)}]",
            f"{speedup:.2f}x", f"{vs_newest:.2f}x", f"{vs_dd:.2f}", target_text,
            verdict(ok),
        )


def _columns() -> list[str]:
    return ["volume", "image", "writer MB/s", "predecessor MB/s", "newest predecessor MB/s",
            "dd MB/s", "writer / predecessor (speed)", "writer / newest (speed)",
            "writer / dd (time)", "target", "verdict"]


def bench(options: Options) -> list[Table]:
    size = options.writer_size
    images = prepare_images(options, size)
    dropped = drop_caches()
    table = Table(
        f"Writing a volume: {size // MIB} MiB virtual, MB/s of virtual size "
        f"(median of {options.runs}, min-max seconds in brackets)", _columns())
    volumes: list[tuple[str, AbstractContextManager[Path]]] = [
        ("loop block device", loop_device(options.scratch / "volume-loop.img", size)),
        ("file volume", _file_volume(options.scratch / "volume-file.raw")),
    ]
    for volume_name, volume in volumes:
        with volume as target:
            print(f"  writer: {volume_name} {target}", flush=True)
            for image in images:
                _check_written(image, target, size)
            _add_rows(table, volume_name, images, _measure(images, target, options), size)
    sample = convert_argv(Path("SRC"), "qcow2", Path("DST"), target_is_block=True, direct_io=True)
    table.notes += [
        "writer argv on a block device: `" + " ".join(sample) + "` (then fsync); on a file "
        "volume `file.driver=file`",
        "predecessor: `qemu-img convert -f qcow2 -O raw SRC DST` (then fsync; on a file volume "
        "it re-creates the file, as the predecessor did)",
        "newest predecessor: `qemu-img convert -f qcow2 -O raw -T none -t none SRC DST` "
        "(then fsync; O_DIRECT on source and target)",
        "reference: `dd if=EXPANDED.raw of=DST bs=4M oflag=direct conv=notrunc,fsync`; (a) and "
        "(c) expand to the same bytes, so they share one reference measurement",
        "before every run: volume overwritten with 0x5A bytes (O_DIRECT, fsync), then "
        + ("page cache dropped (`echo 3 > /proc/sys/vm/drop_caches`)" if dropped
           else "page cache NOT dropped (not root)"),
        "loop device: `losetup --direct-io=on` on a file in the scratch directory",
        "each image was checked once per volume with `qemu-img compare` after a writer run",
    ]
    try:
        guest_table = _guest_table(options)
    except RuntimeError as failed:  # the host's table stands on its own
        guest_table = Table("Writing a volume inside the UML guest: failed", ["error"])
        guest_table.add(str(failed).replace("\n", " ")[-1500:])
    return [table, guest_table]


@contextmanager
def _file_volume(path: Path) -> Iterator[Path]:
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


# ---- inside the User-Mode Linux guest: a thick and a thin LV --------------------------------


def guest_size(options: Options) -> int:
    """Virtual bytes of the images in the guest: half the host's (every byte is slower
    there, and each run rewrites the volume first), at least 128 MiB."""
    return max(options.writer_size // 2, 128 * MIB)


def _guest_table(options: Options) -> Table:
    """Run the guest half in UML (``scripts/uml-run``, as the clone benchmark does)."""
    size = guest_size(options)
    images = prepare_images(options, size)
    job = {"scratch": str(options.scratch), "runs": options.runs, "mib": size // MIB,
           "quick": options.quick}
    done = subprocess.run(
        [str(REPO / "scripts" / "uml-run"), "-t", "3000", "-m", "1G", "-w",
         str(options.scratch), "--", sys.executable, "-m", "bench.writer", json.dumps(job)],
        cwd=REPO, capture_output=True, text=True, check=False,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or len(results) != 2:
        raise RuntimeError(f"the guest half failed (exit {done.returncode}): "
                           f"{done.stderr.strip()[-2000:]}")
    table = Table(
        f"Writing a volume inside the UML guest (real device-mapper): {size // MIB} MiB "
        f"virtual, MB/s (median of {options.runs}, min-max seconds in brackets)", _columns())
    for result in results:
        times = {(name, key): values for name, key, values in result["times"]}
        _add_rows(table, result["volume"], images, times, size)
    table.notes += [
        "the same four commands, images and procedure as on the host, on LVs of a VG on a "
        "loop device (over a sparse file in the scratch directory) inside a User-Mode Linux "
        "guest; the guest's page cache is dropped before every run",
        "the images are read from ext4 on a third LV of the same VG (copied there first): "
        "a cache directory sits on a local block-backed filesystem, which the guest's hostfs "
        "(where it sees the host's files) is not; the images and the LVs share one PV",
        "thick LV: `lvcreate --size`; thin LV: `lvcreate --virtualsize` in a thin pool 64 MiB "
        "bigger than the LV (the fill before each run provisions every block of it)",
        f"images of {size // MIB} MiB, half the host's: every write in the guest is slower "
        "and each run first rewrites the whole volume",
    ]
    return table


def _images_in_guest(images: list[Image], where: Path) -> list[Image]:
    """The images copied onto ``where`` (ext4 on an LV of the guest): a cache directory
    sits on a local block-backed filesystem, which the guest's hostfs is not."""
    copies: dict[Path, Path] = {}
    for path in dict.fromkeys(p for image in images for p in (image.qcow2, image.expanded)):
        copies[path] = where / path.name
        lvm("cp", "--sparse=always", str(path), str(copies[path]))
    return [Image(i.label, copies[i.qcow2], copies[i.expanded]) for i in images]


def guest(job: dict[str, Any]) -> None:
    """Inside UML: one VG, a thick LV and a thin LV; one JSON line of times per LV."""
    size = int(job["mib"]) * MIB
    options = Options(quick=bool(job["quick"]), runs=int(job["runs"]),
                      scratch=Path(job["scratch"]), writer_mib=int(job["mib"]))
    on_host = prepare_images(options, size)
    images_bytes = sum(p.stat().st_blocks * 512 for p in dict.fromkeys(
        p for image in on_host for p in (image.qcow2, image.expanded)))
    images_mib = images_bytes // MIB + 128
    tag = uuid.uuid4().hex[:8]
    mountpoint = options.scratch / f"writer-images-{tag}"
    vg = f"lvwwriter_{tag}"
    mounted = False
    with loop_volume_group(options.scratch / f"writer-pv-{tag}.img",
                           2 * size + images_mib * MIB + 512 * MIB, vg):
        try:
            lvm("lvcreate", "--yes", "--quiet", "--name", "images", "--size", f"{images_mib}m", vg)
            lvm("mkfs.ext4", "-q", "-E", "nodiscard", f"/dev/{vg}/images")
            mountpoint.mkdir()
            lvm("mount", f"/dev/{vg}/images", str(mountpoint))
            mounted = True
            images = _images_in_guest(on_host, mountpoint)
            lvm("lvcreate", "--yes", "--quiet", "--name", "thick", "--size", f"{size // MIB}m", vg)
            lvm("lvcreate", "--yes", "--quiet", "--type", "thin-pool", "--name", "pool",
                "--size", f"{size // MIB + 64}m", vg)
            lvm("lvcreate", "--yes", "--quiet", "--name", "thin", "--virtualsize",
                f"{size // MIB}m", "--thinpool", "pool", vg)
            for volume_name, lv in (("thick LV", "thick"), ("thin LV", "thin")):
                target = Path(f"/dev/{vg}/{lv}")
                print(f"  guest: {volume_name} {target}", file=sys.stderr, flush=True)
                for image in images:
                    _check_written(image, target, size)
                times = _measure(images, target, options)
                # Keyed by the host's paths, which the host side tabulates by.
                by_host = {str(i.expanded): str(h.expanded)
                           for i, h in zip(images, on_host, strict=True)}
                print(json.dumps({"volume": volume_name, "times": [
                    [name, by_host.get(key, key), values]
                    for (name, key), values in times.items()]}), flush=True)
        finally:
            if mounted:
                subprocess.run(["umount", str(mountpoint)], capture_output=True, check=False)
            with contextlib.suppress(OSError):
                mountpoint.rmdir()


if __name__ == "__main__":
    guest(json.loads(sys.argv[1]))
