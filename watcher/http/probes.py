"""The probe listener (``http.listen``): ``/metrics`` for Prometheus, ``/healthz`` (also
as ``/health`` and ``/livez``, the predecessor's names) and ``/readyz`` for probes.

Why it exists: these three read-only routes are what systemd, Kubernetes-style probes
and Prometheus ask of every host, API or not, so they have their own listener (loopback
by default) that needs no credentials. GET and HEAD only; any other method is 405.
Its connection limits, request ids and error shape are ``watcher.http.listener``'s.

``/health``, ``/healthz`` and ``/livez``, here and on the API listener (``Health``),
answer 200 as long as the event loop runs (a wedged loop is the watchdog's business),
with the predecessor's body: ``healthy``, or ``degraded`` while ``/readyz`` would fail,
so a deploy script's ``grep -q healthy`` keeps working. ``/readyz`` asks the daemon's
``readiness`` callable, which reports one boolean per dependency; any false one makes it
503, in the error shape, with the checks and the failing ones named.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from http import HTTPStatus

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from watcher import __version__, telemetry
from watcher.core.api_shapes import error_body, health_body
from watcher.http.listener import Listener
from watcher.http.replies import NO_STORE, ApiError, json_response
from watcher.settings import HTTP_TUNING

Readiness = Callable[[], dict[str, bool]]


class Health:
    """The health routes' answer: alive, and ``healthy`` or ``degraded`` by ``readiness``
    (none: always healthy); the uptime counts from this object's creation."""

    def __init__(self, readiness: Readiness | None = None) -> None:
        self._readiness = readiness
        self._started = time.monotonic()

    def ready(self) -> bool:
        if self._readiness is None:
            return True
        try:
            return all(self._readiness().values())
        except Exception:
            telemetry.get_logger(component="http").exception("readiness check failed")
            return False

    async def handle(self, _request: web.Request) -> web.Response:
        return json_response(health_body(ready=self.ready(), now=datetime.now(UTC),
                                         uptime=time.monotonic() - self._started,
                                         version=__version__))


class HttpServer:
    """Serves ``/metrics``, the health routes and ``/readyz`` on ``listen`` ("host:port")."""

    def __init__(
        self,
        listen: str,
        readiness: Readiness,
        *,
        header_timeout: float = HTTP_TUNING.header_timeout,
        write_timeout: float = HTTP_TUNING.write_timeout,
        max_header_bytes: int = HTTP_TUNING.max_header_bytes,
        max_connections: int = HTTP_TUNING.max_connections,
        health: Health | None = None,
    ) -> None:
        self._readiness = readiness
        self._health = health if health is not None else Health(readiness)
        self._log = telemetry.get_logger(component="http")
        tuning = replace(HTTP_TUNING, header_timeout=header_timeout, write_timeout=write_timeout,
                         max_header_bytes=max_header_bytes, max_connections=max_connections)
        self._listener = Listener(listen, name="probes", tuning=tuning, client_max_size=0,
                                  one_request_per_connection=True)
        for path, handler in (("/metrics", metrics), ("/healthz", self._health.handle),
                              ("/health", self._health.handle), ("/livez", self._health.handle),
                              ("/readyz", self._ready)):
            self._listener.app.router.add_get(path, handler)
            self._listener.app.router.add_route("*", path, _method_not_allowed)

    @property
    def port(self) -> int:
        """The port actually bound (useful when ``listen`` asked for port 0)."""
        return self._listener.port

    async def start(self) -> None:
        await self._listener.start()

    async def stop(self) -> None:
        """Stop listening and drop open connections (a scrape in flight gets a second)."""
        await self._listener.stop()

    async def _ready(self, _request: web.Request) -> web.Response:
        try:
            checks = {name: bool(ok) for name, ok in self._readiness().items()}
        except Exception as exc:
            self._log.exception("readiness check failed")
            body = {**error_body(HTTPStatus.SERVICE_UNAVAILABLE,
                                 f"the readiness check failed: {exc}", "not ready"),
                    "ready": False, "checks": {}, "failing": []}
            return json_response(body, HTTPStatus.SERVICE_UNAVAILABLE)
        failing = [name for name, ok in checks.items() if not ok]
        if not failing:
            return json_response({"ready": True, "checks": checks, "failing": []})
        body = {**error_body(HTTPStatus.SERVICE_UNAVAILABLE,
                             "failing: " + ", ".join(failing), "not ready"),
                "ready": False, "checks": checks, "failing": failing}
        return json_response(body, HTTPStatus.SERVICE_UNAVAILABLE)


async def metrics(_request: web.Request) -> web.Response:
    """The daemon's Prometheus registry (prefix ``volume_watcher_``)."""
    return web.Response(body=generate_latest(telemetry.REGISTRY),
                        headers={"Content-Type": CONTENT_TYPE_LATEST, **NO_STORE})


async def _method_not_allowed(request: web.Request) -> web.Response:
    raise ApiError(HTTPStatus.METHOD_NOT_ALLOWED,
                   f"{request.method} is not allowed on {request.path}",
                   headers={"Allow": "GET, HEAD"})
