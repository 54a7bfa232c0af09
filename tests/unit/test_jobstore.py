"""The job database: round trips, update and finish semantics, order, pruning, crash safety.

Real SQLite files in ``tmp_path``. One test starts a process on purpose: surviving a
process killed in the middle of a write is the point of a durable store, and only a
process that really dies shows it.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import sqlite3
import stat
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from watcher.adapters.jobstore import (
    MIGRATIONS,
    UPDATABLE,
    JobRecord,
    JobStore,
    JobStoreError,
    timestamp,
)


@pytest.fixture
def store(tmp_path: Path) -> Any:
    opened = JobStore(tmp_path / "jobs.sqlite")
    yield opened
    opened.close()


def job(volume: str | None = "pool/vm-1", **fields: Any) -> JobRecord:
    return JobRecord(job_id=str(uuid.uuid4()), kind="provision" if volume else "fetch",
                     request={"image_url": "s3://b1b/k", "volume_size_gb": 10}, volume=volume,
                     **fields)


def test_a_job_reads_back_as_it_was_inserted(store: JobStore) -> None:
    inserted = store.insert(job(correlation_id="c-1", cache_hit=True, traceparent="00-ab-cd-01"))
    assert inserted.created_at.endswith("Z") and inserted.updated_at == inserted.created_at
    assert datetime.fromisoformat(inserted.created_at) <= datetime.now(UTC)
    assert store.get(inserted.job_id) == inserted
    assert store.get(str(uuid.uuid4())) is None


def test_the_api_view_has_exactly_the_documented_fields(store: JobStore) -> None:
    record = store.insert(job(status="running", stage="downloading", percent=12.5,
                              bytes_processed=5, bytes_total=40, eta_sec=3.0))
    body = record.to_api()
    # Fields with no value are left out, never null (the predecessor's Go omitempty).
    assert list(body) == ["job_id", "status", "progress", "created_at", "updated_at"]
    assert body["progress"] == {"stage": "downloading", "percent": 12.5, "bytes_processed": 5,
                                "bytes_total": 40, "eta_sec": 3.0}
    done = store.finish(record.job_id, "completed", stage="finalizing", percent=100.0,
                        correlation_id="c-1", cache_hit=False, image_path="/c/x",
                        volume_path="/dev/vg/x", eta_sec=None)
    assert done is not None
    assert list(done.to_api()) == ["job_id", "status", "progress", "correlation_id",
                                   "cache_hit", "image_path", "volume_path", "created_at",
                                   "updated_at"]
    assert "eta_sec" not in done.to_api()["progress"]


def test_a_cancelled_job_reads_failed_with_error_cancelled(store: JobStore) -> None:
    record = store.insert(job(status="running", stage="converting"))
    cancelled = store.finish(record.job_id, "cancelled", error="volume p/v was not changed")
    assert cancelled is not None and cancelled.status == "cancelled"
    body = cancelled.to_api()
    assert (body["status"], body["error"], body["cancelled"], body["message"]) == (
        "failed", "cancelled", True, "volume p/v was not changed")


def test_a_version_1_database_moves_to_the_predecessors_stage_words(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite"
    raw = sqlite3.connect(path, isolation_level=None)
    for statement in MIGRATIONS[0]:
        raw.execute(statement)
    raw.execute("PRAGMA user_version = 1")
    old = {"queued": "initializing", "downloading": "downloading", "verifying": "downloading",
           "writing": "converting", "done": "finalizing"}
    for number, stage in enumerate(old):
        raw.execute(
            "INSERT INTO jobs (job_id, kind, request, status, stage, percent, bytes_processed,"
            " bytes_total, created_at, updated_at) VALUES (?, 'fetch', '{}', 'pending', ?,"
            " 0, 0, 0, ?, ?)", (f"job-{number}", stage, f"2026-01-0{number + 1}T00:00:00Z",
                                f"2026-01-0{number + 1}T00:00:00Z"))
    raw.close()
    store = JobStore(path)
    moved = [store.get(f"job-{number}") for number in range(len(old))]
    assert [record.stage if record else None for record in moved] == list(old.values())
    assert store.insert(job()).stage == "initializing"
    store.close()


def test_a_known_job_id_cannot_be_inserted_twice(store: JobStore) -> None:
    record = store.insert(job())
    with pytest.raises(ValueError, match="refused"):
        store.insert(record)


def test_an_update_sets_fields_and_updated_at(store: JobStore) -> None:
    record = store.insert(job(created_at="2026-01-01T00:00:00+00:00"))
    assert record.created_at == "2026-01-01T00:00:00.000000Z"
    updated = store.update(record.job_id, status="running", stage="converting", percent=50.0,
                           cache_hit=False, request={"changed": True})
    assert updated is not None and updated == store.get(record.job_id)
    assert (updated.status, updated.stage, updated.percent, updated.cache_hit) == (
        "running", "converting", 50.0, False)
    assert updated.request == {"changed": True}
    assert updated.updated_at > record.updated_at and updated.finished_at is None
    assert store.update(str(uuid.uuid4()), percent=1.0) is None


@pytest.mark.parametrize("fields", [
    {"nonsense": 1}, {"job_id": "x"}, {"created_at": "x"}, {"finished_at": "x"},
    {"status": "exploded"}, {"stage": "nowhere"},
])
def test_an_update_of_an_unknown_or_store_owned_field_is_refused(
    store: JobStore, fields: dict[str, Any],
) -> None:
    record = store.insert(job())
    with pytest.raises(ValueError):
        store.update(record.job_id, **fields)
    assert store.get(record.job_id) == record


def test_updatable_fields_are_the_record_fields_the_store_does_not_own() -> None:
    assert {"status", "stage", "percent", "error", "digest", "volume_path"} <= UPDATABLE
    assert not {"job_id", "kind", "created_at", "updated_at", "finished_at"} & UPDATABLE


def test_a_status_that_becomes_finished_sets_finished_at_once(store: JobStore) -> None:
    record = store.insert(job())
    failed = store.update(record.job_id, status="failed", error="boom")
    assert failed is not None and failed.finished_at == failed.updated_at
    again = store.update(record.job_id, status="failed", error="boom again")
    assert again is not None and again.finished_at == failed.finished_at
    resumed = store.update(record.job_id, status="pending")
    assert resumed is not None and resumed.finished_at is None


def test_finish_ends_a_job_only_once(store: JobStore) -> None:
    record = store.insert(job(status="running"))
    done = store.finish(record.job_id, "completed", stage="finalizing", percent=100.0,
                        volume_path="/dev/vg/vm-1")
    assert done is not None
    assert (done.status, done.stage, done.error, done.volume_path) == (
        "completed", "finalizing", None, "/dev/vg/vm-1")
    assert done.finished_at is not None
    assert store.finish(record.job_id, "cancelled") is None
    assert store.get(record.job_id) == done
    assert store.finish(str(uuid.uuid4()), "failed", error="x") is None


def test_finish_records_the_error_and_needs_a_finished_status(store: JobStore) -> None:
    record = store.insert(job())
    failed = store.finish(record.job_id, "failed", error="the volume is in use")
    assert failed is not None and failed.error == "the volume is in use"
    with pytest.raises(ValueError, match="finished status"):
        store.finish(store.insert(job()).job_id, "running")


def test_unfinished_jobs_come_oldest_first(store: JobStore) -> None:
    same = "2026-01-01T00:00:00Z"
    later = store.insert(job(created_at="2026-01-02T00:00:00Z"))
    first = store.insert(job(created_at=same, status="running"))
    second = store.insert(job(created_at=same))
    store.insert(job(created_at="2025-12-31T00:00:00Z", status="completed"))
    store.insert(job(created_at="2025-12-31T00:00:00Z", status="cancelled"))
    assert [r.job_id for r in store.unfinished()] == [first.job_id, second.job_id, later.job_id]


def test_next_pending_is_the_oldest_pending_job_of_one_key(store: JobStore) -> None:
    store.insert(job("pool/a", created_at="2026-01-01T00:00:00Z", status="running"))
    a2 = store.insert(job("pool/a", created_at="2026-01-02T00:00:00Z"))
    store.insert(job("pool/a", created_at="2026-01-03T00:00:00Z"))
    b1 = store.insert(job("pool/b", created_at="2026-01-04T00:00:00Z"))
    fetch = store.insert(job(None, created_at="2026-01-05T00:00:00Z"))
    assert store.next_pending("pool/a") == a2
    assert store.next_pending("pool/b") == b1
    assert store.next_pending(None) == fetch
    assert store.next_pending("pool/c") is None


def test_list_pages_through_jobs_oldest_first(store: JobStore) -> None:
    ids = [store.insert(job(created_at=f"2026-01-0{day}T00:00:00Z")).job_id
           for day in range(1, 8)]
    assert [r.job_id for r in store.list()] == ids
    assert [r.job_id for r in store.list(offset=2, limit=3)] == ids[2:5]
    assert store.list(offset=7) == []
    with pytest.raises(ValueError):
        store.list(offset=-1)


def test_prune_deletes_only_finished_jobs_older_than_the_limit(store: JobStore) -> None:
    now = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    week = timedelta(days=7)

    def finished_at(moment: datetime, status: str = "completed") -> JobRecord:
        return store.insert(job(status=status, created_at=timestamp(moment - week),
                                finished_at=timestamp(moment)))

    old = finished_at(now - week - timedelta(microseconds=1))
    old_failed = finished_at(now - 2 * week, "failed")
    at_the_boundary = finished_at(now - week)
    recent = finished_at(now - timedelta(hours=1), "cancelled")
    ancient_but_running = store.insert(job(status="running", created_at="2020-01-01T00:00:00Z"))
    assert store.prune(now=now) == 2
    assert store.get(old.job_id) is None and store.get(old_failed.job_id) is None
    for kept in (at_the_boundary, recent, ancient_but_running):
        assert store.get(kept.job_id) == kept
    assert store.prune(older_than=0, now=now) == 2
    assert [r.job_id for r in store.list()] == [ancient_but_running.job_id]


def test_the_file_is_private_and_survives_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite"
    store = JobStore(path)
    record = store.insert(job())
    sides = list(tmp_path.glob("jobs.sqlite-*"))
    assert sides  # the WAL and its index, while the store is open
    for side in sides:
        assert stat.S_IMODE(side.stat().st_mode) & 0o077 == 0
    store.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    path.chmod(0o644)
    reopened = JobStore(path)
    assert reopened.get(record.job_id) == record
    reopened.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_the_database_uses_wal_and_records_its_schema_version(tmp_path: Path) -> None:
    JobStore(tmp_path / "jobs.sqlite").close()
    raw = sqlite3.connect(tmp_path / "jobs.sqlite")
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert raw.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    raw.close()


def test_a_missing_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(JobStoreError, match="does not exist"):
        JobStore(tmp_path / "nowhere" / "jobs.sqlite")


def test_a_symlinked_database_file_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.sqlite"
    JobStore(target).close()
    link = tmp_path / "jobs.sqlite"
    link.symlink_to(target)
    with pytest.raises(JobStoreError, match="symlink"):
        JobStore(link)
    dangling = tmp_path / "dangling.sqlite"
    dangling.symlink_to(tmp_path / "absent")
    with pytest.raises(JobStoreError, match="symlink"):
        JobStore(dangling)
    assert not (tmp_path / "absent").exists()


def test_a_directory_in_place_of_the_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "jobs.sqlite").mkdir()
    with pytest.raises(JobStoreError, match=re.escape(str(tmp_path / "jobs.sqlite"))):
        JobStore(tmp_path / "jobs.sqlite")


@pytest.mark.parametrize("content", [
    pytest.param(b"this is not a database, just some text\n" * 100, id="text"),
    pytest.param(b"SQLite format 3\x00" + b"\xff" * 4080, id="sqlite-header-then-garbage"),
])
def test_a_corrupt_file_gives_an_error_naming_it(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "jobs.sqlite"
    path.write_bytes(content)
    with pytest.raises(JobStoreError, match=re.escape(str(path))):
        JobStore(path)


def test_a_database_of_a_newer_schema_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite"
    JobStore(path).close()
    raw = sqlite3.connect(path)
    raw.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    raw.close()
    before = path.read_bytes()
    with pytest.raises(JobStoreError, match="newer"):
        JobStore(path)
    assert path.read_bytes() == before


def test_threads_share_one_store(store: JobStore) -> None:
    per_thread, threads = 40, 6
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(per_thread):
                record = store.insert(job())
                store.update(record.job_id, status="running", percent=1.0)
                store.finish(record.job_id, "completed")
                assert store.get(record.job_id) is not None
        except BaseException as exc:  # collected: a thread's failure must fail the test
            errors.append(exc)

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert errors == []
    records = store.list(limit=per_thread * threads + 1)
    assert len(records) == per_thread * threads
    assert {r.status for r in records} == {"completed"}


def _write_then_die(path: str, committed: int, ready: Any, how: str) -> None:
    """In a child process: commit ``committed`` jobs, start one more write, then die."""
    store = JobStore(Path(path))
    for _ in range(committed):
        store.insert(job())
    if how == "exit":
        os._exit(0)
    # A second connection holds a big uncommitted transaction that spills into the WAL.
    raw = sqlite3.connect(path, isolation_level=None)
    raw.execute("PRAGMA cache_size = 1")
    raw.execute("BEGIN IMMEDIATE")
    for number in range(500):
        raw.execute(
            "INSERT INTO jobs (job_id, kind, request, status, stage, percent, bytes_processed,"
            " bytes_total, created_at, updated_at) VALUES (?, 'fetch', ?, 'pending',"
            " 'initializing', 0, 0, 0, '2026-01-01T00:00:00.000000Z',"
            " '2026-01-01T00:00:00.000000Z')",
            (f"uncommitted-{number}", "{}" + " " * 2000))
    ready.set()
    time.sleep(60)  # killed long before this ends
    os._exit(1)


@pytest.mark.parametrize("how", ["exit", "kill"])
def test_committed_jobs_survive_a_process_that_dies_mid_write(tmp_path: Path, how: str) -> None:
    path = tmp_path / "jobs.sqlite"
    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    child = context.Process(target=_write_then_die, args=(str(path), 5, ready, how))
    child.start()
    if how == "kill":
        assert ready.wait(timeout=60)
        child.kill()
    child.join(timeout=60)
    assert child.exitcode == (0 if how == "exit" else -9)

    store = JobStore(path)
    records = store.list()
    assert len(records) == 5
    assert not [r for r in records if r.job_id.startswith("uncommitted-")]
    store.insert(job())
    assert len(store.list()) == 6
    store.close()


def test_the_api_view_matches_the_openapi_document(store: JobStore) -> None:
    validator = pytest.importorskip("openapi_schema_validator")
    document = json.loads((Path(__file__).resolve().parents[2] / "watcher" / "http"
                           / "openapi.json").read_text())
    schema = {**document["components"]["schemas"]["Job"], "components": document["components"]}
    fresh = store.insert(job())
    done = store.finish(fresh.job_id, "completed", stage="finalizing", percent=100.0,
                        cache_hit=True, image_path="/c/x", volume_path="/dev/vg/x", eta_sec=0.0)
    other = store.insert(job(status="running"))
    cancelled = store.finish(other.job_id, "cancelled", error="volume p/v was not changed")
    failed = store.finish(store.insert(job()).job_id, "failed", error="no such object")
    assert done is not None and cancelled is not None and failed is not None
    for record in (fresh, done, cancelled, failed):
        validator.validate(record.to_api(), schema, cls=validator.OAS30Validator)
