"""The routes of the HTTP job API (DESIGN.md, "HTTP job API"), aliases included.

Why it exists: each route turns a request into a call of the jobs service
(``watcher.jobs``) or the cache, and its result into the contract's JSON; validation is
``watcher.core.api_requests``', errors become ``ApiError`` (shaped by
``watcher.http.api``). Nothing here decides about volumes or images.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Collection, Iterator
from http import HTTPStatus
from typing import Any

from aiohttp import web
from opentelemetry import propagate

from watcher import telemetry
from watcher.cache import Cache, EntryPinned
from watcher.core.api_requests import (
    BadRequest,
    BodyTooLarge,
    check_cache_key,
    check_job_id,
    parse_fetch,
    parse_paging,
    parse_provision,
    parse_upload_headers,
)
from watcher.core.errors import PermanentError, Refused, TemporaryError
from watcher.http.api import streams_body
from watcher.http.replies import JSON, NO_STORE, ApiError, json_response
from watcher.jobs import ApiJobs, JobEnded, JobNotFound
from watcher.jobs.upload import Uploader, UploadRefused

MAX_UPLOAD_BYTES = 4 * 1024**3
"""Largest ``upload-content`` body: a seed ISO is a few hundred KiB."""
STATUS_FRESHNESS = 0.05
"""Seconds a running job's status body is served again before it is read anew."""
STATUS_BODIES_KEPT = 1024
NAMED_HOSTS_LOGGED = 256
"""Distinct foreign ``image_url`` hosts logged (once each); more are not remembered."""

log = telemetry.get_logger(component="http", listener="api")


class JobRoutes:
    """Handlers bound to the daemon's jobs service, cache and policies."""

    def __init__(self, jobs: ApiJobs, cache: Cache, uploader: Uploader, s3_endpoint: str,
                 keep_images: Callable[[], Collection[str]]) -> None:
        self.jobs = jobs
        self.cache = cache
        self.uploader = uploader
        self.s3_endpoint = s3_endpoint
        self.keep_images = keep_images
        """Names of the policy images whose current versions must stay cached."""
        self._named_hosts: set[str] = set()
        self._bodies: OrderedDict[str, tuple[float, int, bytes]] = OrderedDict()
        """Job status bodies served lately, by job id: (good until, version, body)."""

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/api/v1/jobs", self.create_job),
            web.post("/api/v1/provision", self.create_job),
            web.get("/api/v1/jobs/{job_id}", self.get_job, allow_head=False),
            web.get("/api/v1/status/{job_id}", self.get_job, allow_head=False),
            web.post("/api/v1/jobs/{job_id}/cancel", self.cancel_job),
            web.delete("/api/v1/cancel/{job_id}", self.cancel_job),
            web.get("/api/v1/cache/images", self.list_images, allow_head=False),
            web.post("/api/v1/cache/fetch", self.fetch_image),
            web.delete("/api/v1/cache/images/{sha256}", self.delete_image),
            web.put("/volumes/upload-content", self.upload_content),
        ]

    # ---- jobs -----------------------------------------------------------------------------

    async def create_job(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        with _bad_request():
            provision = parse_provision(body, self.s3_endpoint)
        self._note_host(provision.named_host)
        record = self.jobs.submit_provision(provision, _traceparent(request))
        return json_response({"job_id": record.job_id}, HTTPStatus.ACCEPTED)

    async def get_job(self, request: web.Request) -> web.Response:
        job_id = _job_id(request)
        now = time.monotonic()
        version = self.jobs.version(job_id)
        cached = self._bodies.get(job_id)
        if cached is not None and cached[0] > now and cached[1] == version:
            return web.Response(body=cached[2], content_type=JSON, headers=NO_STORE)
        record = self.jobs.get(job_id)
        if record is None:
            raise _unknown_job(request)
        response = json_response(record.to_api())
        assert isinstance(response.body, bytes)
        # Many clients polling one job read the same bytes: a finished job's never change;
        # a running job's progress is at most STATUS_FRESHNESS old, and a new status or
        # stage (a new version) is seen at once.
        expires = math.inf if record.finished else now + STATUS_FRESHNESS
        self._bodies[job_id] = (expires, version, response.body)
        self._bodies.move_to_end(job_id)
        while len(self._bodies) > STATUS_BODIES_KEPT:
            self._bodies.popitem(last=False)
        return response

    async def cancel_job(self, request: web.Request) -> web.Response:
        job_id = _job_id(request)
        try:
            record = self.jobs.cancel(job_id)
        except JobNotFound:
            raise _unknown_job(request) from None
        except JobEnded as exc:
            raise ApiError(HTTPStatus.BAD_REQUEST, str(exc), error="failed to cancel job") from None
        return json_response({"status": "cancelled", "job_id": record.job_id})

    def _note_host(self, host: str | None) -> None:
        """Say once per host that an ``image_url`` names a host other than the endpoint."""
        known = self._named_hosts
        if host is None or host in known or len(known) >= NAMED_HOSTS_LOGGED:
            return
        self._named_hosts.add(host)
        log.info("image_url names another host; the object is read from the S3 endpoint",
                 named_host=host, s3_endpoint=self.s3_endpoint)

    # ---- cache ----------------------------------------------------------------------------

    async def list_images(self, request: web.Request) -> web.Response:
        with _bad_request():
            offset, limit = parse_paging(request.query)
        entries = sorted(self.cache.entries(), key=lambda e: (e.created_at, e.digest))
        page = entries[offset:offset + limit]
        # Downloads refused by a stale sidecar are not images yet: listed apart (when any).
        held = [{"image": r.image, "size": r.size, "checksum": r.digest,
                 "source": f"s3://{r.bucket}/{r.key}", "held_at": r.held_at,
                 "expires_at": r.expires_at} for r in self.cache.held.records()]
        return json_response({
            "images": [{"path": str(e.path), "size": e.size, "checksum": e.digest,
                        "image": e.image, "source": f"s3://{e.bucket}/{e.key}",
                        "mod_time": e.created_at} for e in page],
            "count": len(entries), "offset": offset, "limit": limit,
            **({"held": held} if held else {}),
        })

    async def fetch_image(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        with _bad_request():
            fetch = parse_fetch(body, self.s3_endpoint)
        self._note_host(fetch.named_host)
        record = self.jobs.submit_fetch(fetch, _traceparent(request))
        return json_response({"job_id": record.job_id}, HTTPStatus.ACCEPTED)

    async def delete_image(self, request: web.Request) -> web.Response:
        with _bad_request():
            digest = check_cache_key(request.match_info["sha256"])
        if self.cache.get(digest) is None:
            raise ApiError(HTTPStatus.NOT_FOUND, f"no cached image {digest}")
        if digest in self.jobs.digests_in_use():
            raise ApiError(HTTPStatus.CONFLICT,
                           f"{digest} is being written onto a volume by a running job")
        try:
            removed = await self.cache.remove(digest, frozenset(self.keep_images()))
        except EntryPinned as exc:
            raise ApiError(HTTPStatus.CONFLICT, f"{exc}; a policy needs it "
                           "(it would be fetched again at once)") from None
        if removed is None:
            raise ApiError(HTTPStatus.NOT_FOUND, f"no cached image {digest}")
        return json_response({"status": "deleted", "key": digest})

    # ---- upload ---------------------------------------------------------------------------

    @streams_body
    async def upload_content(self, request: web.Request) -> web.Response:
        with _bad_request():
            upload = parse_upload_headers(request.headers, max_bytes=MAX_UPLOAD_BYTES)
        try:
            written = await self.uploader.upload(upload, _chunks(request))
        except UploadRefused as exc:
            raise ApiError(exc.status, str(exc)) from None
        except Refused as exc:
            raise ApiError(HTTPStatus.CONFLICT, str(exc)) from None
        except TemporaryError as exc:
            raise ApiError(HTTPStatus.SERVICE_UNAVAILABLE, str(exc)) from None
        except PermanentError as exc:
            raise ApiError(HTTPStatus.CONFLICT, str(exc)) from None
        return json_response({"status": "uploaded", "pool": upload.pool,
                              "volume": upload.volume_name, "bytes": written})


@contextlib.contextmanager
def _bad_request() -> Iterator[None]:
    """Turn a ``BadRequest`` raised inside into a 400."""
    try:
        yield
    except BodyTooLarge as exc:
        raise ApiError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, str(exc)) from None
    except BadRequest as exc:
        raise ApiError(HTTPStatus.BAD_REQUEST, str(exc)) from None


async def _json_body(request: web.Request) -> Any:
    if not request.can_read_body:
        raise ApiError(HTTPStatus.BAD_REQUEST, "a JSON body is required")
    raw = await request.read()
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"the body is not valid JSON: {exc}") from None


def _job_id(request: web.Request) -> str:
    try:
        return check_job_id(request.match_info["job_id"])
    except BadRequest:
        raise _unknown_job(request) from None


def _unknown_job(request: web.Request) -> ApiError:
    return ApiError(HTTPStatus.NOT_FOUND, f"no job {request.match_info['job_id'][:64]!r}",
                    error="job not found")


def _traceparent(request: web.Request) -> str | None:
    """The trace the job joins: the current span's, else the caller's header."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier.get("traceparent") or request.headers.get("traceparent")


async def _chunks(request: web.Request) -> AsyncIterator[bytes]:
    async for chunk in request.content.iter_chunked(256 * 1024):
        yield chunk
