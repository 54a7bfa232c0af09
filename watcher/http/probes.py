"""The probe listener (``http.listen``): ``/metrics`` for Prometheus, ``/healthz`` and
``/readyz`` for probes.

Why it exists: these three read-only routes are what systemd, Kubernetes-style probes
and Prometheus ask of every host, API or not, so they have their own listener (loopback
by default) that needs no credentials. GET and HEAD only; any other method is 405.
Its connection limits are ``watcher.http.listener``'s.

``/healthz`` answers as long as the event loop runs (a wedged loop is the watchdog's
business). ``/readyz`` asks the daemon's ``readiness`` callable, which reports one boolean
per dependency; any false one makes it 503 and names the failing checks.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from http import HTTPStatus

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from watcher import telemetry
from watcher.http.listener import Listener
from watcher.settings import HTTP_TUNING

Readiness = Callable[[], dict[str, bool]]

JSON = "application/json"
NO_STORE = {"Cache-Control": "no-store"}


class HttpServer:
    """Serves ``/metrics``, ``/healthz`` and ``/readyz`` on ``listen`` ("host:port")."""

    def __init__(
        self,
        listen: str,
        readiness: Readiness,
        *,
        header_timeout: float = HTTP_TUNING.header_timeout,
        write_timeout: float = HTTP_TUNING.write_timeout,
        max_header_bytes: int = HTTP_TUNING.max_header_bytes,
        max_connections: int = HTTP_TUNING.max_connections,
    ) -> None:
        self._readiness = readiness
        self._log = telemetry.get_logger(component="http")
        tuning = replace(HTTP_TUNING, header_timeout=header_timeout, write_timeout=write_timeout,
                         max_header_bytes=max_header_bytes, max_connections=max_connections)
        self._listener = Listener(listen, name="probes", tuning=tuning, client_max_size=0,
                                  one_request_per_connection=True)
        for path, handler in (("/metrics", metrics), ("/healthz", healthz),
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
            body = {"ready": False, "checks": {}, "failing": [], "error": str(exc)}
            return json_response(body, HTTPStatus.SERVICE_UNAVAILABLE)
        failing = [name for name, ok in checks.items() if not ok]
        status = HTTPStatus.SERVICE_UNAVAILABLE if failing else HTTPStatus.OK
        return json_response({"ready": not failing, "checks": checks, "failing": failing},
                             status)


async def metrics(_request: web.Request) -> web.Response:
    """The daemon's Prometheus registry (prefix ``volume_watcher_``)."""
    return web.Response(body=generate_latest(telemetry.REGISTRY),
                        headers={"Content-Type": CONTENT_TYPE_LATEST, **NO_STORE})


async def healthz(_request: web.Request) -> web.Response:
    """Alive: answered as long as the event loop runs."""
    return json_response({"status": "ok"})


def json_response(value: object, status: int = HTTPStatus.OK,
                  headers: dict[str, str] | None = None) -> web.Response:
    """``value`` as compact JSON, ``Content-Type: application/json`` exactly, never cached."""
    body = json.dumps(value, separators=(",", ":")).encode() + b"\n"
    return web.Response(body=body, status=status, content_type=JSON,
                        headers={**NO_STORE, **(headers or {})})


async def _method_not_allowed(_request: web.Request) -> web.Response:
    return web.Response(status=HTTPStatus.METHOD_NOT_ALLOWED, text="method not allowed\n",
                        headers={"Allow": "GET, HEAD", **NO_STORE})
