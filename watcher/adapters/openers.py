"""Who has a volume open: processes holding a descriptor, and kernel holders.

Why it exists: an API job may target a volume no domain mentions, and writing a file or
device that something has open (a QEMU started by hand, a ``dd``, a mount, a loop device)
corrupts what that holder sees. libvirt knows nothing of these, so the job asks the
kernel: every process's ``/proc/<pid>/fd`` (a block device matched by its device number,
a file by device and inode, so any path or hard link to it counts), and for the holders
that have no process, the loop devices backed by a file and the device-mapper (or md)
devices and mounts on a block device. Processes we may not look at, and those that exit
during the scan, are skipped. These are quick blocking reads of ``/proc`` and ``/sys``;
an async caller runs them in a thread.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

PROC = Path("/proc")
SYS_BLOCK = Path("/sys/block")
SYS_DEV_BLOCK = Path("/sys/dev/block")


def _identity(st: os.stat_result) -> tuple[str, int, int]:
    """What makes two opens the same thing: a block device's number, else a file's inode."""
    if stat.S_ISBLK(st.st_mode):
        return ("block", st.st_rdev, 0)
    return ("file", st.st_dev, st.st_ino)


def open_by(real_path: str) -> list[int]:
    """PIDs, other than ours, holding ``real_path`` (a file or block device) open, sorted.

    Raises ``FileNotFoundError`` when ``real_path`` does not exist.
    """
    wanted = _identity(os.stat(real_path))
    own = os.getpid()
    holders: list[int] = []
    for entry in os.scandir(PROC):
        if not entry.name.isdigit() or int(entry.name) == own:
            continue
        if _holds(Path(entry.path) / "fd", wanted):
            holders.append(int(entry.name))
    return sorted(holders)


def _holds(fd_dir: Path, wanted: tuple[str, int, int]) -> bool:
    try:
        descriptors = os.listdir(fd_dir)
    except OSError:  # gone, a kernel thread's, or not ours to read
        return False
    for fd in descriptors:
        try:
            # stat follows the descriptor's magic link to the open object itself.
            if _identity(os.stat(fd_dir / fd)) == wanted:
                return True
        except OSError:
            continue
    return False


def kernel_holders(real_path: str) -> list[str]:
    """What holds ``real_path`` open inside the kernel, where no process fd shows it.

    For a file: the loop devices it backs (``/dev/loopN``). For a block device: the
    devices stacked on it (``/sys/.../holders``: device-mapper, md) and the mount points of
    filesystems on it. Raises ``FileNotFoundError`` when ``real_path`` does not exist.
    """
    st = os.stat(real_path)
    if stat.S_ISBLK(st.st_mode):
        return _block_holders(st.st_rdev)
    if stat.S_ISREG(st.st_mode):
        return _loop_devices_backed_by(st)
    return []


def _loop_devices_backed_by(target: os.stat_result) -> list[str]:
    found: list[str] = []
    try:
        devices = sorted(os.listdir(SYS_BLOCK))
    except OSError:
        return found
    for name in devices:
        if not name.startswith("loop"):
            continue
        try:
            backing = (SYS_BLOCK / name / "loop" / "backing_file").read_text().strip()
            st = os.stat(backing)
        except OSError:  # not attached, or its backing file is gone or renamed
            continue
        if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
            found.append(f"/dev/{name}")
    return found


def _block_holders(rdev: int) -> list[str]:
    number = f"{os.major(rdev)}:{os.minor(rdev)}"
    found: list[str] = []
    with contextlib.suppress(OSError):
        found += [f"/dev/{name}" for name in sorted(os.listdir(SYS_DEV_BLOCK / number / "holders"))]
    try:
        mountinfo = (PROC / "self" / "mountinfo").read_text()
    except OSError:
        return found
    for line in mountinfo.splitlines():
        fields = line.split()
        # mountinfo: id, parent id, major:minor, root, mount point, ...
        if len(fields) > 4 and fields[2] == number:
            found.append(fields[4])
    return found
