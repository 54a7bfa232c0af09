"""The HTTP job API's jobs, durable in one SQLite file under ``state.dir``.

Why it exists: a job the API accepted must survive a restart (DESIGN.md, "HTTP job API"):
a pending one still runs, a running one resumes, and clients can read how each ended.
SQLite the boring way: WAL with ``synchronous=NORMAL`` (a commit is a write to the WAL,
not an fsync; a power cut may lose the last commits but never corrupts the file), a busy
timeout for the CLI reading alongside the daemon, the schema version in ``PRAGMA
user_version`` with migrations applied in order, and one short transaction per call, so
the daemon may call it from its event loop. A database written by a newer version is
refused rather than misread.
"""

from __future__ import annotations

import builtins
import dataclasses
import json
import os
import sqlite3
import stat
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, get_args
from urllib.parse import quote

from watcher.core.api_shapes import STAGES, Stage, job_body

JobStatus = Literal["pending", "running", "completed", "failed", "cancelled"]
JobKind = Literal["provision", "fetch"]
FINISHED: frozenset[str] = frozenset({"completed", "failed", "cancelled"})
BUSY_TIMEOUT_MS = 5000
"""How long a call waits for another process's write lock (the CLI's, say)."""


def _jobs_table(name: str, stages: tuple[str, ...]) -> str:
    """The jobs table's definition; only the stage words have changed between versions."""
    return f"""CREATE TABLE {name} (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            job_id TEXT NOT NULL UNIQUE,
            kind TEXT NOT NULL CHECK (kind IN ('provision', 'fetch')),
            request TEXT NOT NULL,
            volume TEXT,
            status TEXT NOT NULL
                CHECK (status IN ('pending', 'running', 'completed', 'failed', 'cancelled')),
            stage TEXT NOT NULL CHECK (stage IN ({', '.join(f"'{s}'" for s in stages)})),
            percent REAL NOT NULL,
            bytes_processed INTEGER NOT NULL,
            bytes_total INTEGER NOT NULL,
            eta_sec REAL,
            error TEXT,
            correlation_id TEXT,
            cache_hit INTEGER,
            image_path TEXT,
            volume_path TEXT,
            digest TEXT,
            traceparent TEXT,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            finished_at TEXT
        )"""


_INDEXES = (
    "CREATE INDEX jobs_by_status ON jobs (status, volume, created_at, seq)",
    "CREATE INDEX jobs_by_finish ON jobs (finished_at) WHERE finished_at IS NOT NULL",
)
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (  # 1: the jobs table
        _jobs_table("jobs", ("queued", "downloading", "verifying", "writing", "done")),
        *_INDEXES,
    ),
    (  # 2: the predecessor's stage words, which clients read (watcher.core.api_shapes)
        _jobs_table("jobs_v2", STAGES),
        """INSERT INTO jobs_v2 SELECT seq, job_id, kind, request, volume, status,
            CASE stage WHEN 'queued' THEN 'initializing' WHEN 'verifying' THEN 'downloading'
                       WHEN 'writing' THEN 'converting' WHEN 'done' THEN 'finalizing'
                       ELSE stage END,
            percent, bytes_processed, bytes_total, eta_sec, error, correlation_id, cache_hit,
            image_path, volume_path, digest, traceparent, created_at, updated_at, finished_at
            FROM jobs""",
        "DROP TABLE jobs",
        "ALTER TABLE jobs_v2 RENAME TO jobs",
        *_INDEXES,
    ),
)
"""Schema steps in order; the database's ``user_version`` counts those applied. Append only."""


class JobStoreError(Exception):
    """The job database cannot be used: unreadable, corrupt, or from a newer version."""


@dataclass(frozen=True)
class JobRecord:
    """One job as stored; ``to_api`` is what ``GET /api/v1/jobs/{id}`` answers."""

    job_id: str
    kind: JobKind
    request: dict[str, Any]
    """The validated request, as JSON."""
    volume: str | None
    """The serialisation key (``pool/volume``): jobs with one key run one after another.
    None for a fetch."""
    status: JobStatus = "pending"
    stage: Stage = "initializing"
    percent: float = 0.0
    bytes_processed: int = 0
    bytes_total: int = 0
    eta_sec: float | None = None
    error: str | None = None
    correlation_id: str | None = None
    cache_hit: bool | None = None
    image_path: str | None = None
    volume_path: str | None = None
    digest: str | None = None
    traceparent: str | None = None
    """The W3C trace context of the request, so a resumed job continues its trace."""
    created_at: str = ""
    """ISO 8601 UTC (``2026-01-31T12:00:00.000000Z``); ``insert`` sets it when empty."""
    updated_at: str = ""
    finished_at: str | None = None

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    def to_api(self) -> dict[str, Any]:
        """The body of ``GET /api/v1/jobs/{id}`` (``watcher.core.api_shapes.job_body``)."""
        return job_body(job_id=self.job_id, status=self.status, stage=self.stage,
                        percent=self.percent, bytes_processed=self.bytes_processed,
                        bytes_total=self.bytes_total, eta_sec=self.eta_sec, error=self.error,
                        correlation_id=self.correlation_id, cache_hit=self.cache_hit,
                        image_path=self.image_path, volume_path=self.volume_path,
                        created_at=self.created_at, updated_at=self.updated_at)


_COLUMNS = tuple(f.name for f in dataclasses.fields(JobRecord))
_SET_BY_STORE = frozenset({"job_id", "kind", "created_at", "updated_at", "finished_at"})
UPDATABLE: frozenset[str] = frozenset(_COLUMNS) - _SET_BY_STORE
"""Fields ``update`` and ``finish`` may set; the others are the store's."""
_STATUSES = frozenset(get_args(JobStatus))
_STAGES = frozenset(get_args(Stage))
_FINISHED_SQL = "('completed', 'failed', 'cancelled')"
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM jobs"
_RETURNING = f"RETURNING {', '.join(_COLUMNS)}"


def timestamp(moment: datetime | None = None) -> str:
    """ISO 8601 UTC with microseconds and ``Z``: fixed width, so text order is time order."""
    moment = datetime.now(UTC) if moment is None else moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _normalized(text: str) -> str:
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        raise ValueError(f"timestamp {text!r} has no time zone")
    return timestamp(moment)


def _column_value(name: str, value: Any) -> Any:
    if name == "status" and value not in _STATUSES:
        raise ValueError(f"status must be one of {sorted(_STATUSES)}, got {value!r}")
    if name == "stage" and value not in _STAGES:
        raise ValueError(f"stage must be one of {sorted(_STAGES)}, got {value!r}")
    if name == "request":
        return json.dumps(value, separators=(",", ":"), sort_keys=True)
    if name == "cache_hit" and value is not None:
        return int(bool(value))
    return value


def _record(row: tuple[Any, ...]) -> JobRecord:
    values = dict(zip(_COLUMNS, row, strict=True))
    values["request"] = json.loads(values["request"])
    if values["cache_hit"] is not None:
        values["cache_hit"] = bool(values["cache_hit"])
    return JobRecord(**values)


def _open_private(path: Path) -> None:
    """Create the file 0600 if missing; refuse a symlink or anything but a regular file."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except FileNotFoundError:
        raise JobStoreError(f"{path}: its directory {path.parent} does not exist") from None
    except OSError as exc:
        if path.is_symlink():
            raise JobStoreError(f"{path}: is a symlink; refusing to open it") from None
        raise JobStoreError(f"{path}: cannot open: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise JobStoreError(f"{path}: not a regular file")
        if stat.S_IMODE(info.st_mode) & 0o077:
            os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


class JobStore:
    """Jobs in the SQLite file ``path``; every method is one short transaction.

    Thread-safe: one connection, serialised by a lock. Errors of SQLite itself are raised
    as ``JobStoreError`` naming the file; a bad argument is a ``ValueError``.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        _open_private(path)
        try:
            self._db = sqlite3.connect(f"file:{quote(str(path))}?mode=rw", uri=True,
                                       isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise JobStoreError(f"{path}: cannot open the job database: {exc}") from None
        try:
            self._db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            self._db.execute("PRAGMA journal_mode = WAL").fetchone()
            self._db.execute("PRAGMA synchronous = NORMAL")
            self._migrate()
        except sqlite3.Error as exc:
            self._db.close()
            raise JobStoreError(f"{path}: not a usable job database: {exc}") from None
        except JobStoreError:
            self._db.close()
            raise

    def _migrate(self) -> None:
        known = len(MIGRATIONS)
        version = int(self._db.execute("PRAGMA user_version").fetchone()[0])
        if version > known:
            raise JobStoreError(
                f"{self.path}: the job database has schema version {version}, written by a "
                f"newer libvirt-volume-watcher; this one knows up to {known} and will not "
                "touch it")
        for number in range(version + 1, known + 1):
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for statement in MIGRATIONS[number - 1]:
                    self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version = {number}")
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def _write(self, sql: str, params: tuple[Any, ...]) -> builtins.list[tuple[Any, ...]]:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    rows = self._db.execute(sql, params).fetchall()
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
            except sqlite3.IntegrityError as exc:
                raise ValueError(f"refused by the job database: {exc}") from None
            except sqlite3.Error as exc:
                raise JobStoreError(f"{self.path}: {exc}") from None
            return rows

    def _read(self, sql: str, params: tuple[Any, ...] = ()) -> builtins.list[JobRecord]:
        with self._lock:
            try:
                rows = self._db.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise JobStoreError(f"{self.path}: {exc}") from None
        return [_record(row) for row in rows]

    def insert(self, record: JobRecord) -> JobRecord:
        """Store a new job; ``created_at``/``updated_at`` default to now. A known id is a
        ``ValueError``."""
        now = timestamp()
        created = _normalized(record.created_at) if record.created_at else now
        record = dataclasses.replace(
            record, created_at=created,
            updated_at=_normalized(record.updated_at) if record.updated_at else created,
            finished_at=(_normalized(record.finished_at) if record.finished_at
                         else (created if record.status in FINISHED else None)))
        values = tuple(_column_value(name, getattr(record, name)) for name in _COLUMNS)
        placeholders = ", ".join("?" for _ in _COLUMNS)
        self._write(f"INSERT INTO jobs ({', '.join(_COLUMNS)}) VALUES ({placeholders})", values)
        return record

    def get(self, job_id: str) -> JobRecord | None:
        found = self._read(f"{_SELECT} WHERE job_id = ?", (job_id,))
        return found[0] if found else None

    def _set(self, job_id: str, fields: dict[str, Any], *, only_unfinished: bool,
             ) -> JobRecord | None:
        unknown = set(fields) - UPDATABLE
        if unknown:
            raise ValueError(f"not fields a job update may set: {', '.join(sorted(unknown))}")
        now = timestamp()
        names = list(fields)
        params = [_column_value(name, fields[name]) for name in names]
        assignments = [f"{name} = ?" for name in names] + ["updated_at = ?"]
        params.append(now)
        if "status" in fields:
            if fields["status"] in FINISHED:
                assignments.append("finished_at = COALESCE(finished_at, ?)")
                params.append(now)
            else:
                assignments.append("finished_at = NULL")
        where = "job_id = ?"
        if only_unfinished:
            where += f" AND status NOT IN {_FINISHED_SQL}"
        rows = self._write(f"UPDATE jobs SET {', '.join(assignments)} WHERE {where} "
                           f"{_RETURNING}", (*params, job_id))
        return _record(rows[0]) if rows else None

    def update(self, job_id: str, /, **fields: Any) -> JobRecord | None:
        """Set ``fields`` (and ``updated_at``); None for an unknown job.

        A status that becomes finished sets ``finished_at`` (kept if it was finished
        already); an unfinished status clears it.
        """
        return self._set(job_id, fields, only_unfinished=False)

    def finish(self, job_id: str, status: JobStatus, /, *, error: str | None = None,
               **fields: Any) -> JobRecord | None:
        """End a job that has not ended: None when it had (or is unknown), so exactly one
        of two racing enders (a cancel and the worker, say) wins."""
        if status not in FINISHED:
            raise ValueError(f"finish needs a finished status, got {status!r}")
        return self._set(job_id, {**fields, "status": status, "error": error},
                         only_unfinished=True)

    def unfinished(self) -> builtins.list[JobRecord]:
        """Pending and running jobs, oldest first: what to run or resume at start-up."""
        return self._read(f"{_SELECT} WHERE status IN ('pending', 'running') "
                          "ORDER BY created_at, seq")

    def next_pending(self, volume: str | None) -> JobRecord | None:
        """The oldest pending job of one serialisation key (None: the fetch jobs)."""
        found = self._read(f"{_SELECT} WHERE status = 'pending' AND volume IS ? "
                           "ORDER BY created_at, seq LIMIT 1", (volume,))
        return found[0] if found else None

    def list(self, *, offset: int = 0, limit: int = 100) -> builtins.list[JobRecord]:
        """Jobs oldest first (a page does not shift when new jobs arrive)."""
        if offset < 0 or limit < 0:
            raise ValueError(f"offset and limit must not be negative, got {offset}, {limit}")
        return self._read(f"{_SELECT} ORDER BY created_at, seq LIMIT ? OFFSET ?",
                          (limit, offset))

    def prune(self, *, older_than: float = 7 * 86400, now: datetime | None = None) -> int:
        """Delete finished jobs that finished more than ``older_than`` seconds before
        ``now``; returns how many. Unfinished jobs are never pruned."""
        cutoff = timestamp((now or datetime.now(UTC)) - timedelta(seconds=older_than))
        with self._lock:
            try:
                cursor = self._db.execute(
                    f"DELETE FROM jobs WHERE finished_at < ? AND status IN {_FINISHED_SQL}",
                    (cutoff,))
            except sqlite3.Error as exc:
                raise JobStoreError(f"{self.path}: {exc}") from None
            return cursor.rowcount

    def close(self) -> None:
        with self._lock:
            self._db.close()
