"""Metrics, tracer and logger handles shared by every floor above the core.

Defined once, here, so jobs and adapters record what happened without knowing how it is
exported: ``watcher.runtime.observability`` decides where logs and spans go and
``watcher.http`` serves ``REGISTRY`` on ``/metrics``. The registry is our own (not the
process-global default) so tests can read exact values.
"""

from __future__ import annotations

from typing import Any

import structlog
from opentelemetry import trace
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

from watcher import __version__
from watcher.core.errors import REJECTION_REASONS

REGISTRY = CollectorRegistry(auto_describe=True)
_P = "volume_watcher_"

events_received = Counter(
    _P + "events_received", "Events received, by source (amqp, libvirt) and type.",
    ["source", "type"], registry=REGISTRY)
events_dead_lettered = Counter(
    _P + "events_dead_lettered", "AMQP messages sent to the dead-letter queue, by reason.",
    ["reason"], registry=REGISTRY)
downloads = Counter(
    _P + "downloads", "Image downloads finished, by result (ok, failed).",
    ["result"], registry=REGISTRY)
download_seconds = Histogram(
    _P + "download_duration_seconds", "Wall time of successful image downloads from S3.",
    buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600), registry=REGISTRY)
download_bytes = Counter(
    _P + "download_bytes", "Bytes received from S3 for image downloads.", registry=REGISTRY)
cache_hits = Counter(
    _P + "cache_hits", "Image requests answered from the cache.", registry=REGISTRY)
cache_misses = Counter(
    _P + "cache_misses", "Image requests that needed a download.", registry=REGISTRY)
cache_evictions = Counter(
    _P + "cache_evictions", "Cache entries removed by eviction or prune.", registry=REGISTRY)
cache_bytes = Gauge(
    _P + "cache_bytes",
    "Bytes used by cache entries and by downloads held for a corrected sidecar (what "
    "cache.max_size bounds).", registry=REGISTRY)
cache_entries = Gauge(
    _P + "cache_entries", "Number of cache entries.", registry=REGISTRY)
images_rejected = Counter(
    _P + "images_rejected", "Images refused by verification or inspection, by reason.",
    ["reason"], registry=REGISTRY)
reprovisions = Counter(
    _P + "reprovisions", "Reprovision jobs finished, by result (provisioned, failed, retry).",
    ["result"], registry=REGISTRY)
reprovision_seconds = Histogram(
    _P + "reprovision_duration_seconds", "Wall time of reprovision jobs, request to result.",
    buckets=(5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600), registry=REGISTRY)
written_bytes = Counter(
    _P + "written_bytes", "Virtual bytes written onto root volumes.", registry=REGISTRY)
jobs_in_progress = Gauge(
    _P + "jobs_in_progress", "Jobs running now, by kind (download, reprovision).",
    ["kind"], registry=REGISTRY)
write_progress = Gauge(
    _P + "write_progress_ratio", "Progress of the volume write running for a domain (0..1).",
    ["domain"], registry=REGISTRY)
write_size = Gauge(
    _P + "write_size_bytes", "Virtual bytes of the volume write running for a domain.",
    ["domain"], registry=REGISTRY)
domains_outdated = Gauge(
    _P + "domains_outdated",
    "Domains whose provisioned digest is older than the cached current version of their image.",
    registry=REGISTRY)
DOMAIN_STATES = ("reprovision", "provisioning", "provisioned", "failed", "none", "malformed",
                 "unmatched")
"""A domain's metadata element as ``status`` reads it (``none``: no element; ``unmatched``:
a request or write under way that no rule of this watcher matches)."""
domains = Gauge(
    _P + "domains",
    "Domains a policy matches, by the state of their metadata element, and tagged domains no "
    "rule matches (state unmatched), as of the last sweep.",
    ["state"], registry=REGISTRY)
last_amqp_message = Gauge(
    _P + "last_amqp_message_timestamp_seconds",
    "Unix time of the last AMQP message, or of the start of consuming before the first "
    "(alert on time() minus this).", registry=REGISTRY)
connection_up = Gauge(
    _P + "connection_up", "1 when the connection to a service is up, by service (libvirt, amqp).",
    ["service"], registry=REGISTRY)
policy_reloads = Counter(
    _P + "policy_reloads", "Policy loads and reloads, by result (ok, failed).",
    ["result"], registry=REGISTRY)
policy_images = Gauge(
    _P + "policy_images", "Images defined by the loaded policies.", registry=REGISTRY)

build_info = Gauge(
    _P + "build_info", "Always 1; the version label says which release is running.",
    ["version"], registry=REGISTRY)
build_info.labels(version=__version__).set(1)
# The standard process metrics under this daemon's prefix, as every metric here:
# volume_watcher_process_cpu_seconds_total, ..._resident_memory_bytes, ..._open_fds...
ProcessCollector(namespace="volume_watcher", registry=REGISTRY)

unexpected_errors = Counter(
    _P + "unexpected_errors",
    "Unexpected exceptions in one unit of background work, by unit (warm, reconcile, sweep, "
    "reprovision, watchdog, reload, api); each is logged with its traceback and retried at the "
    "next event or interval.",
    ["unit"], registry=REGISTRY)
UNITS = ("warm", "reconcile", "sweep", "reprovision", "watchdog", "reload", "api")
for _unit in UNITS:
    unexpected_errors.labels(unit=_unit)  # present from the start, so increase() sees the first

# Every label value known up front exists from the start at 0, so an alert on increase()
# sees the first event after a restart.
for _result in ("ok", "failed"):
    downloads.labels(result=_result)
    policy_reloads.labels(result=_result)
for _result in ("provisioned", "failed", "retry"):
    reprovisions.labels(result=_result)
for _reason in ("malformed", "permanent", "temporary", "unexpected"):
    events_dead_lettered.labels(reason=_reason)
for _reason in REJECTION_REASONS:
    images_rejected.labels(reason=_reason)
for _kind in ("download", "reprovision"):
    jobs_in_progress.labels(kind=_kind)
for _state in DOMAIN_STATES:
    domains.labels(state=_state)

tracer = trace.get_tracer("libvirt-volume-watcher")

# ---- the HTTP job API ----------------------------------------------------------------------
api_requests = Counter(
    _P + "api_requests",
    "API requests answered, by route template (unmatched: no route), method and status.",
    ["route", "method", "status"], registry=REGISTRY)
api_request_seconds = Histogram(
    _P + "api_request_duration_seconds", "Time to answer an API request, by route template.",
    ["route"], buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5, 30),
    registry=REGISTRY)
API_JOB_KINDS = ("provision", "fetch")
API_JOB_RESULTS = ("completed", "failed", "cancelled")
api_jobs = Counter(
    _P + "api_jobs", "API jobs finished, by kind (provision, fetch) and result.",
    ["kind", "result"], registry=REGISTRY)
api_job_seconds = Histogram(
    _P + "api_job_duration_seconds", "Wall time of API jobs, started to finished, by kind.",
    ["kind"], buckets=(0.1, 0.5, 1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600),
    registry=REGISTRY)
for _kind in API_JOB_KINDS:
    api_job_seconds.labels(kind=_kind)
    for _result in API_JOB_RESULTS:
        api_jobs.labels(kind=_kind, result=_result)
jobs_in_progress.labels(kind="api")


def report_unexpected(log: Any, unit: str, **context: Any) -> None:
    """Log the exception being handled with its traceback, once, and count it by ``unit``.

    For ``except Exception`` blocks around one unit of background work: the unit fails,
    the daemon goes on, and the next event or interval tries the work again.
    """
    unexpected_errors.labels(unit=unit).inc()
    log.exception("unexpected error; the daemon carries on and retries at the next event "
                  "or interval", unit=unit, **context)


def get_logger(**context: Any) -> Any:
    """A structlog logger bound to ``context``; output format is set up by the runtime."""
    return structlog.get_logger("watcher", **context)
