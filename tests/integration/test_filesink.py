"""The download sink: bytes, digest and durability as a plain write would give, or an error."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest

from watcher.adapters.filesink import HashingFileSink

pytestmark = pytest.mark.integration

KiB = 1024


def chunks(total: int) -> list[bytes]:
    """Uneven chunk sizes, so writeback ranges never line up with chunk boundaries."""
    out: list[bytes] = []
    size = index = 0
    while size < total:
        out.append(hashlib.shake_256(str(index).encode()).digest(97 * KiB + index * 13))
        size += len(out[-1])
        index += 1
    return out


# Unsynced (a pre-warm's download): the receiving thread writes, the sink only hashes.
@pytest.mark.parametrize("durable", [True, False], ids=["durable", "unsynced"])
def test_the_file_and_digest_match_what_was_written(tmp_path: Path, durable: bool) -> None:
    data = chunks(6 * 1024 * KiB)
    path = tmp_path / "image.part"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        sink = HashingFileSink(fd, window=256 * KiB, durable=durable)  # many windows
        for chunk in data:
            sink.write(chunk)
        digest = sink.finish()
    finally:
        os.close(fd)
    whole = b"".join(data)
    assert path.read_bytes() == whole
    assert digest == hashlib.sha256(whole).hexdigest()


def test_an_empty_stream_gives_an_empty_file_and_the_empty_digest(tmp_path: Path) -> None:
    path = tmp_path / "empty.part"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        digest = HashingFileSink(fd).finish()
    finally:
        os.close(fd)
    assert path.stat().st_size == 0
    assert digest == hashlib.sha256(b"").hexdigest()


@pytest.mark.parametrize("durable", [True, False], ids=["durable", "unsynced"])
def test_a_write_error_reaches_the_caller_and_the_writer_thread_ends(
        tmp_path: Path, durable: bool) -> None:
    path = tmp_path / "read-only.part"
    path.write_bytes(b"")
    fd = os.open(path, os.O_RDONLY)  # every write fails with EBADF
    try:
        sink = HashingFileSink(fd, durable=durable)
        with pytest.raises(OSError):
            # The failure surfaces on a later write or, at the latest, on finish().
            for chunk in chunks(4 * 1024 * KiB):
                sink.write(chunk)
            sink.finish()
        sink.abort()  # what the caller's cleanup does
    finally:
        os.close(fd)
    assert not [t for t in threading.enumerate() if t.name == "file-sink"]


def test_abort_stops_the_writer_without_waiting_for_durability(tmp_path: Path) -> None:
    path = tmp_path / "aborted.part"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        sink = HashingFileSink(fd)
        sink.write(b"x" * 1000)
        sink.abort()
        sink.abort()  # idempotent, as a cleanup path may call it twice
    finally:
        os.close(fd)
    assert not [t for t in threading.enumerate() if t.name == "file-sink"]
    assert path.read_bytes() == b"x" * 1000
