"""The LVM edge's reading half: what a block device is, from ``lvs``, and how LVM fails.

Why it exists: before a root LV is written, the job must know what the device really is
(an LV? a snapshot? a thin pool? open by someone?). Every command runs from an argv list
with ``LC_ALL=C``; reports are read as ``lvs --reportformat json`` in bytes, never as text
meant for people. ``run`` is the one place an LVM command is started.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from watcher.core.errors import PermanentError
from watcher.core.lvm_rules import LvInfo, refusal_reason

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


async def run(argv: Sequence[str]) -> str:
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


async def lvs_rows(selector: str | None = None) -> list[_Row]:
    """``lvs`` for every LV (hidden ones included), or for one ``VG`` or ``VG/LV``."""
    argv = [
        "lvs", "--all", "--reportformat", "json", "--units", "b", "--nosuffix", "--binary",
        "--options", ",".join(_REPORT_FIELDS),
    ]
    if selector is not None:
        argv.append(selector)
    output = await run(argv)
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
    for row in await lvs_rows(vg):
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
    rows = await lvs_rows()
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
    rows = await lvs_rows()
    found = next((row.info for row in rows if row.kernel_device == device), None)
    if found is None:
        found = await asyncio.to_thread(_match_by_path, real, rows)
    if found is None:
        return None, []
    return found, [row.info for row in rows if row.info.vg == found.vg]


async def vg_lvs(vg: str) -> list[LvInfo]:
    """Every LV of ``vg``; ``LvmError`` when there is no such VG."""
    return [row.info for row in await lvs_rows(vg)]


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
