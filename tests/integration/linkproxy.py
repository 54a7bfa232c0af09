"""A TCP proxy per host link, for fleet tests on one machine.

Each watcher of a test fleet reaches RabbitMQ and S3 through its own proxies, so the test
can cut one host's network (every connection dropped, new ones refused) and restore it
while the others keep theirs. The S3 proxy also reads the HTTP request lines going
through it, so a test counts each host's GETs of an object and when each download ran.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass, field

_REQUEST_LINE = re.compile(rb"(GET|HEAD|PUT|POST|DELETE) (/[^ ?]*)\S* HTTP/1\.1\r\n")
_TAIL = 1024
"""Bytes kept between reads so a request line split across two reads is still seen."""


@dataclass
class Download:
    """One GET of a watched object: from the request line until its bytes went through."""

    path: str
    started: float
    size: int
    received: int = 0
    ended: float | None = None


@dataclass
class LinkProxy:
    """Forwards 127.0.0.1:<port> to 127.0.0.1:<target>; ``cut``/``restore`` the link."""

    target: int
    sniff_http: bool = False
    watched: dict[str, int] = field(default_factory=dict)
    """Object path (``/bucket/key``) -> size: GETs of these become ``downloads``."""
    requests: list[tuple[float, str, str]] = field(default_factory=list)
    downloads: list[Download] = field(default_factory=list)
    port: int = 0
    _cut: bool = False
    _server: asyncio.Server | None = None
    _links: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = field(default_factory=set)

    async def start(self) -> LinkProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def cut(self) -> None:
        """Drop every connection now and refuse new ones until ``restore``."""
        self._cut = True
        for client, upstream in list(self._links):
            for writer in (client, upstream):
                writer.transport.abort()

    def restore(self) -> None:
        self._cut = False

    def gets(self, path: str) -> int:
        return sum(1 for _t, method, p in self.requests if method == "GET" and p == path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._cut:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.transport.abort()
            return
        link = (writer, up_writer)
        self._links.add(link)
        current: list[Download] = []  # the download this connection carries, if any
        try:
            await asyncio.gather(self._pipe(reader, up_writer, current, upstream=True),
                                 self._pipe(up_reader, writer, current, upstream=False))
        finally:
            self._links.discard(link)
            for w in link:
                w.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    current: list[Download], *, upstream: bool) -> None:
        tail = b""
        try:
            while data := await reader.read(65536):
                if self.sniff_http and upstream:
                    tail = self._note_requests(tail, data, current)
                elif self.sniff_http and current:
                    download = current[0]
                    download.received += len(data)
                    if download.ended is None and download.received >= download.size:
                        download.ended = time.monotonic()
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.transport.abort()

    def _note_requests(self, tail: bytes, data: bytes, current: list[Download]) -> bytes:
        window = tail + data
        for match in _REQUEST_LINE.finditer(window):
            if match.end() <= len(tail):
                continue  # seen with the previous read
            now = time.monotonic()
            method, path = match.group(1).decode(), match.group(2).decode()
            self.requests.append((now, method, path))
            current.clear()
            if method == "GET" and path in self.watched:
                download = Download(path, now, self.watched[path])
                self.downloads.append(download)
                current.append(download)
        return window[-_TAIL:]


def peak_concurrency(downloads: list[Download]) -> int:
    """The most downloads that were running at the same moment."""
    edges = []
    for d in downloads:
        edges.append((d.started, 1))
        edges.append((d.ended if d.ended is not None else float("inf"), -1))
    running = peak = 0
    for _t, step in sorted(edges):
        running += step
        peak = max(peak, running)
    return peak
