"""The cache's file primitives: the lock between processes, owned temp files, atomic JSON.

Why it exists: the directory's rules (an entry appears only by atomic rename, a crash leaves
at most a temp file, clean-up never takes a live download's file) rest on a few careful
uses of ``flock``, ``O_EXCL`` and ``rename``. They live here, apart from what ``CacheDir``
decides with them. Everything here blocks: the daemon calls it from a worker thread.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from watcher.core.errors import WatcherError


class StoreClosed(WatcherError):
    """The store was closed (the daemon is stopping) while waiting for the cache lock."""


class CacheLock:
    """``.lock``: its flock serialises changes between processes (``cache prune`` while the
    daemon runs); its content, a generation every change renews, tells a process whether
    what it read from disk is still what is there.
    """

    POLL = 0.02
    """Seconds between attempts while another process holds the lock."""

    def __init__(self, path: Path, on_wait: Callable[[], None] = lambda: None) -> None:
        self.path = path
        self._on_wait = on_wait
        self._closed = threading.Event()

    def generation(self) -> str | None:
        """The last change's mark, read without the lock (None: never changed)."""
        try:
            return self.path.read_text() or None
        except FileNotFoundError:
            return None

    @contextlib.contextmanager
    def held(self) -> Iterator[LockHandle]:
        """Hold the lock; polls so that ``close`` can end the wait (``StoreClosed``)."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            waited = False
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if self._closed.is_set():
                        raise StoreClosed("the cache store is closed") from None
                    if not waited:
                        waited = True
                        self._on_wait()
                    time.sleep(self.POLL)
            yield LockHandle(fd)
        finally:
            os.close(fd)  # drops the flock

    def close(self) -> None:
        """Make current and future waits for the lock give up."""
        self._closed.set()


class LockHandle:
    """The held lock; ``renew`` marks a change for other processes."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def mark(self) -> str | None:
        """The generation as the last change left it (None: never changed)."""
        return os.pread(self._fd, 64, 0).decode(errors="replace") or None

    def renew(self) -> str:
        mark = uuid.uuid4().hex
        os.pwrite(self._fd, mark.encode(), 0)
        os.ftruncate(self._fd, len(mark))
        return mark


class PartFile:
    """A temp file in ``tmp/`` and the flock that marks it as owned by a live process.

    The lock is held from creation until the file is renamed into place or removed, so
    clean-up in any process can tell a live download from a crash's leftover.
    """

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def create(cls, directory: Path, suffix: str = ".part") -> PartFile:
        while True:
            path = directory / f"{uuid.uuid4().hex}{suffix}"
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                # Clean-up may have locked and removed the file before we locked it.
                if same_file(os.stat(path), os.fstat(fd)):
                    return cls(path, fd)
            except (BlockingIOError, FileNotFoundError):
                pass
            os.close(fd)

    def move(self, target: Path) -> None:
        """Rename the file to ``target`` (replacing what is there); the lock stays held."""
        os.replace(self.path, target)
        self.path = target

    def release(self) -> None:
        """Remove the file if its path still names it, then drop the lock.

        After a commit renamed it away, or a newer file replaced it at its path, only the
        lock goes. An unlink and a close, never a wait: safe to call from the event loop.
        """
        if self._fd is None:
            return
        try:
            if same_file(os.stat(self.path), os.fstat(self._fd)):
                self.path.unlink()
        except FileNotFoundError:
            pass
        finally:
            os.close(self._fd)
            self._fd = None


def same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def remove_unless_locked(path: Path) -> bool:
    """Remove a regular file nobody holds a lock on; False if it is live or gone."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return False
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if not same_file(os.stat(path), st):
            return False
        path.unlink()
        return True
    except OSError:  # BlockingIOError: its owner is alive
        return False
    finally:
        os.close(fd)


def read_json(path: Path, on_error: Callable[[Path, Exception], None]) -> dict[str, Any] | None:
    """A JSON object from ``path``; None when missing, or unreadable (reported)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        on_error(path, err)
        return None
    return data if isinstance(data, dict) else None


def write_json(path: Path, data: dict[str, Any], tmp: Path) -> None:
    """Replace ``path`` by ``data`` atomically and durably, via a temp file in ``tmp``."""
    staged = tmp / f"{uuid.uuid4().hex}.json"
    with open(staged, "w") as fh:
        json.dump(data, fh, indent=2, sort_keys=True)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(staged, path)


def listdir(directory: Path) -> list[Path]:
    try:
        return list(directory.iterdir())
    except FileNotFoundError:
        return []


def stat_key(path: Path) -> tuple[int, ...] | None:
    """Identity and version of a file, to notice a replacement; None when missing."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
