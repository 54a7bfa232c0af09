"""One HTTP listener: an aiohttp application on one address, with what a connection may cost.

Why it exists: the probe listener and the API listener face whatever can reach their
addresses, and a probe that goes unanswered gets the daemon restarted, so no client may
keep either from answering. aiohttp parses HTTP and speaks TLS; this module adds the
limits it lacks or leaves to a reverse proxy, the same on both listeners:

- **Head deadline.** aiohttp's ``keepalive_timeout`` (``HttpTuning.header_timeout``,
  2 s) closes a connection that has not sent a complete request head within that time
  of its accept or of its last response, however the head trickles in: the timer starts
  at ``connection_made`` and bytes received do not move it. A TLS handshake gets the
  same time (``ssl_handshake_timeout``).
- **Head size.** A head over ``max_header_bytes`` (8 KiB) gets 431: a longer line is
  refused by aiohttp's parser, which parses at most 64 header lines, so an unfinished
  head costs at most half a MiB for 2 s; the whole head of a parsed request is checked
  against the same limit.
- **Write deadline.** The response is written within ``write_timeout`` (5 s) or the
  connection is aborted: a client that stops reading frees its slot.
- **Connection cap.** aiohttp accepts without limit, so each listener caps its open
  connections at ``max_connections`` (1024), and at a quarter of the process's descriptor
  limit, so that both listeners together never hold more than half of it and HTTP
  clients cannot take the descriptors that images, volumes and libvirt need (the unit
  sets ``LimitNOFILE=16384``). When the cap is reached, a newcomer is let in by closing
  the oldest connection that is not being answered (idle, or still sending its head: the
  one that has cost the longest), not refused: holding connections open only evicts the
  holder's own. Only when every connection is being answered is the newcomer aborted;
  those end within the write deadline.

Every answer, of a handler or of aiohttp's own parser, carries ``X-Request-ID`` and is in
the one error shape when it is an error (``watcher.http.replies``): the listener puts
those middlewares first, around its head limit and the application's own.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import ssl
from collections.abc import Iterable
from http import HTTPStatus
from typing import Any

from aiohttp import HttpVersion11, web, web_protocol
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.http_parser import RawRequestMessage
from aiohttp.typedefs import Handler, Middleware

from watcher import telemetry
from watcher.core.address import parse_listen
from watcher.http.replies import protocol_error, request_id, shape_errors
from watcher.settings import HTTP_TUNING, HttpTuning

_PROTOCOL_LOG = logging.getLogger("watcher.http.protocol")
"""aiohttp's own error log: what escapes the middlewares (a bug of ours), never a client's
malformed request, which is answered 4xx and not logged (see ``_RequestHandler``)."""

# aiohttp answers a request it could not parse with an HTTP/1.0 status line, having no
# version to go by (its placeholder request says 1.0). Both listeners speak HTTP/1.1, and
# say so in that 400 too, as probes and the attack tests expect.
if isinstance(getattr(web_protocol, "ERROR", None), RawRequestMessage):
    web_protocol.ERROR = web_protocol.ERROR._replace(version=HttpVersion11)


class Listener:
    """``app`` served on ``listen`` ("host:port") by one ``AppRunner`` and one site."""

    def __init__(
        self,
        listen: str,
        *,
        name: str,
        middlewares: Iterable[Middleware] = (),
        client_max_size: int = 1024**2,
        ssl_context: ssl.SSLContext | None = None,
        tuning: HttpTuning = HTTP_TUNING,
        one_request_per_connection: bool = False,
    ) -> None:
        self._host, self._port = parse_listen(listen)
        self._name = name
        self._close_after_response = one_request_per_connection
        self._tuning = tuning
        self._ssl_context = ssl_context
        self._answering: set[object] = set()
        """The connections (aiohttp's protocol objects) whose request is being answered."""
        self.app = web.Application(
            middlewares=[self._write_deadline, request_id, shape_errors, self._head_limit,
                         *middlewares],
            client_max_size=client_max_size)
        """Add routes before ``start()``."""
        self._runner: web.AppRunner | None = None
        self._site: _GatedSite | None = None
        self._log = telemetry.get_logger(component="http", listener=name)

    @property
    def port(self) -> int:
        """The port actually bound (useful when ``listen`` asked for port 0)."""
        if self._site is None or self._site.bound is None:
            raise RuntimeError(f"the {self._name} listener is not started")
        return self._site.bound

    async def start(self) -> None:
        if self._runner is not None:
            return
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        cap = self._tuning.max_connections
        if soft != resource.RLIM_INFINITY and cap > soft // 4:
            self._log.warning("http connection cap lowered to a quarter of the descriptor limit",
                              wanted=cap, cap=soft // 4, nofile=soft)
            cap = max(1, soft // 4)
        line_limit = self._tuning.max_header_bytes
        handler_args: dict[str, Any] = {
            "access_log": None, "logger": _PROTOCOL_LOG,
            "keepalive_timeout": self._tuning.header_timeout,
            "max_line_size": line_limit, "max_field_size": line_limit, "max_headers": 64}
        runner = web.AppRunner(self.app, shutdown_timeout=self._tuning.stop_timeout,
                               **handler_args)
        await runner.setup()
        site = _GatedSite(runner, self._host, self._port, ssl_context=self._ssl_context,
                          cap=cap, answering=self._answering, handler_args=handler_args,
                          handshake_timeout=self._tuning.header_timeout)
        await site.start()
        self._runner, self._site = runner, site
        self._log.info("http server listening", host=self._host or "*", port=self.port,
                       tls=self._ssl_context is not None, max_connections=cap)

    async def stop(self) -> None:
        """Stop listening, then close every connection (a request in flight gets
        ``stop_timeout`` to finish)."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        await runner.cleanup()
        self._site = None

    @web.middleware
    async def _write_deadline(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Outermost: marks the connection as being answered, and writes the response (all
        other middlewares done) within the write deadline."""
        connection = request.protocol
        self._answering.add(connection)
        try:
            response = await handler(request)
            if self._close_after_response:
                response.force_close()  # probes: answered, then closed, as before
            if isinstance(response, web.Response) and not response.prepared:
                try:
                    async with asyncio.timeout(self._tuning.write_timeout):
                        await response.prepare(request)
                        await response.write_eof()
                except TimeoutError:
                    if request.transport is not None:
                        request.transport.abort()
            return response
        finally:
            self._answering.discard(connection)
            if isinstance(connection, _RequestHandler):
                connection.answered += 1

    @web.middleware
    async def _head_limit(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        size = len(request.raw_path) + sum(len(k) + len(v) + 4 for k, v in request.raw_headers)
        if size > self._tuning.max_header_bytes:
            raise web.HTTPRequestHeaderFieldsTooLarge(
                text=f"the request head is over {self._tuning.max_header_bytes} bytes")
        return await handler(request)


class _GatedSite(web.TCPSite):
    """A ``TCPSite`` whose accepts pass the connection cap (see the module docstring)."""

    def __init__(self, runner: web.AppRunner, host: str | None, port: int, *,
                 ssl_context: ssl.SSLContext | None, cap: int, answering: set[object],
                 handler_args: dict[str, Any], handshake_timeout: float) -> None:
        super().__init__(runner, host, port, ssl_context=ssl_context, backlog=1024)
        self.cap = cap
        self.answering = answering
        self.handler_args = handler_args
        self.handshake_timeout = handshake_timeout
        self.bound: int | None = None

    async def start(self) -> None:
        # TCPSite.start, with our protocol factory and the handshake deadline; the deep
        # accept queue keeps a burst of connects from leaving a probe's SYN to be retried.
        await web.BaseSite.start(self)
        loop = asyncio.get_running_loop()
        self._server = server = await loop.create_server(
            self._admit, self._host, self._port, ssl=self._ssl_context, backlog=self._backlog,
            ssl_handshake_timeout=self.handshake_timeout if self._ssl_context else None)
        self.bound = int(server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        self.bound = None
        await super().stop()

    def _admit(self) -> asyncio.BaseProtocol:
        server = self._runner.server
        assert server is not None
        open_now = [c for c in server.connections if c.transport is not None]  # accept order
        if len(open_now) >= self.cap:
            # Evictable: nothing being answered and no complete request waiting to be; a
            # probe whose head came with its connect is never the one dropped.
            oldest = next((c for c in open_now if c not in self.answering
                           and getattr(c, "parsed", 0) <= getattr(c, "answered", 0)), None)
            if oldest is None:
                return _Refused()
            oldest.force_close()
        # What the runner's server() makes, but with 431 for an oversized head.
        return _RequestHandler(server, loop=asyncio.get_running_loop(), **self.handler_args)


class _RequestHandler(web_protocol.RequestHandler):
    """aiohttp's connection handler, answering a head line over the limit with 431, every
    refusal of its parser in the error shape, and not logging a client's malformed request
    as an error of ours."""

    parsed = 0
    """Complete request heads received on this connection."""
    answered = 0
    """Requests whose answer was written."""

    def data_received(self, data: bytes) -> None:
        before = self._request_count
        super().data_received(data)
        self.parsed += self._request_count - before

    def log_exception(self, *args: Any, **kw: Any) -> None:
        if not isinstance(kw.get("exc_info"), HttpProcessingError):
            super().log_exception(*args, **kw)

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if isinstance(exc, LineTooLong):
            status = HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE
            message = "a request head line is longer than the limit"
        elif isinstance(exc, HttpProcessingError):
            message = f"the request is not valid HTTP: {exc.message}"
        else:  # escaped every middleware: a bug of ours, or the handler timed out
            self.log_exception("error answering a request", exc_info=exc)
            message = "unexpected error while answering"
        if request.writer.output_size > 0:
            raise ConnectionError("a response was already sent; no error can follow it")
        return protocol_error(status, message or HTTPStatus(status).phrase)


class _Refused(asyncio.Protocol):
    """Every connection is being answered: this one is closed at once."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.abort()
