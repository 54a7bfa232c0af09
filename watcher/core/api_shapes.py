"""The JSON the HTTP job API answers with, in the predecessor's exact shapes.

Why it exists: clients written for the predecessor (deploy scripts that grep ``/health``
for ``healthy``, polling loops that stop on ``completed`` or ``failed``, strict decoders
generated from its Go types) read these bodies field by field. DESIGN.md's compatibility
rule fixes them; this module is the one place that builds them, from plain values, so
each shape is tested by tables without a server. Pure: no I/O, no clock of its own.

- Errors: ``{"error": <short text>, "message": <details>, "code": <status>}``.
- Health: ``{"status": "healthy"|"degraded", "timestamp", "version", "uptime"}``, the
  uptime as Go's ``time.Duration`` prints it, to the second (``1h2m3s``).
- A job: a field with no value is left out, never ``null``; the status and stage words
  are the predecessor's; a cancelled job reads ``failed`` with ``"error": "cancelled"``
  and ``"cancelled": true``, so loops waiting for ``completed|failed`` end.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any, Literal

Stage = Literal["initializing", "checking_cache", "downloading", "creating_volume",
                "converting", "finalizing"]
STAGES: tuple[Stage, ...] = ("initializing", "checking_cache", "downloading",
                             "creating_volume", "converting", "finalizing")
"""A job's ``progress.stage``, in the order a provision job passes through them."""
ApiStatus = Literal["pending", "running", "completed", "failed"]
CANCELLED = "cancelled"
"""The ``error`` of a cancelled job (whose ``status`` is ``failed``)."""
INVALID_REQUEST = "invalid request"

SHORT_TEXTS: Mapping[int, str] = {
    400: INVALID_REQUEST,
    401: "unauthorized",
    403: "forbidden",
    404: "not found",
    405: "method not allowed",
    409: "conflict",
    413: "request entity too large",
    431: "request header fields too large",
    500: "internal error",
    503: "service unavailable",
    504: "gateway timeout",
}
"""The ``error`` of each status, when the answer has no more specific one."""


def short_text(status: int) -> str:
    """``error`` for ``status``: the table's, else the status phrase in lower case."""
    if status in SHORT_TEXTS:
        return SHORT_TEXTS[status]
    try:
        return HTTPStatus(status).phrase.lower()
    except ValueError:
        return "error"


def error_body(status: int, message: str, error: str | None = None) -> dict[str, Any]:
    """The body of every 4xx and 5xx answer."""
    return {"error": error or short_text(status), "message": message, "code": int(status)}


def go_duration(seconds: float) -> str:
    """``seconds`` as Go prints a ``time.Duration`` rounded to the second: ``0s``, ``59s``,
    ``1m0s``, ``1h2m3s``, ``49h0m0s`` (hours do not roll over into days)."""
    total = max(0, int(seconds + 0.5))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def rfc3339(moment: datetime) -> str:
    """UTC with a ``Z`` and milliseconds: ``2026-01-31T12:00:00.000Z``."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def health_body(*, ready: bool, now: datetime, uptime: float, version: str) -> dict[str, Any]:
    """The body of ``/health``, ``/healthz`` and ``/livez``: always answered 200 while the
    process runs; ``degraded`` while ``/readyz`` would fail."""
    return {"status": "healthy" if ready else "degraded", "timestamp": rfc3339(now),
            "version": version, "uptime": go_duration(uptime)}


def job_body(*, job_id: str, status: str, stage: str, percent: float, bytes_processed: int,
             bytes_total: int, eta_sec: float | None, error: str | None,
             correlation_id: str | None, cache_hit: bool | None, image_path: str | None,
             volume_path: str | None, created_at: str, updated_at: str) -> dict[str, Any]:
    """``GET /api/v1/jobs/{id}``: the stored job in the predecessor's words.

    ``status`` is the job's own (``cancelled`` included); the body says ``failed`` for a
    cancelled one, with the reason the job store kept (what state the volume was left in)
    as ``message``. Only a failed job has an ``error``; a note on a job still running (a
    retry after a temporary failure) is its ``message``.
    """
    progress: dict[str, Any] = {"stage": stage, "percent": percent,
                                "bytes_processed": bytes_processed, "bytes_total": bytes_total}
    if eta_sec is not None:
        progress["eta_sec"] = eta_sec
    body: dict[str, Any] = {"job_id": job_id, "status": status, "progress": progress}
    if status == CANCELLED:
        body.update(status="failed", error=CANCELLED, cancelled=True)
        if error:
            body["message"] = error
    elif status == "failed":
        body["error"] = error or "failed"
    elif error:
        body["message"] = error  # a running job's retry, say; not yet an error
    optional = {"correlation_id": correlation_id, "cache_hit": cache_hit,
                "image_path": image_path, "volume_path": volume_path}
    body.update({name: value for name, value in optional.items() if value is not None})
    body["created_at"] = created_at
    body["updated_at"] = updated_at
    return body
