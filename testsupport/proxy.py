"""A relay in front of one real service whose connections a test breaks on purpose.

The services are shared by every test run on the host, so a test never stops RabbitMQ,
the S3 server or libvirtd to see how the watcher copes with an outage. It points the
watcher at this relay instead and breaks only the watcher's own connections: all of them
at once (``cut``), all of them and every new one for a while (``outage``, or ``down`` until
``up``), one response after so many bytes (``cut_response_after``, a flaky link), or one
response held mid-way until the test lets it go (``hold_response_after``). It relays TCP,
or a Unix socket (libvirt's ``qemu+unix:///system?socket=PATH``), in plain threads, so it
works the same for code on an event loop, in threads, and in child processes.

With ``record_http`` it also reads the HTTP request lines going upstream (``requests``),
so a fleet test counts each host's GETs of an object (``gets``) and times the downloads
of the objects it ``watched`` (``downloads``, ``peak_concurrency``).
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import socket
import struct
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

Address = tuple[str, int] | str
"""``(host, port)`` for TCP, or the path of a Unix socket."""

CHUNK = 65536
_REQUEST_LINE = re.compile(rb"(GET|HEAD|PUT|POST|DELETE) (/[^ ?]*)\S* HTTP/1\.1\r\n")
_TAIL = 1024
"""Request bytes kept between reads so a request line split across two reads is still seen."""


def address_of(url: str) -> tuple[str, int]:
    """The TCP address a URL (amqp://, http://) points at, for ``Proxy(upstream=...)``."""
    parts = urllib.parse.urlsplit(url)
    assert parts.hostname is not None and parts.port is not None, url
    return parts.hostname, parts.port


def _connect(address: Address) -> socket.socket:
    if isinstance(address, str):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(address)
        except OSError:
            sock.close()
            raise
        return sock
    return socket.create_connection(address, timeout=10)


def _listen(address: Address) -> socket.socket:
    if isinstance(address, str):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(address)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(address)
        sock.listen()
        return sock
    return socket.create_server(address)


@dataclass
class Download:
    """One GET of a watched object: from its request line until its bytes went through."""

    path: str
    started: float
    """``time.monotonic()`` when the request line went upstream."""
    size: int
    received: int = 0
    ended: float | None = None


def peak_concurrency(downloads: Iterable[Download]) -> int:
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


@dataclass(eq=False)
class _Link:
    """One client connection and its upstream twin."""

    client: socket.socket
    server: socket.socket
    sent: int = 0
    """Response bytes relayed on this connection."""
    hold_sent: int | None = None
    """Response bytes relayed since the request that armed the hold, while holding."""
    cut: bool = False
    request_tail: bytes = b""
    """The end of the last request bytes, for ``record_http``."""
    download: Download | None = None
    """The watched download this connection carries now, for ``record_http``."""


class Proxy:
    """Relays ``listen`` to ``upstream`` until closed; see the module docstring."""

    def __init__(self, upstream: Address, *, listen: Address = ("127.0.0.1", 0),
                 record_http: bool = False) -> None:
        self.upstream = upstream
        self.record_http = record_http
        self.requests: list[tuple[float, str, str]] = []
        """``(time.monotonic(), method, path)`` of every request, with ``record_http``."""
        self.watched: dict[str, int] = {}
        """Object path (``/bucket/key``) -> size: GETs of these become ``downloads``."""
        self.downloads: list[Download] = []
        self.cuts = 0
        """Responses cut by ``cut_response_after`` so far."""
        self.bytes_to_client = 0
        self.held = threading.Event()
        """Set once a response has been held by ``hold_response_after``."""
        self._lock = threading.Lock()
        self._links: set[_Link] = set()
        self._refusing = threading.Event()
        self._released = threading.Event()
        self._closing = threading.Event()
        self._cut_after: int | None = None
        self._cut_reset = True
        self._on_cut: Callable[[], None] | None = None
        self._hold_request: bytes | None = None
        self._hold_after = 0
        self._threads: list[threading.Thread] = []
        self._listener = _listen(listen)
        self._listener.settimeout(0.1)
        self.address: Address = (listen if isinstance(listen, str)
                                 else self._listener.getsockname()[:2])
        self._spawn(self._accept_loop)

    # ---- where clients connect ----------------------------------------------------------

    @property
    def port(self) -> int:
        assert not isinstance(self.address, str), "a Unix-socket proxy has no port"
        return int(self.address[1])

    def url(self, url: str) -> str:
        """``url`` (amqp://, http://) with its host and port replaced by this proxy's."""
        parts = urllib.parse.urlsplit(url)
        credentials = parts.netloc.rpartition("@")[0]
        netloc = f"{credentials}@" if credentials else ""
        return parts._replace(netloc=f"{netloc}127.0.0.1:{self.port}").geturl()

    # ---- breaking things ----------------------------------------------------------------

    def cut(self) -> None:
        """Close every open connection now, as a network fault would; new ones still pass."""
        with self._lock:
            links = list(self._links)
        for link in links:
            link.cut = True
            for sock in (link.client, link.server):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def down(self) -> None:
        """The link is gone until ``up``: connections cut, new ones closed at once."""
        self._refusing.set()
        self.cut()

    def up(self) -> None:
        self._refusing.clear()

    @contextlib.contextmanager
    def outage(self) -> Iterator[None]:
        """Inside the block the service is gone (``down``), after it ``up`` again."""
        self.down()
        try:
            yield
        finally:
            self.up()

    def cut_response_after(self, nbytes: int, *, reset: bool = True,
                           on_cut: Callable[[], None] | None = None) -> None:
        """Once: end the first connection whose responses reach ``nbytes`` right there.

        ``reset`` ends it with an RST (a dropped NAT entry, a crashed box), else a FIN.
        """
        with self._lock:
            self._cut_after, self._cut_reset, self._on_cut = nbytes, reset, on_cut

    def hold_response_after(self, request_contains: bytes, nbytes: int) -> None:
        """Stop the response to a request containing ``request_contains`` after its first
        ``nbytes`` bytes until ``release()``; ``held`` is set when that happens."""
        with self._lock:
            self._hold_request, self._hold_after = request_contains, nbytes

    def release(self) -> None:
        self._released.set()

    def gets(self, path: str) -> int:
        """GET requests of ``path`` (``/bucket/key``) so far, with ``record_http``."""
        return sum(1 for _t, method, p in list(self.requests) if method == "GET" and p == path)

    def close(self) -> None:
        self._closing.set()
        self._released.set()
        self.cut()
        for thread in self._threads:
            thread.join(timeout=2)
        self._listener.close()
        if isinstance(self.address, str):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.address)

    # ---- relaying -----------------------------------------------------------------------

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self._refusing.is_set():
                client.close()
                continue
            try:
                server = _connect(self.upstream)
            except OSError:
                client.close()
                continue
            client.settimeout(None)
            server.settimeout(None)
            link = _Link(client, server)
            with self._lock:
                self._links.add(link)
            self._spawn(self._relay, link)

    def _relay(self, link: _Link) -> None:
        """Both directions of one connection in one thread, so a cut really ends it."""
        try:
            while not self._closing.is_set() and not link.cut:
                readable, _, _ = select.select([link.client, link.server], [], [], 0.1)
                if link.client in readable:
                    request = link.client.recv(CHUNK)
                    if not request:
                        return
                    if self.record_http:
                        self._note_requests(link, request)
                    with self._lock:
                        if (self._hold_request is not None and self._hold_request in request
                                and not self._released.is_set()):
                            link.hold_sent = 0
                    link.server.sendall(request)
                if link.server in readable and not self._forward_response(link):
                    return
        except OSError:
            pass
        finally:
            with self._lock:
                self._links.discard(link)
            link.client.close()
            link.server.close()

    def _forward_response(self, link: _Link) -> bool:
        """Relay one chunk of response; False when the connection is to end."""
        limit = CHUNK
        if link.hold_sent is not None:
            limit = min(limit, self._hold_after - link.hold_sent)
        response = link.server.recv(limit)
        if not response:
            return False
        with self._lock:
            cut_now = (self._cut_after is not None
                       and link.sent + len(response) >= self._cut_after)
            if cut_now:
                assert self._cut_after is not None
                response = response[: self._cut_after - link.sent]
                self._cut_after = None
                self.cuts += 1
            self.bytes_to_client += len(response)
        link.client.sendall(response)
        link.sent += len(response)
        download = link.download
        if download is not None and download.ended is None:
            download.received += len(response)
            if download.received >= download.size:
                download.ended = time.monotonic()
        if cut_now:
            if self._on_cut is not None:
                self._on_cut()
            if self._cut_reset:
                link.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                       struct.pack("ii", 1, 0))
            return False
        if link.hold_sent is not None:
            link.hold_sent += len(response)
            if link.hold_sent >= self._hold_after:
                self.held.set()
                while not self._released.wait(0.1):
                    if self._closing.is_set() or link.cut:
                        return False
                link.hold_sent = None
        return True

    def _note_requests(self, link: _Link, data: bytes) -> None:
        """Record the request lines in ``data``; a GET of a watched path starts a download."""
        tail = link.request_tail
        window = tail + data
        for match in _REQUEST_LINE.finditer(window):
            if match.end() <= len(tail):
                continue  # seen with the previous read
            now = time.monotonic()
            method, path = match.group(1).decode(), match.group(2).decode()
            self.requests.append((now, method, path))
            link.download = None
            if method == "GET" and path in self.watched:
                link.download = Download(path, now, self.watched[path])
                self.downloads.append(link.download)
        link.request_tail = window[-_TAIL:]
