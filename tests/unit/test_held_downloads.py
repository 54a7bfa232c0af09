"""Downloads held for a corrected sidecar: which go and when, and their files on disk.

The rule (``holds_to_drop``) is a table; the files (``read_held``,
``remove_held_leftovers``) are checked on a temp directory with real flocks, the way
``cache list`` and ``cache prune`` in another process meet a daemon's held download;
the daemon's side (``HeldDownloads``) runs over a real store in a temp directory.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from watcher.cache.entry import Source
from watcher.cache.files import PartFile
from watcher.cache.held import HeldDownloads, HeldRecord, read_held
from watcher.cache.records import HELD_DIR, remove_held_leftovers
from watcher.cache.store import CacheDir
from watcher.core.cache_rules import HeldSlot, holds_to_drop

A, B, C = HeldSlot("a", 100, 10.0), HeldSlot("b", 200, 20.0), HeldSlot("c", 300, 30.0)


@pytest.mark.parametrize(
    ("now", "room", "dropped"),
    [
        pytest.param(0.0, 10_000, {}, id="fresh-and-fitting-stay"),
        pytest.param(10.0, 10_000, {"a": "expired"}, id="expires-at-its-deadline"),
        pytest.param(25.0, 10_000, {"a": "expired", "b": "expired"}, id="every-expired-one"),
        pytest.param(0.0, 600, {}, id="exactly-fitting-stay"),
        pytest.param(0.0, 500, {"a": "max_size"}, id="oldest-goes-first-to-fit"),
        pytest.param(0.0, 300, {"a": "max_size", "b": "max_size"}, id="as-many-as-needed"),
        pytest.param(0.0, 0, {"a": "max_size", "b": "max_size", "c": "max_size"},
                     id="no-room-at-all"),
        pytest.param(15.0, 300, {"a": "expired", "b": "max_size"},
                     id="expired-ones-free-room-first"),
    ],
)
def test_held_downloads_go_when_expired_or_over_the_room(
        now: float, room: int, dropped: dict[str, str]) -> None:
    assert holds_to_drop([C, A, B], now=now, room=room) == dropped


def record(image: str = "base", digest: str = "a" * 64) -> HeldRecord:
    return HeldRecord(image=image, digest=digest, size=5, format="qcow2", bucket="vm",
                      key="images/base.qcow2", etag="e1", held_at="2026-01-01T00:00:00+00:00",
                      expires_at="2026-01-01T01:00:00+00:00")


def write_held(cache: Path, rec: HeldRecord, *, locked: bool) -> PartFile | None:
    held = cache / HELD_DIR
    held.mkdir(parents=True, exist_ok=True)
    (held / f"{rec.image}.json").write_text(json.dumps(rec.record()))
    if not locked:
        (held / f"{rec.image}.part").write_bytes(b"bytes")
        return None
    part = PartFile.create(held)
    part.path.write_bytes(b"bytes")
    part.move(held / f"{rec.image}.part")
    return part


def test_a_record_round_trips_and_a_bad_one_is_refused() -> None:
    assert HeldRecord.from_record(record().record()) == record()
    for bad in ({"image": "../x"}, {"digest": "nope"}, {"size": True}, {"size": -1}):
        with pytest.raises(ValueError):
            HeldRecord.from_record({**record().record(), **bad})
    with pytest.raises(KeyError):
        HeldRecord.from_record({"image": "base"})


def test_listing_shows_records_with_data_and_skips_the_rest(tmp_path: Path) -> None:
    write_held(tmp_path, record("base"), locked=False)
    write_held(tmp_path, record("other", "b" * 64), locked=False)
    (tmp_path / HELD_DIR / "other.part").unlink()  # a record without data
    (tmp_path / HELD_DIR / "odd.json").write_text(json.dumps(record("base").record()))
    (tmp_path / HELD_DIR / "junk.json").write_text("{not json")
    assert read_held(tmp_path) == [record("base")]
    assert read_held(tmp_path / "missing") == []


def test_clean_up_keeps_a_live_download_and_removes_a_dead_one(tmp_path: Path) -> None:
    live = write_held(tmp_path, record("live"), locked=True)
    write_held(tmp_path, record("dead"), locked=False)
    (tmp_path / HELD_DIR / "orphan.json").write_text(json.dumps(record("orphan").record()))
    assert remove_held_leftovers(tmp_path) == 3  # dead's data and record, orphan's record
    assert sorted(p.name for p in (tmp_path / HELD_DIR).iterdir()) == ["live.json", "live.part"]

    assert read_held(tmp_path) == [record("live")]  # what cache list shows meanwhile
    assert live is not None
    live.release()  # its owner drops it (or dies: then the lock goes and clean-up may)
    assert remove_held_leftovers(tmp_path) == 1  # the record left without its data
    assert list((tmp_path / HELD_DIR).iterdir()) == []


def test_releasing_a_replaced_file_removes_only_its_lock(tmp_path: Path) -> None:
    older, newer = PartFile.create(tmp_path), PartFile.create(tmp_path)
    target = tmp_path / "base.part"
    older.move(target)
    newer.path.write_bytes(b"newer")
    newer.move(target)  # replaces the older one's file
    older.release()
    assert target.read_bytes() == b"newer"
    newer.release()
    assert not target.exists()


# --- the daemon's side: a real store on a temp directory -----------------------------------

V1, V2 = Source("vm", "images/base.qcow2", "e1"), Source("vm", "images/base.qcow2", "e2")


async def hold(held: HeldDownloads, source: Source, data: bytes, digest: str) -> PartFile:
    part = await asyncio.to_thread(held.cache_dir.new_part)
    part.path.write_bytes(data)
    assert await held.hold("base", "qcow2", source, part, digest, len(data))
    return part


async def test_a_newer_refused_version_replaces_the_held_one(tmp_path: Path) -> None:
    store = CacheDir(tmp_path, max_size=1 << 30)
    store.prepare()
    held = HeldDownloads(store, 3600)
    await hold(held, V1, b"one", "a" * 64)
    await hold(held, V2, b"second", "b" * 64)
    assert sorted(p.name for p in (tmp_path / HELD_DIR).iterdir()) == ["base.json", "base.part"]
    assert (tmp_path / HELD_DIR / "base.part").read_bytes() == b"second"
    assert [r.etag for r in read_held(tmp_path)] == ["e2"]
    assert held.find(V1) is None and held.total_bytes == store.held_bytes == len(b"second")
    assert list((tmp_path / "tmp").iterdir()) == []
    held.close()
    assert list((tmp_path / HELD_DIR).iterdir()) == [] and store.held_bytes == 0


async def test_a_taken_download_is_safe_from_the_next_hold_of_its_image(tmp_path: Path) -> None:
    store = CacheDir(tmp_path, max_size=1 << 30)
    store.prepare()
    held = HeldDownloads(store, 3600)
    await hold(held, V1, b"one", "a" * 64)
    taken = await held.take(V1)
    assert taken is not None and taken.part.path.parent == tmp_path / "tmp"
    assert read_held(tmp_path) == [] and store.held_bytes == 0
    await hold(held, V2, b"second", "b" * 64)  # while the first is being committed
    assert taken.part.path.read_bytes() == b"one"
    taken.part.release()
    held.close()


async def test_a_hold_expires_and_a_drop_spares_a_newer_hold(tmp_path: Path) -> None:
    store = CacheDir(tmp_path, max_size=1 << 30)
    store.prepare()
    held = HeldDownloads(store, 1e-6)
    await hold(held, V1, b"one", "a" * 64)
    await held.sweep()
    assert held.images() == [] and list((tmp_path / HELD_DIR).iterdir()) == []

    held.hold_seconds = 3600
    asked = time.monotonic()
    await hold(held, V2, b"second", "b" * 64)
    await held.drop("base", "superseded", held_before=asked)  # held after the ask: kept
    assert held.images() == ["base"]
    await held.drop("base", "superseded")
    assert held.images() == [] and list((tmp_path / HELD_DIR).iterdir()) == []
