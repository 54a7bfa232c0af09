"""The predecessor's JSON shapes, by tables: errors, health, uptime and job bodies."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from watcher.core.api_shapes import (
    STAGES,
    error_body,
    go_duration,
    health_body,
    job_body,
    short_text,
)


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0s"), (0.4, "0s"), (0.6, "1s"), (59, "59s"), (60, "1m0s"), (61, "1m1s"),
    (3599, "59m59s"), (3600, "1h0m0s"), (3723, "1h2m3s"), (49 * 3600, "49h0m0s"),
    (-5, "0s"),
])
def test_uptime_reads_as_go_prints_a_duration(seconds: float, text: str) -> None:
    assert go_duration(seconds) == text


@pytest.mark.parametrize(("status", "error"), [
    (400, "invalid request"), (401, "unauthorized"), (404, "not found"),
    (405, "method not allowed"), (409, "conflict"), (413, "request entity too large"),
    (431, "request header fields too large"), (500, "internal error"),
    (418, "i'm a teapot"), (599, "error"),
])
def test_every_status_has_a_short_error_text(status: int, error: str) -> None:
    assert short_text(status) == error
    assert error_body(status, "why") == {"error": error, "message": "why", "code": status}


def test_an_error_may_say_more_precisely_what_it_is() -> None:
    assert error_body(404, "no job 'x'", "job not found") == {
        "error": "job not found", "message": "no job 'x'", "code": 404}


def test_health_is_healthy_or_degraded_with_a_utc_timestamp() -> None:
    moment = datetime(2026, 1, 31, 13, 0, 0, 250000, tzinfo=timezone(timedelta(hours=1)))
    assert health_body(ready=True, now=moment, uptime=3723.2, version="1.2.3") == {
        "status": "healthy", "timestamp": "2026-01-31T12:00:00.250Z", "version": "1.2.3",
        "uptime": "1h2m3s"}
    assert health_body(ready=False, now=datetime.now(UTC), uptime=1,
                       version="1")["status"] == "degraded"


def _job(**fields: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "job_id": "j", "status": "pending", "stage": "initializing", "percent": 0.0,
        "bytes_processed": 0, "bytes_total": 0, "eta_sec": None, "error": None,
        "correlation_id": None, "cache_hit": None, "image_path": None, "volume_path": None,
        "created_at": "c", "updated_at": "u"}
    return job_body(**{**values, **fields})


def test_a_pending_job_has_no_field_without_a_value() -> None:
    assert _job() == {"job_id": "j", "status": "pending",
                      "progress": {"stage": "initializing", "percent": 0.0,
                                   "bytes_processed": 0, "bytes_total": 0},
                      "created_at": "c", "updated_at": "u"}


def test_a_completed_job_has_its_values_and_a_false_cache_hit_stays() -> None:
    body = _job(status="completed", stage="finalizing", percent=100.0, eta_sec=0.0,
                correlation_id="tf-1", cache_hit=False, image_path="/c/x",
                volume_path="/dev/vg/x")
    assert body["progress"]["eta_sec"] == 0.0
    assert (body["cache_hit"], body["correlation_id"], body["volume_path"]) == (
        False, "tf-1", "/dev/vg/x")
    assert "error" not in body and "cancelled" not in body


@pytest.mark.parametrize(("status", "error", "expected"), [
    ("failed", "no such object", {"status": "failed", "error": "no such object"}),
    ("failed", None, {"status": "failed", "error": "failed"}),
    ("cancelled", "volume p/v was not changed",
     {"status": "failed", "error": "cancelled", "cancelled": True,
      "message": "volume p/v was not changed"}),
    ("running", "retrying: S3 unreachable",
     {"status": "running", "message": "retrying: S3 unreachable"}),
])
def test_only_a_failed_job_has_an_error_and_a_cancelled_one_reads_failed(
    status: str, error: str | None, expected: dict[str, Any],
) -> None:
    body = _job(status=status, error=error)
    assert {key: body[key] for key in expected} == expected
    assert set(body) - set(expected) == {"job_id", "progress", "created_at", "updated_at"}


def test_the_stage_words_are_the_predecessors_in_order() -> None:
    assert STAGES == ("initializing", "checking_cache", "downloading", "creating_volume",
                      "converting", "finalizing")
