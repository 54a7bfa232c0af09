"""qemu-img, run safely: inspect images and write them onto volumes.

qemu-img is the only program that parses untrusted image files, so it is never handed a
file the pure header checks (``watcher.core.inspect``) have not accepted, always runs
with an explicit ``-f`` (no format probing), with ``LC_ALL=C`` (stable messages), from
argv lists (no shell), and ``qemu-img info`` runs under address-space and CPU limits so
a crafted file cannot exhaust the host.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import signal
import stat
import subprocess
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from watcher.adapters.filesink import fsync_path
from watcher.core.errors import ImageRejected, ImageWriteError
from watcher.core.formats import TAIL_BYTES
from watcher.core.inspect import (
    DEFAULT_MAX_VIRTUAL_SIZE,
    HEADER_BYTES,
    ImageFacts,
    check_header,
    crosscheck,
)
from watcher.core.policy import ImageFormat

QEMU_IMG = "qemu-img"
PRLIMIT = "prlimit"
SETPRIV = "setpriv"
_STDERR_KEEP = 64 * 1024
"""Bytes of qemu-img's stderr kept for error messages; the tail holds the reason."""

_TRANSIENT_MESSAGES = (
    "Device or resource busy",
    "Resource temporarily unavailable",
    "EAGAIN",
    "EBUSY",
)
"""qemu-img failures worth retrying: another opener briefly holds the device."""


@dataclass(frozen=True)
class QemuImgLimits:
    """Resource limits for ``qemu-img info`` on an untrusted file."""

    address_space: int = 1024**3
    """Bytes of virtual memory (RLIMIT_AS); info on a sane image needs far less than 1 GiB."""
    cpu_seconds: int = 30
    """CPU seconds (RLIMIT_CPU) before the kernel stops the process; info takes milliseconds."""
    wall_seconds: float = 120.0
    """Wall-clock seconds before the process is killed, e.g. when storage hangs."""


def _qemu_env() -> dict[str, str]:
    return {**os.environ, "LC_ALL": "C"}


def dies_with_daemon(argv: list[str]) -> list[str]:
    """``argv`` killed by the kernel if the daemon dies first (``setpriv --pdeathsig``).

    A daemon killed mid-write (SIGKILL, the OOM killer) must not leave qemu-img writing
    the volume behind it: the restarted daemon runs the job again, and two writers on one
    volume is exactly what the write marker and the checks exist to prevent.
    """
    return [SETPRIV, "--pdeathsig", "KILL", "--", *argv]


def _limited(argv: list[str], limits: QemuImgLimits) -> list[str]:
    """``argv`` run under ``limits``: ``prlimit`` sets them on itself, then execs ``argv``.

    Not a pre-exec hook: one forces a full ``fork`` of the daemon (page tables copied,
    the GIL and the logging lock held meanwhile), which stalls the event loop for as long
    as the copy takes; without one the child is started with a cheap ``vfork``.
    """
    cpu = limits.cpu_seconds
    # SIGXCPU at the soft limit, SIGKILL one second later if it is ignored.
    return dies_with_daemon(
        [PRLIMIT, f"--as={limits.address_space}", f"--cpu={cpu}:{cpu + 1}", "--", *argv])


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "did not finish"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


async def qemu_img_info(
    path: Path, fmt: str, limits: QemuImgLimits = QemuImgLimits(),
) -> dict[str, object]:
    """Return ``qemu-img info --output=json`` for ``path`` read as ``fmt``.

    A nonzero exit, a resource limit hit, a timeout or output that is not a JSON object
    raises ``ImageRejected("qemu_img_failed", ...)``.
    """
    argv = [QEMU_IMG, "info", "-f", fmt, "--output=json", str(path)]
    try:
        # Waited for in a thread; on timeout the child is killed and reaped.
        done = await asyncio.to_thread(
            subprocess.run, _limited(argv, limits), stdin=subprocess.DEVNULL,
            capture_output=True, env=_qemu_env(), timeout=limits.wall_seconds)
    except subprocess.TimeoutExpired:
        raise ImageRejected(
            "qemu_img_failed",
            f"qemu-img info on {path} did not finish within {limits.wall_seconds:g} s",
        ) from None
    stdout, err = done.stdout, done.stderr.decode("utf-8", "replace").strip()
    if done.returncode != 0:
        raise ImageRejected(
            "qemu_img_failed",
            f"qemu-img info on {path} {_describe_exit(done.returncode)} "
            f"(limits: {limits.address_space} bytes of memory, {limits.cpu_seconds} s of CPU): "
            f"{err or 'no error output'}",
        )
    try:
        info = json.loads(stdout)
    except ValueError as exc:
        raise ImageRejected(
            "qemu_img_failed", f"qemu-img info on {path} printed invalid JSON: {exc}",
        ) from None
    if not isinstance(info, dict):
        raise ImageRejected(
            "qemu_img_failed", f"qemu-img info on {path} printed JSON that is not an object",
        )
    return info


async def _reap(proc: asyncio.subprocess.Process) -> None:
    """Make sure ``proc`` is gone: kill it if it still runs, then wait for it."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    await asyncio.shield(proc.wait())


def _read_ends(path: Path) -> tuple[bytes, bytes, int]:
    """The first ``HEADER_BYTES`` and last ``TAIL_BYTES`` of a regular file, and its size.

    O_NONBLOCK keeps a FIFO planted in place of an image from hanging the thread.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ImageRejected("not_a_file", f"{path} is not a regular file")
        head = handle.read(HEADER_BYTES)
        if info.st_size <= len(head):
            return head, head[-TAIL_BYTES:], info.st_size
        handle.seek(info.st_size - TAIL_BYTES)
        return head, handle.read(TAIL_BYTES), info.st_size


async def inspect_image_file(
    path: Path,
    declared_format: ImageFormat,
    *,
    max_virtual_size: int = DEFAULT_MAX_VIRTUAL_SIZE,
) -> ImageFacts:
    """Check ``path``'s header and trailer, then ask qemu-img, then make sure both agree.

    Raises ``ImageRejected`` when the image must not be trusted (reason ``not_a_file``
    for anything but a regular file, ``virtual_size`` above ``max_virtual_size`` bytes);
    qemu-img never sees a file whose header was refused.
    """
    head, tail, size = await asyncio.to_thread(_read_ends, path)
    header = check_header(head, declared_format, size, tail=tail,
                          max_virtual_size=max_virtual_size)
    info = await qemu_img_info(path, declared_format)
    return crosscheck(header, info, declared_format)


def convert_argv(
    source: Path,
    source_format: str,
    target: Path,
    *,
    target_is_block: bool,
    direct_io: bool,
    target_is_zero: bool = False,
) -> list[str]:
    """The ``qemu-img convert`` command writing ``source`` raw onto an existing ``target``.

    - ``-n``: the target (a volume) already exists.
    - ``-W``: out-of-order writes are faster and harmless, since nothing reads the volume
      while it is written.
    - ``-t none`` bypasses the page cache when the target supports O_DIRECT.
    - The target is opened through ``--target-image-opts`` with ``discard=ignore``, so a
      zero range becomes one ``BLKZEROOUT`` or ``FALLOC_FL_ZERO_RANGE`` instead of a hole
      punch. Punching frees blocks (and discards them on a ``discard`` mount), which made
      sparse images as slow to write as full ones; see ``bench/RESULTS.md``.
      qemu-img refuses ``-O`` together with ``--target-image-opts``; ``driver=raw`` says it.
    - ``--target-is-zero`` (thin volumes that were just discarded) skips zero ranges.
    """
    driver = "host_device" if target_is_block else "file"
    filename = str(target).replace(",", ",,")  # QemuOpts escaping
    argv = [QEMU_IMG, "convert", "-p", "-f", source_format, "-n", "-W",
            "-t", "none" if direct_io else "writeback"]
    if target_is_zero:
        argv.append("--target-is-zero")
    argv += [
        "--target-image-opts", str(source),
        f"driver=raw,file.driver={driver},file.filename={filename},file.discard=ignore",
    ]
    return argv


def _probe_target(target: Path) -> tuple[bool, bool]:
    """Whether ``target`` is a block device and whether it accepts O_DIRECT.

    Opened read-only: closing a block device opened for writing makes udev rescan it.
    A missing target reports (False, False); qemu-img then explains the failure.
    """
    try:
        is_block = stat.S_ISBLK(os.stat(target).st_mode)
    except OSError:
        return False, False
    try:
        fd = os.open(target, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return is_block, False
    os.close(fd)
    return is_block, True


def _is_transient(stderr: str) -> bool:
    return any(message in stderr for message in _TRANSIENT_MESSAGES)


async def _read_progress(
    stream: asyncio.StreamReader, on_progress: Callable[[float], None] | None,
) -> None:
    """Parse ``-p`` output, ``    (12.34/100%)`` records separated by carriage returns."""
    last = -1.0
    buffer = b""
    while chunk := await stream.read(4096):
        buffer += chunk
        *records, buffer = buffer.replace(b"\n", b"\r").split(b"\r")
        for record in records:
            text = record.strip().decode("ascii", "replace")
            if not (text.startswith("(") and text.endswith("/100%)")):
                continue
            try:
                percent = float(text[1:-len("/100%)")])
            except ValueError:
                continue
            if percent > last and on_progress is not None:
                last = percent
                on_progress(percent)


async def _read_tail(stream: asyncio.StreamReader, keep: int) -> bytes:
    tail = b""
    while chunk := await stream.read(65536):
        tail = (tail + chunk)[-keep:]
    return tail


class WriteImageFunction(Protocol):
    """The signature of ``write_image``, for jobs that take another in tests."""

    def __call__(self, source: Path, source_format: str, target: Path, *,
                 target_is_zero: bool = False,
                 on_progress: Callable[[float], None] | None = None) -> Awaitable[None]: ...


async def write_image(
    source: Path,
    source_format: str,
    target: Path,
    *,
    target_is_zero: bool = False,
    on_progress: Callable[[float], None] | None = None,
) -> None:
    """Write ``source`` onto the existing file or block device ``target`` as raw data.

    ``on_progress`` receives increasing percentages. The data is flushed to stable
    storage before returning. On failure raises ``ImageWriteError`` (``temporary`` for a
    busy device); on cancellation qemu-img is killed and reaped before re-raising.
    """
    is_block, direct_io = await asyncio.to_thread(_probe_target, target)
    argv = convert_argv(
        source, source_format, target,
        target_is_block=is_block, direct_io=direct_io, target_is_zero=target_is_zero,
    )
    proc = await asyncio.create_subprocess_exec(
        *dies_with_daemon(argv),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=_qemu_env(),
    )
    assert proc.stdout is not None and proc.stderr is not None
    try:
        _, stderr_tail = await asyncio.gather(
            _read_progress(proc.stdout, on_progress),
            _read_tail(proc.stderr, _STDERR_KEEP),
        )
        await proc.wait()
    finally:
        await _reap(proc)
    stderr = stderr_tail.decode("utf-8", "replace")
    if proc.returncode != 0:
        raise ImageWriteError.build(
            str(target), proc.returncode, stderr, temporary=_is_transient(stderr),
        )
    try:
        await asyncio.to_thread(fsync_path, target)
    except OSError as exc:
        raise ImageWriteError.build(
            str(target), None, f"flushing {target} failed: {exc}",
            temporary=exc.errno in (errno.EBUSY, errno.EAGAIN),
        ) from exc
