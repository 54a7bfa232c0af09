"""The API listener (``api.listen``): the predecessor's HTTP job API, on aiohttp.

Why it exists: infrastructure automation drives the daemon over HTTP (DESIGN.md, "HTTP
job API"). This module is the stack those routes sit on; the job, cache and upload
routes are added with ``add_routes`` before ``start``. Middlewares, outermost first
(after the listener's own write deadline and head limit, see ``watcher.http.listener``):

1. ``X-Request-ID``: the client's when it is sane (1-128 of ``A-Za-z0-9._:-``), else a
   new uuid4; set on every response and kept in ``request[REQUEST_ID_KEY]``.
   Observation: ``api_requests_total{route,method,status}``, the duration histogram by
   route template, and a server span joined to the caller's ``traceparent``.
2. Error shaping, the one place that turns exceptions into ``{"error": "<code>",
   "details": "<text>"}``: ``ApiError`` from handlers, aiohttp's HTTP errors (404 for an
   unknown route, 405, 413...) and anything unexpected (a 500 whose details name the
   request id; the traceback goes to the log, never into the body).
3. Auth (``watcher.http.auth``): everything under ``/api/`` and ``/volumes/`` needs a
   token or a verified client certificate; ``/health``, ``/healthz``, ``/livez`` and
   ``/metrics`` need none.
4. Body limit: a body over ``max_body_bytes`` (1 MiB) is 413 before the handler runs,
   and ``client_max_size`` holds a body without a Content-Length to the same limit.
   A handler marked with ``streams_body`` (the upload-content route) is exempt: it reads
   ``request.content`` in chunks, which ``client_max_size`` does not limit.

Served now: the health routes, ``/metrics`` and ``GET /api/v1/openapi.json`` (the
document ``openapi.json`` next to this module).
"""

from __future__ import annotations

import re
import time
import uuid
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
from watcher.http.probes import JSON, healthz, json_response, metrics
from watcher.settings import HTTP_TUNING, ApiSettings, HttpTuning

OPEN_PATHS = frozenset({"/health", "/healthz", "/livez", "/metrics"})
PROTECTED_PREFIXES = ("/api/", "/volumes/")
REQUEST_ID = "X-Request-ID"
REQUEST_ID_KEY = web.RequestKey("request_id", str)
"""``request[REQUEST_ID_KEY]``: this request's id, for handlers and their log lines."""
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_CODES = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
    405: "method_not_allowed", 409: "conflict", 413: "body_too_large",
    431: "head_too_large", 500: "internal_error", 503: "unavailable",
}

log = telemetry.get_logger(component="http", listener="api")

H = TypeVar("H", bound=Callable[..., Awaitable[web.StreamResponse]])


class ApiError(Exception):
    """A handler's refusal: answered as ``{"error": code, "details": details}``."""

    def __init__(self, status: int, code: str, details: str) -> None:
        super().__init__(details)
        self.status, self.code, self.details = status, code, details


def streams_body(handler: H) -> H:
    """Mark a route handler that reads its body as a stream, past the 1 MiB limit."""
    handler.streams_body = True  # type: ignore[attr-defined]
    return handler


def error_response(status: int, code: str, details: str,
                   headers: dict[str, str] | None = None) -> web.Response:
    return json_response({"error": code, "details": details}, status, headers)


class ApiServer:
    """The API on ``settings.listen``, authenticated by ``settings``' tokens and client CA."""

    def __init__(self, settings: ApiSettings, *, tuning: HttpTuning = HTTP_TUNING) -> None:
        self._settings = settings
        self._tuning = tuning
        self._tokens = auth.Tokens(settings.tokens_file)
        self._listener = Listener(
            settings.listen, name="api", tuning=tuning, client_max_size=tuning.max_body_bytes,
            middlewares=[self._request_id, self._observe, self._errors, self._auth,
                         self._body_limit],
            ssl_context=auth.server_context(settings))
        self._openapi = resources.files("watcher.http").joinpath("openapi.json").read_bytes()
        router = self._listener.app.router
        for path in ("/health", "/healthz", "/livez"):
            router.add_get(path, healthz)
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
    async def _request_id(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        given = request.headers.get(REQUEST_ID, "")
        request_id = given if _SANE_REQUEST_ID.fullmatch(given) else str(uuid.uuid4())
        request[REQUEST_ID_KEY] = request_id
        response = await handler(request)
        response.headers[REQUEST_ID] = request_id
        return response

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
            finally:
                span.set_attribute("http.response.status_code", status)
                telemetry.api_requests.labels(route=route, method=request.method,
                                              status=str(status)).inc()
                telemetry.api_request_seconds.labels(route=route).observe(
                    time.perf_counter() - started)

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as exc:
            return error_response(exc.status, exc.code, exc.details)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise  # a redirect or a success raised as an exception
            return error_response(exc.status, _code(exc.status), _details(request, exc),
                                  _kept_headers(exc))
        except Exception:
            telemetry.unexpected_errors.labels(unit="api").inc()
            log.exception("api request failed", request_id=request[REQUEST_ID_KEY],
                          method=request.method, path=request.path)
            return error_response(HTTPStatus.INTERNAL_SERVER_ERROR, "internal_error",
                                  f"unexpected error; the daemon's log has it under "
                                  f"request_id {request[REQUEST_ID_KEY]}")

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in OPEN_PATHS or not request.path.startswith(PROTECTED_PREFIXES):
            return await handler(request)
        verdict = auth.judge(request, self._tokens)
        if verdict is auth.Verdict.NO_CREDENTIALS:
            raise ApiError(HTTPStatus.UNAUTHORIZED, "unauthorized",
                           "send Authorization: Bearer <token>, X-API-Token: <token> "
                           "or a client certificate")
        if verdict is auth.Verdict.WRONG_CREDENTIALS:
            raise ApiError(HTTPStatus.FORBIDDEN, "forbidden", "the token is not valid")
        return await handler(request)

    @web.middleware
    async def _body_limit(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        limit = self._tuning.max_body_bytes
        streams = getattr(request.match_info.handler, "streams_body", False)
        if not streams and request.content_length is not None and request.content_length > limit:
            raise ApiError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "body_too_large",
                           f"the body has {request.content_length} bytes; at most {limit} "
                           "are accepted")
        return await handler(request)


def _code(status: int) -> str:
    if status in _CODES:
        return _CODES[status]
    try:
        return HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
    except ValueError:
        return "error"


def _details(request: web.Request, exc: web.HTTPException) -> str:
    if exc.status == HTTPStatus.NOT_FOUND:
        return f"no route for {request.method} {request.path}"
    if exc.status == HTTPStatus.METHOD_NOT_ALLOWED:
        return f"{request.method} is not allowed on {request.path}"
    text = exc.text or exc.reason
    return re.sub(r"^\d{3}: ", "", text.strip())


def _kept_headers(exc: web.HTTPException) -> dict[str, str]:
    return {name: exc.headers[name] for name in ("Allow",) if name in exc.headers}
