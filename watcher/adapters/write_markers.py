"""Markers that tell the libvirt hook a volume is being written, for volumes no domain's
metadata ties to a job.

Why it exists: a tag-triggered write marks its domain ``<provisioning/>`` and the hook
refuses to start that domain. An API job writes a volume by name, and any domain may
have it as a disk: while it writes, a file in ``WRITING_DIR`` names the volume, and the
hook (``watcher/libvirt_hook.py``, which reads the same format with the standard library
only) refuses to start a domain with a disk on it.

A marker is valid only while the process that wrote it lives: it records the writer's
pid, that process's start time (``/proc/<pid>/stat``, so a reused pid does not count)
and the boot id. A daemon killed mid-write leaves a marker that blocks nothing; the next
start-up removes it (``stale_markers_removed``). Markers live under ``/run`` (gone after
a reboot), are named by the SHA-256 of the real path (never by a name from a request),
and appear only whole: written to a temp file, then renamed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from watcher.core.errors import TemporaryError

WRITING_DIR = Path("/run/libvirt-volume-watcher/writing")
"""Where the markers live; the hook reads the same directory."""

_SUFFIX = ".json"
_TEMP_PREFIX = ".tmp-"
_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


class VolumeMarked(TemporaryError):
    """Another live process has marked the same volume as being written."""


def marker_path(real_path: str, directory: Path = WRITING_DIR) -> Path:
    """The marker file for ``real_path``: ``<sha256 of the path>.json``."""
    return directory / (hashlib.sha256(real_path.encode()).hexdigest() + _SUFFIX)


def process_start_time(pid: int) -> int | None:
    """When ``pid`` started (clock ticks after boot), or None when there is no such process."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces and ')'.
    fields = stat_line.rpartition(")")[2].split()
    try:
        return int(fields[19])  # field 22 overall; fields[0] is field 3
    except (IndexError, ValueError):
        return None


def _boot_id() -> str | None:
    try:
        return _BOOT_ID.read_text().strip()
    except OSError:
        return None


def writer_alive(marker: dict[str, Any]) -> bool:
    """Whether the process that wrote ``marker`` is still the one running under its pid."""
    pid, started = marker.get("pid"), marker.get("pid_start_time")
    if not isinstance(pid, int) or not isinstance(started, int):
        return False
    if marker.get("boot_id") not in (None, _boot_id()):
        return False
    return process_start_time(pid) == started


def _read(path: Path) -> dict[str, Any] | None:
    """The marker at ``path``; None when missing, unreadable or malformed."""
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return content if isinstance(content, dict) else None


def _write_temp(directory: Path, content: dict[str, Any]) -> Path:
    fd, name = tempfile.mkstemp(dir=directory, prefix=f"{_TEMP_PREFIX}{os.getpid()}-")
    try:
        with os.fdopen(fd, "w") as out:
            json.dump(content, out)
            out.flush()
            os.fchmod(out.fileno(), 0o644)
    except BaseException:
        os.unlink(name)
        raise
    return Path(name)


@contextlib.contextmanager
def marked_writing(real_path: str, *, pool: str | None, volume: str | None, job_id: str,
                   directory: Path = WRITING_DIR) -> Iterator[Path]:
    """Mark ``real_path`` as being written for the block's duration; yields the marker.

    ``pool``/``volume`` name the libvirt volume when there is one, so the hook also
    refuses domains whose disk is ``type='volume'``. Raises ``VolumeMarked`` when a live
    writer has marked the same path; a dead writer's marker is replaced. The marker is
    removed on exit, exceptions and cancellation included.
    """
    directory.mkdir(mode=0o755, parents=True, exist_ok=True)
    directory.chmod(0o755)  # mkdir's mode is cut by the umask; the hook must read it
    pid = os.getpid()
    content = {
        "real_path": real_path, "pool": pool, "volume": volume, "job_id": job_id,
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "pid": pid, "pid_start_time": process_start_time(pid), "boot_id": _boot_id(),
    }
    target = marker_path(real_path, directory)
    temp = _write_temp(directory, content)
    try:
        while True:
            try:
                # link, unlike rename, never replaces: two writers cannot both win.
                os.link(temp, target)
                break
            except FileExistsError:
                existing = _read(target)
                if existing is not None and writer_alive(existing):
                    raise VolumeMarked(
                        f"{real_path} is already being written by job "
                        f"{existing.get('job_id')} (pid {existing.get('pid')})") from None
                with contextlib.suppress(FileNotFoundError):
                    target.unlink()  # a dead writer's, or a torn one: it blocks nothing
    finally:
        temp.unlink()
    try:
        yield target
    finally:
        target.unlink(missing_ok=True)


def stale_markers_removed(directory: Path = WRITING_DIR) -> int:
    """Remove markers (and temp files) whose writer is gone; returns how many went.

    For start-up: a daemon killed mid-write leaves its marker behind. A live writer's
    marker, such as another daemon's on this host, stays.
    """
    removed = 0
    try:
        entries = list(directory.iterdir())
    except FileNotFoundError:
        return 0
    for path in entries:
        if path.name.startswith(_TEMP_PREFIX):
            writer = path.name[len(_TEMP_PREFIX):].partition("-")[0]
            stale = not writer.isdigit() or process_start_time(int(writer)) is None
        elif path.name.endswith(_SUFFIX):
            marker = _read(path)
            stale = marker is None or not writer_alive(marker)
        else:
            continue
        if stale:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed += 1
    return removed
