"""The LVM edge: recognise a root disk as a logical volume, grow it, discard it, protect it.

Why it exists: most operators point a domain's disk straight at ``/dev/VG/LV``, often with
no libvirt pool, so the reprovision job needs LVM's own view of the device before it
writes. The LVM suite (inside a User-Mode Linux guest, where device-mapper exists) runs
exactly these functions.

A reprovision overwrites a VM's root LV, so before writing the watcher must know what
the block device really is (an LV? a snapshot? a thin pool? open by someone?), may have
to grow it to the image's size, frees a thin LV's blocks before a sparse write, and
keeps a snapshot while writing so a failed write can be undone instead of leaving a
half-written disk. Every command runs from an argv list with ``LC_ALL=C``; reports are
read as ``lvs --reportformat json`` in bytes, never as text meant for people. Nothing
is logged here: the caller logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import stat
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from watcher.core.errors import PermanentError
from watcher.core.lvm_rules import (
    PARTIAL_SUFFIX,
    LvInfo,
    SwapLeftover,
    cow_snapshot_size,
    digest_tag,
    golden_name,
    golden_tags,
    prev_name,
    refusal_reason,
    swap_leftover,
)

__all__ = [
    "CloneSwap",
    "LvInfo",
    "LvRefused",
    "LvmError",
    "clone_lv",
    "create_golden",
    "create_lv",
    "discard",
    "extend",
    "find_golden",
    "goldens",
    "grow",
    "guarded_write",
    "lv_at",
    "lv_for_device",
    "lv_info",
    "recognise",
    "refusal_reason",
    "remove_lv",
    "rename_lv",
    "rollback_snapshot",
    "swap_state",
    "swapping_in",
    "vg_exists",
]

ROLLBACK_SUFFIX = "-vw-rollback"
"""Appended to an LV's name to name the snapshot that guards a write to it."""

MERGE_TIMEOUT = 3600.0
"""Seconds to wait for a rollback merge; it copies back only the blocks the write changed."""

_STDERR_KEEP = 16 * 1024

_REPORT_FIELDS = (
    "vg_name", "lv_name", "lv_path", "lv_dm_path", "lv_size", "lv_attr", "lv_device_open",
    "lv_role", "lv_merging", "segtype", "pool_lv", "origin", "vg_extent_size", "data_percent",
    "lv_kernel_major", "lv_kernel_minor", "lv_tags", "lv_skip_activation",
)


class LvmError(PermanentError):
    """An LVM (or blkdiscard) command failed; says which, how, and what it printed."""

    def __init__(self, argv: Sequence[str], exit_code: int | None, stderr: str) -> None:
        lines = [line.strip() for line in stderr.splitlines() if line.strip()]
        detail = lines[-1] if lines else "no error output"
        super().__init__(f"{' '.join(argv)} failed (exit {exit_code}): {detail}")
        self.argv = list(argv)
        self.exit_code = exit_code
        self.stderr = stderr


class LvRefused(PermanentError):
    """The LV must not be written; the message is the ``failed`` reason."""


def _env() -> dict[str, str]:
    # LVM_SUPPRESS_FD_WARNINGS: an inherited descriptor is not worth a line in stderr.
    return {**os.environ, "LC_ALL": "C", "LVM_SUPPRESS_FD_WARNINGS": "1"}


async def _run(argv: Sequence[str]) -> str:
    """Run ``argv`` to completion and return its stdout; raise ``LvmError`` on failure.

    A cancelled caller still waits for the command to finish: LVM commands update
    metadata and device-mapper tables, and killing one halfway leaves worse state than
    letting it complete.
    """
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=_env(),
        )
    except OSError as exc:
        raise LvmError(argv, None, str(exc)) from exc
    communicate = asyncio.ensure_future(proc.communicate())
    try:
        stdout, stderr = await asyncio.shield(communicate)
    except asyncio.CancelledError:
        await asyncio.wait([communicate])
        raise
    if proc.returncode != 0:
        raise LvmError(argv, proc.returncode, stderr.decode("utf-8", "replace")[-_STDERR_KEEP:])
    return stdout.decode("utf-8", "replace")


@dataclass(frozen=True)
class _Row:
    """One ``lvs`` row: the public facts plus what is needed to match a device to it."""

    info: LvInfo
    kernel_device: tuple[int, int] | None
    paths: tuple[str, ...]


def _percent(value: str) -> float | None:
    return float(value) if value.strip() else None


def _parse_row(row: dict[str, Any]) -> _Row:
    lv = str(row["lv_name"]).strip("[]")
    dm_path = str(row["lv_dm_path"])
    roles = set(str(row["lv_role"]).split(","))
    segtype = str(row["segtype"])
    major, minor = int(row["lv_kernel_major"]), int(row["lv_kernel_minor"])
    info = LvInfo(
        vg=str(row["vg_name"]),
        lv=lv,
        path=str(row["lv_path"]) or dm_path,
        size=int(row["lv_size"]),
        # The fifth lv_attr character is the state; "a" is the only one fit for I/O.
        active=len(row["lv_attr"]) > 4 and row["lv_attr"][4] == "a",
        device_open=row["lv_device_open"] == "1",
        is_snapshot="snapshot" in roles,
        is_thin_pool=segtype == "thin-pool",
        is_thin=segtype == "thin",
        pool=str(row["pool_lv"]) or None,
        extent_size=int(row["vg_extent_size"]),
        data_percent=_percent(str(row["data_percent"])),
        origin=str(row["origin"]) or None,
        internal="private" in roles,
        merging=row["lv_merging"] == "1",
        tags=tuple(t for t in str(row.get("lv_tags", "")).split(",") if t),
        activation_skip=str(row.get("lv_skip_activation", "")) in ("1", "skip activation"),
    )
    paths = tuple(p for p in (str(row["lv_path"]), dm_path) if p)
    return _Row(info, (major, minor) if major >= 0 else None, paths)


async def _report(selector: str | None = None) -> list[_Row]:
    """``lvs`` for every LV (hidden ones included), or for one ``VG`` or ``VG/LV``."""
    argv = [
        "lvs", "--all", "--reportformat", "json", "--units", "b", "--nosuffix", "--binary",
        "--options", ",".join(_REPORT_FIELDS),
    ]
    if selector is not None:
        argv.append(selector)
    output = await _run(argv)
    try:
        reports = json.loads(output)["report"]
        rows = [_parse_row(row) for report in reports for row in report.get("lv", [])]
    except (ValueError, KeyError, TypeError) as exc:
        raise LvmError(argv, 0, f"unexpected lvs output: {exc}") from exc
    goldens = {(r.info.vg, r.info.lv) for r in rows if r.info.is_golden}
    return [replace(r, info=replace(r.info, origin_is_golden=True))
            if r.info.origin is not None and (r.info.vg, r.info.origin) in goldens else r
            for r in rows]


async def lv_info(name: str) -> LvInfo:
    """The current state of the LV ``VG/LV``; ``LvmError`` when it does not exist."""
    vg, _, lv = name.partition("/")
    for row in await _report(vg):
        if row.info.lv == lv:
            return row.info
    raise LvmError(["lvs", name], 5, f"Failed to find logical volume \"{name}\"")


def _dm_device(path: str) -> tuple[str, tuple[int, int] | None]:
    """``path`` with symlinks resolved, and its (major, minor) if it is a device-mapper
    block device (every LV is one), else None."""
    real = os.path.realpath(path)
    st = os.stat(real)
    if not stat.S_ISBLK(st.st_mode):
        return real, None
    with open("/proc/devices", encoding="ascii") as devices:
        block_section = devices.read().partition("Block devices:")[2]
    dm_majors = {
        int(fields[0]) for fields in (line.split() for line in block_section.splitlines())
        if len(fields) == 2 and fields[1] == "device-mapper"
    }
    major = os.major(st.st_rdev)
    return real, ((major, os.minor(st.st_rdev)) if major in dm_majors else None)


def _match_by_path(real: str, rows: list[_Row]) -> LvInfo | None:
    for row in rows:
        if real in row.paths or real in (os.path.realpath(p) for p in row.paths):
            return row.info
    return None


async def lv_for_device(path: str) -> LvInfo | None:
    """The LV behind ``path`` (``/dev/VG/LV``, ``/dev/mapper/VG-LV``, ``/dev/dm-N``, or a
    symlink to one), or None when ``path`` is not a logical volume.

    Matches the device's major:minor against the kernel devices of every LV, then falls
    back to LVM's own paths (a thin pool's public node is not its kernel device).
    Raises ``FileNotFoundError`` when ``path`` does not exist.
    """
    real, device = await asyncio.to_thread(_dm_device, path)
    if device is None:
        return None
    rows = await _report()
    for row in rows:
        if row.kernel_device == device:
            return row.info
    return await asyncio.to_thread(_match_by_path, real, rows)


def _is_block_device(path: str) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


async def lv_at(real_path: str) -> LvInfo | None:
    """The LV at ``real_path``, or None when it is not a block device or not an LV."""
    if not await asyncio.to_thread(_is_block_device, real_path):
        return None
    return await lv_for_device(real_path)


async def lv_with_neighbours(real_path: str) -> tuple[LvInfo | None, list[LvInfo]]:
    """``lv_at``, and every LV of its VG, from the same single ``lvs`` run."""
    if not await asyncio.to_thread(_is_block_device, real_path):
        return None, []
    real, device = await asyncio.to_thread(_dm_device, real_path)
    if device is None:
        return None, []
    rows = await _report()
    found = next((row.info for row in rows if row.kernel_device == device), None)
    if found is None:
        found = await asyncio.to_thread(_match_by_path, real, rows)
    if found is None:
        return None, []
    return found, [row.info for row in rows if row.info.vg == found.vg]


async def vg_lvs(vg: str) -> list[LvInfo]:
    """Every LV of ``vg``; ``LvmError`` when there is no such VG."""
    return [row.info for row in await _report(vg)]


async def recognise(real_path: str) -> LvInfo | None:
    """The LV at ``real_path`` (None when it is not a block device or not an LV).

    Raises ``LvRefused`` when the LV exists but must not be written.
    """
    info = await lv_at(real_path)
    if info is None:
        return None
    reason = refusal_reason(info)
    if reason is not None:
        raise LvRefused(reason)
    return info


async def extend(info: LvInfo, min_size: int) -> LvInfo:
    """Grow ``info``'s LV to at least ``min_size`` bytes (rounded up to whole extents).

    Never shrinks: an LV already that big is returned unchanged. Returns the LV's state
    after the change.
    """
    current = await lv_info(info.name)
    if current.size >= min_size:
        return current
    target = math.ceil(min_size / current.extent_size) * current.extent_size
    await _run(["lvextend", "--size", f"{target}b", current.name])
    return await lv_info(info.name)


async def grow(info: LvInfo, min_size: int) -> LvInfo:
    """``extend``, refusing with ``LvRefused`` when the LV did not reach ``min_size``."""
    grown = await extend(info, min_size)
    if grown.size < min_size:
        raise LvRefused(f"growing {info.name} to {min_size} bytes left {grown.size}")
    return grown


async def discard(path: str) -> None:
    """Discard every block of the device at ``path``.

    On a thin LV this returns the blocks to the pool, so a following write of a sparse
    image with ``--target-is-zero`` allocates only what the image holds. blkdiscard
    opens the device exclusively: it fails rather than discard a mounted device.
    """
    await _run(["blkdiscard", path])


async def _merge_back(origin: LvInfo, snapshot: LvInfo, timeout: float) -> None:
    """Merge ``snapshot`` into ``origin`` and wait until the merge has completed.

    ``lvconvert --merge`` merges at once and waits when the origin is closed. When it is
    still open (a writer not yet gone), LVM delays the merge to the origin's next
    activation: once the origin is closed, it is reactivated so the merge runs now.
    """
    await _run(["lvconvert", "--merge", "--interval", "1", snapshot.name])
    reactivated = False
    async with asyncio.timeout(timeout):
        while any(row.info.lv == snapshot.lv for row in await _report(origin.vg)):
            if not reactivated:
                current = await lv_info(origin.name)
                if not current.device_open:
                    if current.active:
                        await _run(["lvchange", "--activate", "n", origin.name])
                    await _run(["lvchange", "--activate", "y", origin.name])
                    reactivated = True
                    continue
            await asyncio.sleep(0.5)


@contextlib.asynccontextmanager
async def rollback_snapshot(
    info: LvInfo, size: int, *, keep: bool = False, merge_timeout: float = MERGE_TIMEOUT,
) -> AsyncIterator[LvInfo]:
    """Keep a snapshot of ``info``'s LV while the body writes it; undo the write on failure.

    Creates ``<lv>-vw-rollback`` (a COW snapshot of ``size`` bytes, a thin snapshot for a
    thin LV) and yields it. If the body raises (or is cancelled), the snapshot is merged
    back, so the LV reads exactly as before, and the exception is re-raised; a failed
    merge raises ``LvmError`` chained to it. On success the snapshot is removed unless
    ``keep``. A COW snapshot that fills up becomes invalid and cannot be merged: ``size``
    must cover everything the body may change (the LV's size always does).
    """
    name = f"{info.lv}{ROLLBACK_SUFFIX}"
    leftover = [r for r in await _report(info.vg) if r.info.lv == name]
    if leftover and leftover[0].info.origin == info.lv:
        # A write that crashed left its guard behind: it still holds the LV as it was
        # before that write, so it keeps guarding this one.
        snapshot = leftover[0].info
    else:
        argv = ["lvcreate", "--snapshot", "--name", name]
        if not info.is_thin:
            rounded = math.ceil(size / info.extent_size) * info.extent_size
            argv += ["--size", f"{rounded}b"]
        await _run([*argv, info.name])
        snapshot = await lv_info(f"{info.vg}/{name}")
    try:
        yield snapshot
    except GeneratorExit:
        raise
    except BaseException as failure:
        try:
            await _merge_back(info, snapshot, merge_timeout)
        except (LvmError, TimeoutError) as merge_failure:
            raise LvmError(
                ["lvconvert", "--merge", snapshot.name], None,
                f"rolling {info.name} back failed after {failure!r}: {merge_failure}",
            ) from failure
        raise
    if not keep:
        await _run(["lvremove", "--yes", snapshot.name])


@contextlib.asynccontextmanager
async def guarded_write(info: LvInfo | None, snapshot_size: int | None) -> AsyncIterator[bool]:
    """Prepare an LV for a write; yields whether the writer may pass ``--target-is-zero``.

    With ``snapshot_size`` (and an LV), a failure inside the block merges a rollback
    snapshot back so the LV reads exactly as before, then re-raises; success removes it.
    A thin LV is discarded first (after the snapshot exists: it still holds the old
    blocks). The reprovision job runs these same pieces as separate steps of its plan.
    """
    if info is None:
        yield False
        return
    guard = (rollback_snapshot(info, cow_snapshot_size(info, snapshot_size))
             if snapshot_size else contextlib.nullcontext())
    async with guard:
        if info.is_thin:
            await discard(info.path)
        yield info.is_thin


# ---- volumes of a VG used without a libvirt pool (the HTTP job API) ------------------------


async def vg_exists(vg: str) -> bool:
    """Whether this host has the volume group ``vg``."""
    argv = ["vgs", "--reportformat", "json", "--options", "vg_name"]
    output = await _run(argv)
    try:
        reports = json.loads(output)["report"]
        names = {str(row["vg_name"]) for report in reports for row in report.get("vg", [])}
    except (ValueError, KeyError, TypeError) as exc:
        raise LvmError(argv, 0, f"unexpected vgs output: {exc}") from exc
    return vg in names


async def create_lv(vg: str, name: str, size: int) -> LvInfo:
    """Create the linear LV ``vg/name`` of at least ``size`` bytes (whole extents).

    Active at once and never asking: ``--yes`` answers the question lvcreate asks when the
    new LV's extents still carry a signature of a former one, and ``--wipesignatures y
    --zero y`` remove that signature and zero the start, so nothing (udev's blkid, an
    auto-mount, a format probe) mistakes the new LV for what was there before.
    ``LvmError`` when the VG is missing, the name is taken or invalid, or there is no room.
    """
    if size <= 0:
        raise ValueError(f"LV size must be positive, not {size}")
    sectors = math.ceil(size / 512)  # lvcreate takes whole sectors, then rounds to extents
    await _run([
        "lvcreate", "--yes", "--wipesignatures", "y", "--zero", "y", "--activate", "y",
        "--type", "linear", "--size", f"{sectors * 512}b", "--name", name, vg,
    ])
    return await lv_info(f"{vg}/{name}")


# ---- thin clones of golden LVs -----------------------------------------------------------


async def rename_lv(vg: str, old: str, new: str) -> None:
    """Rename ``vg/old`` to ``vg/new``; an active LV keeps its device, under the new name."""
    await _run(["lvrename", vg, old, new])


async def remove_lv(name: str) -> None:
    """Remove the LV ``VG/LV`` (never asking)."""
    await _run(["lvremove", "--yes", name])


async def swap_state(vg: str, lv: str) -> SwapLeftover | None:
    """What an interrupted clone swap of ``vg/lv`` left behind (None: nothing)."""
    return swap_leftover(vg, lv, [row.info for row in await _report(vg)])


async def find_golden(vg: str, pool: str, digest: str) -> LvInfo | None:
    """The complete golden LV of ``digest`` in ``vg``'s thin pool ``pool``, if there is one."""
    name = golden_name(digest, pool)
    for row in await _report(vg):
        info = row.info
        if info.lv == name and info.is_golden and digest_tag(digest) in info.tags:
            return info
    return None


async def goldens(*, partial: bool = False) -> list[LvInfo]:
    """Every golden LV on this host: complete ones, and with ``partial`` those being
    written (or left half-written by a crash) too."""
    return [row.info for row in await _report() if row.info.is_golden
            and (partial or not row.info.lv.endswith(PARTIAL_SUFFIX))]


async def create_golden(vg: str, pool: str, digest: str, size: int,
                        write: Callable[[str], Awaitable[None]]) -> LvInfo:
    """Make the golden LV of ``digest`` in thin pool ``vg/pool``: ``size`` bytes, written by
    ``write(path)`` (a fresh thin LV reads as zeroes, so a sparse write allocates only the
    image's data), then read-only, inactive and skipped by ``vgchange -ay``.

    It is written as ``<name>-part`` and renamed only when complete, so a crash never
    leaves something that looks like a golden; a partial one found here is removed first.
    """
    name = golden_name(digest, pool)
    partial = f"{name}{PARTIAL_SUFFIX}"
    if any(row.info.lv == partial for row in await _report(vg)):
        await remove_lv(f"{vg}/{partial}")
    sectors = math.ceil(size / 512)
    argv = ["lvcreate", "--yes", "--type", "thin", "--virtualsize", f"{sectors * 512}b",
            "--thinpool", pool, "--name", partial, "--activate", "y",
            "--setactivationskip", "n"]
    for tag in golden_tags(digest):
        argv += ["--addtag", tag]
    await _run([*argv, vg])
    try:
        info = await lv_info(f"{vg}/{partial}")
        await write(info.path)
        await _run(["lvchange", "--permission", "r", "--setactivationskip", "y", info.name])
        await _run(["lvchange", "--activate", "n", info.name])
        await rename_lv(vg, partial, name)
    except BaseException:
        with contextlib.suppress(LvmError):
            await remove_lv(f"{vg}/{partial}")
        raise
    return await lv_info(f"{vg}/{name}")


async def clone_lv(golden: str, clone: str, tags: Sequence[str]) -> None:
    """Create ``clone`` (``VG/LV``) as a thin snapshot of ``golden``, with ``tags``.

    Active, writable and without the activation-skip flag LVM gives thin snapshots by
    default (lvcreate fails rather than leave it otherwise), so the host activates it at
    boot like the LV it replaces. One command: the clone path's cost is its LVM commands.
    """
    name = clone.partition("/")[2]
    argv = ["lvcreate", "--snapshot", "--name", name, "--setactivationskip", "n",
            "--activate", "y", "--ignoreactivationskip"]
    for tag in tags:
        argv += ["--addtag", tag]
    await _run([*argv, golden])


async def activate(name: str) -> None:
    """Activate ``VG/LV``, activation-skip flag or not."""
    await _run(["lvchange", "--activate", "y", "--ignoreactivationskip", name])


async def extend_to(name: str, size: int) -> None:
    """``lvextend`` ``VG/LV`` to ``size`` bytes, a whole number of extents (another LV's
    size), in one command."""
    await _run(["lvextend", "--size", f"{size}b", name])


@dataclass
class CloneSwap:
    """A clone on its way to replacing ``vg/lv`` (see ``swapping_in``)."""

    vg: str
    lv: str
    renamed: bool = False
    """The old LV is ``<lv>-vw-prev`` now."""
    cloned: bool = False
    """The clone exists under the LV's name."""

    @property
    def name(self) -> str:
        return f"{self.vg}/{self.lv}"

    @property
    def previous(self) -> str:
        return prev_name(self.lv)

    async def rename_old(self) -> None:
        """Rename the old LV to ``<lv>-vw-prev``, freeing its name for the clone."""
        await rename_lv(self.vg, self.lv, self.previous)
        self.renamed = True

    async def clone(self, golden: str, tags: Sequence[str]) -> None:
        """Create the clone of ``golden`` under the LV's name."""
        assert self.renamed and not self.cloned
        try:
            await clone_lv(golden, self.name, tags)
        except BaseException:
            # lvcreate may have committed the LV and failed to activate it.
            with contextlib.suppress(LvmError):
                if any(row.info.lv == self.lv for row in await _report(self.vg)):
                    self.cloned = True
            raise
        self.cloned = True

    async def grow(self, size: int) -> None:
        """Extend the clone to ``size`` bytes, the old LV's size."""
        assert self.cloned
        await extend_to(self.name, size)

    async def roll_back(self) -> None:
        """Remove the clone and give the old LV its name back."""
        if self.cloned:
            await remove_lv(self.name)
            self.cloned = False
        if self.renamed:
            await rename_lv(self.vg, self.previous, self.lv)
            self.renamed = False


@contextlib.asynccontextmanager
async def swapping_in(vg: str, lv: str) -> AsyncIterator[CloneSwap]:
    """Yield the swap of ``vg/lv`` for a clone; the body renames, clones and grows.

    If the body raises (or is cancelled) the clone is removed and the old LV is back under
    its name, however far the body came; a failed roll-back raises ``LvmError`` chained to
    the failure. When the body ends normally the old LV (``<lv>-vw-prev``) is removed:
    only after the body recorded the result. A crash anywhere in between leaves what
    ``swap_state`` recognises.
    """
    swap = CloneSwap(vg, lv)
    try:
        yield swap
    except GeneratorExit:
        raise
    except BaseException as failure:
        try:
            await swap.roll_back()
        except LvmError as undo_failure:
            raise LvmError(undo_failure.argv, undo_failure.exit_code,
                           f"putting {vg}/{lv} back failed after {failure!r}: "
                           f"{undo_failure.stderr}") from failure
        raise
    if swap.cloned and swap.renamed:
        await remove_lv(f"{vg}/{swap.previous}")
    elif swap.renamed:
        await swap.roll_back()  # never cloned: the old LV is the domain's again
