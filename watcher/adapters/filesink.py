"""Write a downloaded stream to disk, hashed and durable, without a long flush at the end.

A cache entry may only appear once its bytes are on stable storage. Written the plain way,
a gigabyte sits in the page cache until the final fsync, which then takes as long as the
download itself did. Here a second thread writes and hashes each chunk, starts writeback
of every 8 MiB as soon as it is complete (``sync_file_range``), and waits for the range
before it, so the disk works while the network does and the final fsync has only the
last window left. The receiving thread only reads the socket. Dirty memory stays at two
windows, and the written range is dropped from the page cache: a cached image is read
again only when a volume is written, much later.

Without ``sync_file_range`` (not Linux, no glibc symbol) the writes are plain and the final
fsync does all the flushing.

A sink made with ``durable=False`` starts no writeback and never fsyncs. Its file may be
lost or torn by a crash of the machine, so its owner must fsync it (or hash it again
after a restart) before relying on it; a pre-warm does this to finish at the speed of the
network, not of the disk. With no writeback to wait for, the receiving thread writes each
chunk itself, as a plain download does, and the second thread only hashes: writing and
hashing a chunk in one thread took longer than receiving it, and held up the receiver.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import os
import queue
import threading
from collections.abc import Callable
from pathlib import Path

WINDOW = 8 * 1024 * 1024
"""Bytes per writeback range."""
QUEUED_CHUNKS = 16
"""Chunks the receiver may be ahead of the writer (16 MiB with 1 MiB chunks)."""
QUEUED_CHUNKS_UNSYNCED = 2
"""The same for an unsynced sink, whose second thread only hashes: a chunk hashed right
after it arrived is still in the CPU's cache (measured: a quarter less CPU time than 16)."""

_SYNC_FILE_RANGE_WAIT_BEFORE = 1
_SYNC_FILE_RANGE_WRITE = 2
_SYNC_FILE_RANGE_WAIT_AFTER = 4


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        function = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    function.restype = ctypes.c_int
    return function


_sync_file_range = _load_sync_file_range()


def fsync_path(path: Path) -> None:
    """Flush a file, block device or directory (after a rename in it) to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _range_sync(fd: int, offset: int, length: int, flags: int) -> None:
    if _sync_file_range is None:
        return
    if _sync_file_range(fd, offset, length, flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"sync_file_range: {os.strerror(err)}")


class HashingFileSink:
    """Chunks in, SHA-256 and a durable file out. ``write`` from one thread only."""

    def __init__(self, fd: int, *, window: int = WINDOW, durable: bool = True) -> None:
        self._fd = fd
        self._window = window
        self._durable = durable
        self._queue: queue.Queue[bytes | None] = queue.Queue(
            maxsize=QUEUED_CHUNKS if durable else QUEUED_CHUNKS_UNSYNCED)
        self._digest = hashlib.sha256()
        self._error: BaseException | None = None
        self._written = 0
        self._previous: tuple[int, int] | None = None
        self._thread = threading.Thread(target=self._run, name="file-sink", daemon=True)
        self._thread.start()

    def write(self, chunk: bytes) -> None:
        """Queue ``chunk`` (unsynced: write it first); raises the writer's error (OSError)
        if writing already failed."""
        if self._error is not None:
            raise self._error
        if not self._durable:
            self._write_all(chunk)
        self._queue.put(chunk)

    def finish(self) -> str:
        """Wait until every chunk is written (and, if durable, on stable storage); return
        the hex digest."""
        self._stop()
        if self._error is not None:
            raise self._error
        if self._durable:
            os.fsync(self._fd)
        return self._digest.hexdigest()

    def abort(self) -> None:
        """Stop writing; what was written stays behind for the caller to remove."""
        self._stop()

    def _stop(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def _run(self) -> None:
        pending_start = 0  # start of the range whose writeback was started last
        while (chunk := self._queue.get()) is not None:
            if self._error is not None:
                continue  # keep taking chunks so the receiver never blocks on a dead writer
            try:
                if self._durable:
                    self._write_all(chunk)
                self._digest.update(chunk)
                self._written += len(chunk)
                if self._durable and self._written - pending_start >= self._window:
                    pending_start = self._start_writeback(pending_start)
            except BaseException as exc:  # handed to the receiving thread
                self._error = exc

    def _write_all(self, chunk: bytes) -> None:
        view = memoryview(chunk)
        while view:
            view = view[os.write(self._fd, view):]

    def _start_writeback(self, start: int) -> int:
        """Start writeback of ``[start, written)``, then wait for the range before it."""
        end = self._written
        _range_sync(self._fd, start, end - start, _SYNC_FILE_RANGE_WRITE)
        if self._previous is not None:
            previous_start, previous_end = self._previous
            _range_sync(self._fd, previous_start, previous_end - previous_start,
                        _SYNC_FILE_RANGE_WAIT_BEFORE | _SYNC_FILE_RANGE_WRITE
                        | _SYNC_FILE_RANGE_WAIT_AFTER)
            os.posix_fadvise(self._fd, 0, previous_end, os.POSIX_FADV_DONTNEED)
        self._previous = (start, end)
        return end
