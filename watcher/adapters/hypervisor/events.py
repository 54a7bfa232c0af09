"""The libvirt events connection: domain events in asyncio, keepalive, reconnects, sweeps.

Why it exists: libvirt pushes lifecycle and metadata-change events through an event loop
the application provides; ``libvirtaio`` plugs asyncio in. It must be registered once, on
the running loop, before a connection opens, and everything that adds or removes event
handles (opening and closing connections, registering callbacks, keepalive) must run on
that loop. Every other libvirt call blocks on an RPC, so ``call`` runs it in a worker
thread on the live connection; the job's calls and the daemon's queries go through it
instead of opening connections of their own.

A lost connection loses its events: after every reconnect the callbacks are registered
again and all shut-off domains are swept, so a request made during the outage is still
seen.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import libvirt

from watcher import telemetry
from watcher.adapters.hypervisor.base import (
    HypervisorUnavailable,
    ensure_event_impl,
    read_metadata,
    settle_event_impl,
    translate,
)
from watcher.core.domain import NAMESPACE, MalformedState, parse_state
from watcher.core.waiting import wait_any
from watcher.settings import LIBVIRT_TUNING, LibvirtTuning

T = TypeVar("T")

_LIFECYCLE_NAMES = {
    libvirt.VIR_DOMAIN_EVENT_DEFINED: "defined",
    libvirt.VIR_DOMAIN_EVENT_UNDEFINED: "undefined",
    libvirt.VIR_DOMAIN_EVENT_STARTED: "started",
    libvirt.VIR_DOMAIN_EVENT_SUSPENDED: "suspended",
    libvirt.VIR_DOMAIN_EVENT_RESUMED: "resumed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED: "stopped",
    libvirt.VIR_DOMAIN_EVENT_SHUTDOWN: "shutdown",
    libvirt.VIR_DOMAIN_EVENT_PMSUSPENDED: "pmsuspended",
    libvirt.VIR_DOMAIN_EVENT_CRASHED: "crashed",
}

class EventConnection:
    """A libvirt connection kept open, reporting the domains worth a look.

    ``on_domain`` receives a domain UUID on the event loop whenever a domain stopped, its
    watcher metadata changed, or a sweep found a reprovision request; it must not block.
    """

    def __init__(self, uri: str, on_domain: Callable[[str], None], log: Any = None,
                 *, tuning: LibvirtTuning = LIBVIRT_TUNING) -> None:
        self.uri = uri
        self.on_domain = on_domain
        self.log = log if log is not None else telemetry.get_logger(component="libvirt")
        self.tuning = tuning
        self._conn: Any = None
        self._callback_ids: list[int] = []
        self._lost = asyncio.Event()
        self._leases = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._dispatching = False
        self.connects = 0
        """Successful connections so far; more than one means a reconnect happened."""

    @property
    def connected(self) -> bool:
        return self._conn is not None and not self._lost.is_set()

    async def run(self, stop: asyncio.Event) -> None:
        """Stay connected until ``stop`` is set, reconnecting with jittered backoff.

        After ``stop`` no more domains are reported, but the connection stays open until
        every lease (a running job) is returned or the task is cancelled.
        """
        ensure_event_impl()
        backoff = self.tuning.reconnect_backoff
        delays = backoff.delays()
        attempt = 0
        telemetry.connection_up.labels(service="libvirt").set(0)
        try:
            while not stop.is_set():
                try:
                    self._connect()
                except libvirt.libvirtError as exc:
                    attempt += 1
                    delay = next(delays)
                    self.log.warning("libvirt connection failed; retrying", uri=self.uri,
                                     attempt=attempt, delay=round(delay, 2),
                                     error=str(exc.get_error_message() or exc))
                    await wait_any(stop, timeout=delay)
                    continue
                self.connects += 1
                self.log.info("connected to libvirt" if self.connects == 1
                              else "reconnected to libvirt", uri=self.uri,
                              failed_attempts=attempt)
                delays, attempt = backoff.delays(), 0
                self._dispatching = True
                try:
                    await self.sweep()
                except HypervisorUnavailable:
                    pass  # the connection broke again; _lost tells
                except Exception:
                    # One sweep failed; events still flow and the next reconcile sweeps again.
                    telemetry.report_unexpected(self.log, "sweep", uri=self.uri)
                await wait_any(stop, self._lost)
                self._dispatching = False
                if self._lost.is_set():
                    self.log.warning("libvirt connection lost; reconnecting", uri=self.uri)
                    await self._disconnect()
            while self._leases and not self._lost.is_set():
                await wait_any(self._idle, self._lost)
        finally:
            self._dispatching = False
            await self._disconnect()

    def _connect(self) -> None:
        """Open the connection and register every callback; runs on the loop thread."""
        conn = libvirt.open(self.uri)
        try:
            conn.setKeepAlive(self.tuning.keepalive_interval, self.tuning.keepalive_count)
            self._lost = asyncio.Event()
            conn.registerCloseCallback(self._on_close, None)
            self._callback_ids = [
                conn.domainEventRegisterAny(
                    None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None),
                conn.domainEventRegisterAny(
                    None, libvirt.VIR_DOMAIN_EVENT_ID_METADATA_CHANGE, self._on_metadata, None),
            ]
        except libvirt.libvirtError:
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()
            raise
        self._conn = conn
        telemetry.connection_up.labels(service="libvirt").set(1)

    async def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        telemetry.connection_up.labels(service="libvirt").set(0)
        if conn is None:
            return
        for callback_id in self._callback_ids:
            with contextlib.suppress(libvirt.libvirtError):
                conn.domainEventDeregisterAny(callback_id)
        self._callback_ids = []
        with contextlib.suppress(libvirt.libvirtError):
            conn.unregisterCloseCallback()
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()
        await settle_event_impl()

    # ---- callbacks, on the loop thread from libvirt's dispatch -------------------------

    def _on_close(self, conn: Any, reason: int, opaque: object) -> None:
        if conn is self._conn:
            self.log.warning("libvirt closed the connection", reason=reason)
            telemetry.connection_up.labels(service="libvirt").set(0)
            self._lost.set()

    def _on_lifecycle(self, conn: Any, dom: Any, event: int, detail: int,
                      opaque: object) -> None:
        telemetry.events_received.labels(
            source="libvirt", type=_LIFECYCLE_NAMES.get(event, f"lifecycle-{event}")).inc()
        if event == libvirt.VIR_DOMAIN_EVENT_STOPPED:
            self._report(dom)

    def _on_metadata(self, conn: Any, dom: Any, kind: int, namespace: str | None,
                     opaque: object) -> None:
        telemetry.events_received.labels(source="libvirt", type="metadata_change").inc()
        if kind == libvirt.VIR_DOMAIN_METADATA_ELEMENT and namespace == NAMESPACE:
            self._report(dom)

    def _report(self, dom: Any) -> None:
        # Called from libvirt's dispatch: an exception must not travel back into C.
        if not self._dispatching:
            return
        try:
            self.on_domain(str(dom.UUIDString()))
        except Exception:
            self.log.exception("domain event handler failed")

    # ---- using the connection ----------------------------------------------------------

    @contextlib.contextmanager
    def lease(self) -> Iterator[None]:
        """Hold the connection open across a stop request while a job uses it."""
        self._leases += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._leases -= 1
            if self._leases == 0:
                self._idle.set()

    async def call(self, operation: Callable[[Any], T]) -> T:
        """Run ``operation(connection)`` in a worker thread; libvirt errors are translated.

        Raises ``HypervisorUnavailable`` at once while disconnected.
        """
        conn = self._conn
        if conn is None or self._lost.is_set():
            raise HypervisorUnavailable(f"not connected to {self.uri}")

        def run() -> T:
            try:
                return operation(conn)
            except libvirt.libvirtError as exc:
                raise translate(exc) from exc

        return await asyncio.to_thread(run)

    async def sweep(self) -> int:
        """Report every shut-off domain whose metadata asks for a write; returns how many.

        Events sent while disconnected are lost; this finds what they would have said.
        """
        def requested(conn: Any) -> list[str]:
            flags = (libvirt.VIR_CONNECT_LIST_DOMAINS_INACTIVE
                     | libvirt.VIR_CONNECT_LIST_DOMAINS_PERSISTENT)
            found = []
            for dom in conn.listAllDomains(flags):
                try:
                    state = parse_state(read_metadata(dom))
                except MalformedState:
                    continue
                except libvirt.libvirtError as exc:
                    if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                        continue
                    raise
                if state is not None and state.is_request:
                    found.append(str(dom.UUIDString()))
            return found

        uuids = await self.call(requested)
        for uuid in uuids:
            self.on_domain(uuid)
        if uuids:
            self.log.info("sweep found reprovision requests", domains=len(uuids))
        return len(uuids)
