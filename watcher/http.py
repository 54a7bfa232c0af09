"""The daemon's HTTP face: ``/metrics`` for Prometheus, ``/healthz`` and ``/readyz`` for probes.

Three read-only endpoints do not justify a web framework, so this is a small HTTP/1.1
server on ``asyncio.start_server``: one request per connection (answered with
``Connection: close``), GET and HEAD only.

It faces whatever can reach the listen address, and a probe that goes unanswered gets
the daemon restarted, so no client may keep it from answering. Each connection costs
at most a bounded time and size:

- the complete request head must arrive within ``header_timeout`` (2 s) of the accept,
  however it trickles in, in at most ``max_header_bytes``; a real probe or scrape sends
  its head in one packet;
- the response must be written and the connection closed within ``write_timeout``
  (5 s) of starting to answer, or the connection is aborted;
- at most ``max_connections`` (1024) are open. When that many are, a newcomer is let in
  by dropping the oldest connection still waiting for its request head (the one that
  has cost the longest), not refused: holding connections open only evicts the
  holder's own. The cap is also kept to half the process's descriptor limit, so that
  HTTP clients cannot take the descriptors that images, volumes and libvirt need (the
  systemd unit sets ``LimitNOFILE=16384``).

``/healthz`` answers as long as the event loop runs (a wedged loop is the watchdog's
business). ``/readyz`` asks the daemon's ``readiness`` callable, which reports one boolean
per dependency; any false one makes it 503 and names the failing checks.
"""

from __future__ import annotations

import asyncio
import json
import resource
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from watcher import telemetry
from watcher.core.address import parse_listen

Readiness = Callable[[], dict[str, bool]]

_JSON = "application/json"
_TEXT = "text/plain; charset=utf-8"


@dataclass
class _Connection:
    writer: asyncio.StreamWriter
    header_deadline: float
    """Loop time by which the complete request head must have arrived."""
    write_deadline: float | None = None
    """Loop time by which the response must be written and the connection closed."""

    @property
    def awaiting_head(self) -> bool:
        return self.write_deadline is None


class HttpServer:
    """Serves ``/metrics``, ``/healthz`` and ``/readyz`` on ``listen`` ("host:port")."""

    def __init__(
        self,
        listen: str,
        readiness: Readiness,
        *,
        header_timeout: float = 2.0,
        write_timeout: float = 5.0,
        max_header_bytes: int = 8192,
        max_connections: int = 1024,
    ) -> None:
        self._host, self._port = parse_listen(listen)
        self._readiness = readiness
        self._header_timeout = header_timeout
        self._write_timeout = write_timeout
        self._max_header_bytes = max_header_bytes
        self._max_connections = max_connections
        self._server: asyncio.Server | None = None
        # Counted against the cap, in accept order (the oldest first).
        self._open: dict[asyncio.Task[None], _Connection] = {}
        # Every handler still running, evicted ones included, for stop() to wait on.
        self._tasks: set[asyncio.Task[None]] = set()
        self._transports = _Transports()
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
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and self._max_connections > soft // 2:
            self._log.warning("http connection cap lowered to half the descriptor limit",
                              wanted=self._max_connections, cap=soft // 2, nofile=soft)
            self._max_connections = max(1, soft // 2)
        # A deep accept queue: a burst of connects must not overflow it and leave a probe
        # waiting a second for its SYN to be retried.
        loop = asyncio.get_running_loop()

        def protocol() -> _TrackedProtocol:
            reader = asyncio.StreamReader(limit=self._max_header_bytes, loop=loop)
            return _TrackedProtocol(reader, self._handle, self._transports)

        self._server = await loop.create_server(protocol, self._host, self._port, backlog=1024)
        self._log.info("http server listening", host=self._host or "*", port=self.port,
                       max_connections=self._max_connections)

    async def stop(self) -> None:
        """Stop listening and drop open connections (a scrape in flight is cut short)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        # Every connection, also one accepted just now whose handler has not run yet; a
        # few loop turns let accepts already under way reach the protocol, which aborts them.
        self._transports.closed = True
        for _ in range(3):
            await asyncio.sleep(0)
        for transport in list(self._transports):
            transport.abort()
        for task in list(self._tasks):
            self._drop(task)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await server.wait_closed()
        # Aborted transports close their sockets on the next loop turns.
        for _ in range(3):
            await asyncio.sleep(0)

    def _drop(self, task: asyncio.Task[None]) -> None:
        conn = self._open.pop(task, None)
        if conn is not None:
            conn.writer.transport.abort()
        task.cancel()

    def _evict_oldest_awaiting_head(self) -> bool:
        oldest = next((t for t, c in self._open.items() if c.awaiting_head), None)
        if oldest is None:
            return False
        self._drop(oldest)
        return True

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        if self._server is None:
            writer.transport.abort()  # accepted while stopping
            return
        if len(self._open) >= self._max_connections and not self._evict_oldest_awaiting_head():
            writer.transport.abort()  # every slot is answering: they end within write_timeout
            return
        conn = _Connection(writer, header_deadline=loop.time() + self._header_timeout)
        self._open[task] = conn
        self._tasks.add(task)
        try:
            await self._serve_one(reader, conn)
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError):
            pass  # the client went away or was too slow: nothing to answer
        except asyncio.CancelledError:
            # Evicted or stopping. Not re-raised: nobody awaits this task but stop(), and
            # asyncio's stream callback would log a cancelled handler as an error.
            pass
        except Exception:
            self._log.exception("http request failed")
        finally:
            self._open.pop(task, None)
            await self._close(conn)
            self._tasks.discard(task)

    async def _close(self, conn: _Connection) -> None:
        """Close gracefully (sending what is buffered) by the write deadline, else abort."""
        writer = conn.writer
        writer.close()
        deadline = conn.write_deadline
        if deadline is None:
            deadline = asyncio.get_running_loop().time() + self._write_timeout
        try:
            async with asyncio.timeout_at(deadline):
                await writer.wait_closed()
        except (Exception, asyncio.CancelledError):
            writer.transport.abort()

    async def _serve_one(self, reader: asyncio.StreamReader, conn: _Connection) -> None:
        try:
            async with asyncio.timeout_at(conn.header_deadline):
                head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.LimitOverrunError, ValueError):
            await self._respond(conn, HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                                b"request head too large\n", _TEXT)
            return
        except asyncio.IncompleteReadError as exc:
            if exc.partial.strip():
                await self._respond(conn, HTTPStatus.BAD_REQUEST, b"bad request\n", _TEXT)
            return

        request_line = head.split(b"\r\n", 1)[0]
        parts = request_line.split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1.") or not parts[1].startswith(b"/"):
            await self._respond(conn, HTTPStatus.BAD_REQUEST, b"bad request\n", _TEXT)
            return
        method = parts[0].decode("ascii", "replace")
        path = parts[1].decode("ascii", "replace").split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            await self._respond(conn, HTTPStatus.METHOD_NOT_ALLOWED, b"method not allowed\n",
                                _TEXT, extra={"Allow": "GET, HEAD"})
            return
        status, body, content_type = self._route(path)
        await self._respond(conn, status, body, content_type, head_only=method == "HEAD")

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
        conn: _Connection,
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
        conn.write_deadline = asyncio.get_running_loop().time() + self._write_timeout
        conn.writer.write(head.encode("ascii") + (b"" if head_only else body))
        async with asyncio.timeout_at(conn.write_deadline):
            await conn.writer.drain()


def _json(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode() + b"\n"


class _Transports(set[asyncio.Transport]):
    """The server's open connections, handler or not; ``closed`` once it stops."""

    closed = False


class _TrackedProtocol(asyncio.StreamReaderProtocol):
    """A stream protocol that keeps its transport in the server's set while it is open."""

    def __init__(self, reader: asyncio.StreamReader, handle: Any,
                 transports: _Transports) -> None:
        super().__init__(reader, handle)
        self._tracked = transports
        self._own: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        if self._tracked.closed:
            transport.abort()  # accepted while the server stops
            return
        self._own = transport
        self._tracked.add(transport)
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._own is not None:
            self._tracked.discard(self._own)
        super().connection_lost(exc)
