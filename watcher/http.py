"""The daemon's HTTP face: ``/metrics`` for Prometheus, ``/healthz`` and ``/readyz`` for probes.

Three read-only endpoints do not justify a web framework, so this is a small HTTP/1.1
server on ``asyncio.start_server``: one request per connection (answered with
``Connection: close``), GET and HEAD only. It faces whatever can reach the listen
address, so it bounds what a client can cost: a deadline for the request head, a limit
on its size, and a cap on open connections.

``/healthz`` answers as long as the event loop runs (a wedged loop is the watchdog's
business). ``/readyz`` asks the daemon's ``readiness`` callable, which reports one boolean
per dependency; any false one makes it 503 and names the failing checks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from http import HTTPStatus

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from watcher import telemetry

Readiness = Callable[[], dict[str, bool]]

_JSON = "application/json"
_TEXT = "text/plain; charset=utf-8"


def parse_listen(listen: str) -> tuple[str | None, int]:
    """``host:port``, ``[v6]:port`` or ``:port`` (all interfaces) → (host, port)."""
    host, sep, port_text = listen.strip().rpartition(":")
    if not sep or not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"listen address must be host:port, got {listen!r}")
    host = host.removeprefix("[").removesuffix("]")
    return (host or None), int(port_text)


class HttpServer:
    """Serves ``/metrics``, ``/healthz`` and ``/readyz`` on ``listen`` ("host:port")."""

    def __init__(
        self,
        listen: str,
        readiness: Readiness,
        *,
        read_timeout: float = 10.0,
        max_header_bytes: int = 8192,
        max_connections: int = 64,
    ) -> None:
        self._host, self._port = parse_listen(listen)
        self._readiness = readiness
        self._read_timeout = read_timeout
        self._max_header_bytes = max_header_bytes
        self._max_connections = max_connections
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._log = telemetry.get_logger(component="http")

    @property
    def port(self) -> int:
        """The port actually bound (useful when ``listen`` asked for port 0)."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("the HTTP server is not started")
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        if self._server is not None:
            return
        self._server = await asyncio.start_server(
            self._handle, self._host, self._port, limit=self._max_header_bytes)
        self._log.info("http server listening", host=self._host or "*", port=self.port)

    async def stop(self) -> None:
        """Stop listening and drop open connections (a scrape in flight is cut short)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.gather(*self._connections, return_exceptions=True)
        await server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._connections) >= self._max_connections:
            writer.close()
            return
        self._connections.add(task)
        try:
            await self._serve_one(reader, writer)
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError):
            pass  # the client went away or was too slow: nothing to answer
        except Exception:
            self._log.exception("http request failed")
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), timeout=1.0)

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(self._read_timeout):
                head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.LimitOverrunError, ValueError):
            await self._respond(writer, HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                                b"request head too large\n", _TEXT)
            return
        except asyncio.IncompleteReadError as exc:
            if exc.partial.strip():
                await self._respond(writer, HTTPStatus.BAD_REQUEST, b"bad request\n", _TEXT)
            return

        request_line = head.split(b"\r\n", 1)[0]
        parts = request_line.split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1.") or not parts[1].startswith(b"/"):
            await self._respond(writer, HTTPStatus.BAD_REQUEST, b"bad request\n", _TEXT)
            return
        method = parts[0].decode("ascii", "replace")
        path = parts[1].decode("ascii", "replace").split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            await self._respond(writer, HTTPStatus.METHOD_NOT_ALLOWED, b"method not allowed\n",
                                _TEXT, extra={"Allow": "GET, HEAD"})
            return
        status, body, content_type = self._route(path)
        await self._respond(writer, status, body, content_type, head_only=method == "HEAD")

    def _route(self, path: str) -> tuple[HTTPStatus, bytes, str]:
        if path == "/metrics":
            return HTTPStatus.OK, generate_latest(telemetry.REGISTRY), CONTENT_TYPE_LATEST
        if path == "/healthz":
            return HTTPStatus.OK, _json({"status": "ok"}), _JSON
        if path == "/readyz":
            return self._ready()
        return HTTPStatus.NOT_FOUND, b"not found\n", _TEXT

    def _ready(self) -> tuple[HTTPStatus, bytes, str]:
        try:
            checks = {name: bool(ok) for name, ok in self._readiness().items()}
        except Exception as exc:
            self._log.exception("readiness check failed")
            body = {"ready": False, "checks": {}, "failing": [], "error": str(exc)}
            return HTTPStatus.SERVICE_UNAVAILABLE, _json(body), _JSON
        failing = [name for name, ok in checks.items() if not ok]
        status = HTTPStatus.SERVICE_UNAVAILABLE if failing else HTTPStatus.OK
        return status, _json({"ready": not failing, "checks": checks, "failing": failing}), _JSON

    async def _respond(
        self,
        writer: asyncio.StreamWriter,
        status: HTTPStatus,
        body: bytes,
        content_type: str,
        *,
        head_only: bool = False,
        extra: dict[str, str] | None = None,
    ) -> None:
        headers = {
            "Content-Type": content_type,
            "Content-Length": str(len(body)),
            "Cache-Control": "no-store",
            "Connection": "close",
            **(extra or {}),
        }
        head = f"HTTP/1.1 {status.value} {status.phrase}\r\n" + "".join(
            f"{name}: {value}\r\n" for name, value in headers.items()) + "\r\n"
        writer.write(head.encode("ascii") + (b"" if head_only else body))
        async with asyncio.timeout(self._read_timeout):
            await writer.drain()


def _json(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode() + b"\n"
