"""The API listener (``api.listen``): the predecessor's HTTP job API, on aiohttp.

Why it exists: infrastructure automation drives the daemon over HTTP (DESIGN.md, "HTTP
job API"). This module is the stack those routes sit on; the job, cache and upload
routes are added with ``add_routes`` before ``start``. Middlewares, outermost first
(after the listener's own: write deadline, ``X-Request-ID``, the one error shape and the
head limit, see ``watcher.http.listener`` and ``watcher.http.replies``):

1. Observation: ``api_requests_total{route,method,status}``, the duration histogram by
   route template, and a server span joined to the caller's ``traceparent``.
2. Auth (``watcher.http.auth``): everything under ``/api/`` and ``/volumes/`` needs a
   token or a verified client certificate; ``/health``, ``/healthz``, ``/livez`` and
   ``/metrics`` need none. No credentials and a wrong token are both 401 with
   ``WWW-Authenticate: Bearer``, as the predecessor answers.
3. Body limit: a body over ``max_body_bytes`` (1 MiB) is 413 before the handler runs,
   and ``client_max_size`` holds a body without a Content-Length to the same limit.
   A handler marked with ``streams_body`` (the upload-content route) is exempt: it reads
   ``request.content`` in chunks, which ``client_max_size`` does not limit.

Served here: the health routes (``watcher.http.probes.Health``), ``/metrics`` and
``GET /api/v1/openapi.json`` (the document ``openapi.json`` next to this module).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable
from http import HTTPStatus
from importlib import resources
from typing import TypeVar

from aiohttp import web
from aiohttp.typedefs import Handler
from opentelemetry import propagate
from opentelemetry.trace import SpanKind

from watcher import telemetry
from watcher.http import auth
from watcher.http.listener import Listener
from watcher.http.probes import Health, metrics
from watcher.http.replies import JSON, REQUEST_ID_KEY, ApiError
from watcher.settings import HTTP_TUNING, ApiSettings, HttpTuning

OPEN_PATHS = frozenset({"/health", "/healthz", "/livez", "/metrics"})
PROTECTED_PREFIXES = ("/api/", "/volumes/")
CHALLENGE = {"WWW-Authenticate": "Bearer"}

H = TypeVar("H", bound=Callable[..., Awaitable[web.StreamResponse]])


def streams_body(handler: H) -> H:
    """Mark a route handler that reads its body as a stream, past the 1 MiB limit."""
    handler.streams_body = True  # type: ignore[attr-defined]
    return handler


class ApiServer:
    """The API on ``settings.listen``, authenticated by ``settings``' tokens and client CA."""

    def __init__(self, settings: ApiSettings, *, tuning: HttpTuning = HTTP_TUNING,
                 health: Health | None = None) -> None:
        self._settings = settings
        self._tuning = tuning
        self._tokens = auth.Tokens(settings.tokens_file)
        self._listener = Listener(
            settings.listen, name="api", tuning=tuning, client_max_size=tuning.max_body_bytes,
            middlewares=[self._observe, self._auth, self._body_limit],
            ssl_context=auth.server_context(settings))
        self._openapi = resources.files("watcher.http").joinpath("openapi.json").read_bytes()
        router = self._listener.app.router
        health = health if health is not None else Health()
        for path in ("/health", "/healthz", "/livez"):
            router.add_get(path, health.handle)
        router.add_get("/metrics", metrics)
        router.add_get("/api/v1/openapi.json", self._openapi_document)

    @property
    def port(self) -> int:
        return self._listener.port

    def add_routes(self, routes: Iterable[web.AbstractRouteDef]) -> None:
        """Routes to serve besides the health ones; before ``start()``."""
        self._listener.app.router.add_routes(routes)

    def reload_tokens(self) -> bool:
        """Re-read ``api.tokens_file`` (on SIGHUP); a failed read keeps the current tokens."""
        return self._tokens.reload()

    async def start(self) -> None:
        await self._listener.start()

    async def stop(self) -> None:
        await self._listener.stop()

    async def _openapi_document(self, _request: web.Request) -> web.Response:
        return web.Response(body=self._openapi, content_type=JSON)

    # --- middlewares, outermost first

    @web.middleware
    async def _observe(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        started = time.perf_counter()
        status = 500
        with telemetry.tracer.start_as_current_span(
                f"{request.method} {route}", context=propagate.extract(request.headers),
                kind=SpanKind.SERVER) as span:
            span.set_attribute("http.request.method", request.method)
            span.set_attribute("http.route", route)
            span.set_attribute("request_id", request[REQUEST_ID_KEY])
            try:
                response = await handler(request)
                status = response.status
                return response
            except (ApiError, web.HTTPException) as exc:
                status = exc.status  # shaped into the answer by the listener
                raise
            finally:
                span.set_attribute("http.response.status_code", status)
                telemetry.api_requests.labels(route=route, method=request.method,
                                              status=str(status)).inc()
                telemetry.api_request_seconds.labels(route=route).observe(
                    time.perf_counter() - started)

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in OPEN_PATHS or not request.path.startswith(PROTECTED_PREFIXES):
            return await handler(request)
        verdict = auth.judge(request, self._tokens)
        if verdict is auth.Verdict.NO_CREDENTIALS:
            raise ApiError(HTTPStatus.UNAUTHORIZED,
                           "send Authorization: Bearer <token>, X-API-Token: <token> "
                           "or a client certificate", headers=CHALLENGE)
        if verdict is auth.Verdict.WRONG_CREDENTIALS:
            raise ApiError(HTTPStatus.UNAUTHORIZED, "the token is not valid",
                           headers=CHALLENGE)
        return await handler(request)

    @web.middleware
    async def _body_limit(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        limit = self._tuning.max_body_bytes
        streams = getattr(request.match_info.handler, "streams_body", False)
        if not streams and request.content_length is not None and request.content_length > limit:
            raise ApiError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                           f"the body has {request.content_length} bytes; at most {limit} "
                           "are accepted")
        return await handler(request)

