"""The libvirt edge: domain events in asyncio, reconnects, and the calls a reprovision makes.

libvirt pushes lifecycle and metadata-change events through an event loop the application
provides; ``libvirtaio`` plugs asyncio in. It must be registered once, on the running loop,
before a connection opens, and everything that adds or removes event handles (opening and
closing connections, registering callbacks, keepalive) must run on that loop. Every other
libvirt call blocks on an RPC, so it runs in a worker thread.

A lost connection loses its events: after every reconnect the callbacks are registered
again and all shut-off domains are swept, so a request made during the outage is still
seen. Errors are translated into ``HypervisorUnavailable`` (temporary: the connection is
down) and ``HypervisorError`` (permanent: libvirt refused the operation).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import libvirt
import libvirtaio

from watcher import telemetry
from watcher.core.backoff import Backoff
from watcher.core.domain import (
    KEY,
    NAMESPACE,
    DomainState,
    MalformedState,
    parse_state,
    render_state,
)
from watcher.core.errors import PermanentError, TemporaryError
from watcher.core.policy import PolicySet
from watcher.core.waiting import wait_any

T = TypeVar("T")

RECONNECT_BACKOFF = Backoff(base=0.5, cap=30.0, attempts=0)
"""Reconnect forever; a host whose libvirtd is down has nothing better to do."""
KEEPALIVE_INTERVAL = 5
"""Seconds between keepalive probes when the connection is idle."""
KEEPALIVE_COUNT = 3
"""Unanswered probes before the connection counts as dead (about 20 s)."""

_CONNECTION_ERRORS = frozenset({
    libvirt.VIR_ERR_NO_CONNECT, libvirt.VIR_ERR_INVALID_CONN, libvirt.VIR_ERR_SYSTEM_ERROR,
    libvirt.VIR_ERR_RPC, libvirt.VIR_ERR_OPERATION_TIMEOUT,
})
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
_POWER_STATES = {
    libvirt.VIR_DOMAIN_NOSTATE: "no state",
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "blocked",
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "shutting down",
    libvirt.VIR_DOMAIN_SHUTOFF: "shut off",
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "pmsuspended",
}


class HypervisorUnavailable(TemporaryError):
    """Not connected to libvirt, or the connection broke during a call."""


class HypervisorError(PermanentError):
    """libvirt refused an operation; the message is libvirt's."""


class DomainGone(HypervisorError):
    """The domain no longer exists."""


@dataclass(frozen=True)
class DomainFacts:
    """One domain, read in one go for a decision."""

    uuid: str
    name: str
    shut_off: bool
    managed_save: bool
    metadata: str | None
    """The watcher's metadata element of the persistent config, as XML; None if absent."""
    xml: str
    """The persistent (inactive) domain XML."""


@dataclass(frozen=True)
class VolumeFacts:
    """A libvirt storage volume."""

    path: str
    name: str
    pool: str
    pool_type: str
    """The pool's ``type`` attribute: ``logical``, ``dir``, ``disk``..."""
    capacity: int
    """Bytes the guest sees."""
    allocation: int


def _translate(exc: libvirt.libvirtError) -> Exception:
    """The watcher error for a libvirt error: connection trouble is temporary."""
    message = str(exc.get_error_message() or exc)
    if (exc.get_error_code() in _CONNECTION_ERRORS
            or exc.get_error_domain() in (libvirt.VIR_FROM_RPC, libvirt.VIR_FROM_REMOTE)):
        return HypervisorUnavailable(f"libvirt connection: {message}")
    if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
        return DomainGone(message)
    return HypervisorError(message)


_error_handler_installed = False


def _ensure_event_impl() -> None:
    """Register libvirtaio on the running loop unless it already is.

    libvirt takes one event implementation per process, for good. A process that runs
    several loops one after the other (``asyncio.run`` twice, a test suite) hands the
    registered implementation over to the new loop, which is safe only once the old loop
    is gone and nothing is left registered on it; two live loops cannot share it.
    """
    global _error_handler_installed
    if not _error_handler_installed:
        # libvirt prints every error to stderr by default; errors are raised and logged instead.
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
        _error_handler_installed = True
    loop = asyncio.get_running_loop()
    current = libvirtaio.getCurrentImpl()
    if current is None:
        libvirtaio.virEventRegisterAsyncIOImpl(loop=loop)
        return
    if current.loop is loop:
        return
    if not current.loop.is_closed() or not current.is_idle():
        raise RuntimeError("libvirt events are bound to another event loop that is still in use")
    current.loop = loop


def _metadata(dom: Any) -> str | None:
    flags = (libvirt.VIR_DOMAIN_AFFECT_CONFIG if dom.isPersistent()
             else libvirt.VIR_DOMAIN_AFFECT_CURRENT)
    try:
        return str(dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, NAMESPACE, flags))
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_METADATA:
            return None
        raise


def _set_metadata(dom: Any, element: str) -> None:
    # The persistent config: a shut-off domain has no live one, a running one keeps the
    # request for when it stops.
    dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, element, KEY, NAMESPACE,
                    libvirt.VIR_DOMAIN_AFFECT_CONFIG)


def _pool_type(pool: Any) -> str:
    return ET.fromstring(pool.XMLDesc(0)).get("type") or "unknown"


def _volume_facts(vol: Any) -> VolumeFacts:
    pool = vol.storagePoolLookupByVolume()
    _kind, capacity, allocation = vol.info()
    return VolumeFacts(path=str(vol.path()), name=str(vol.name()), pool=str(pool.name()),
                       pool_type=_pool_type(pool), capacity=int(capacity),
                       allocation=int(allocation))


def _lookup_volume(conn: Any, path: str) -> Any | None:
    """The storage volume at ``path`` (as written, then with symlinks resolved)."""
    for candidate in dict.fromkeys((path, os.path.realpath(path))):
        try:
            return conn.storageVolLookupByPath(candidate)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() not in (libvirt.VIR_ERR_NO_STORAGE_VOL,
                                            libvirt.VIR_ERR_NO_STORAGE_POOL):
                raise
    return None


class DomainWatcher:
    """A libvirt connection that reports domains worth a look and serves the job's calls.

    ``on_domain`` receives a domain UUID on the event loop whenever a domain stopped, its
    watcher metadata changed, or a sweep found a reprovision request; it must not block.
    """

    def __init__(self, uri: str, on_domain: Callable[[str], None], log: Any = None,
                 *, backoff: Backoff = RECONNECT_BACKOFF) -> None:
        self.uri = uri
        self.on_domain = on_domain
        self.log = log if log is not None else telemetry.get_logger(component="libvirt")
        self.backoff = backoff
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

    # ---- the connection ---------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Stay connected until ``stop`` is set, reconnecting with jittered backoff.

        After ``stop`` no more domains are reported, but the connection stays open until
        every lease (a running job) is returned or the task is cancelled.
        """
        _ensure_event_impl()
        delays = self.backoff.delays()
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
                delays, attempt = self.backoff.delays(), 0
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
            conn.setKeepAlive(KEEPALIVE_INTERVAL, KEEPALIVE_COUNT)
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
        impl = libvirtaio.getCurrentImpl()
        if impl is not None:
            # libvirt removes the connection's handles and frees what it handed to the loop
            # shortly after close; let it finish before the loop can go away.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(impl.drain(), timeout=2)
            for _ in range(200):
                if impl.is_idle():
                    break
                await asyncio.sleep(0.01)

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
                    state = parse_state(_metadata(dom))
                except MalformedState:
                    continue
                except libvirt.libvirtError as exc:
                    if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                        continue
                    raise
                if state is not None and state.is_request:
                    found.append(str(dom.UUIDString()))
            return found

        uuids = await self._call(requested)
        for uuid in uuids:
            self.on_domain(uuid)
        if uuids:
            self.log.info("sweep found reprovision requests", domains=len(uuids))
        return len(uuids)

    # ---- blocking calls, run in worker threads ----------------------------------------

    async def _call(self, operation: Callable[[Any], T]) -> T:
        conn = self._conn
        if conn is None or self._lost.is_set():
            raise HypervisorUnavailable(f"not connected to {self.uri}")

        def run() -> T:
            try:
                return operation(conn)
            except libvirt.libvirtError as exc:
                raise _translate(exc) from exc

        return await asyncio.to_thread(run)

    async def _on_domain(self, uuid: str, operation: Callable[[Any], T]) -> T:
        return await self._call(lambda conn: operation(conn.lookupByUUIDString(uuid)))

    async def describe(self, uuid: str) -> DomainFacts | None:
        """Name, power state, managed save, metadata and XML; None if the domain is gone."""
        def read(conn: Any) -> DomainFacts | None:
            try:
                dom = conn.lookupByUUIDString(uuid)
                state, _reason = dom.state()
                persistent = bool(dom.isPersistent())
                return DomainFacts(
                    uuid=uuid, name=str(dom.name()),
                    shut_off=state == libvirt.VIR_DOMAIN_SHUTOFF,
                    managed_save=persistent and bool(dom.hasManagedSaveImage(0)),
                    metadata=_metadata(dom),
                    xml=str(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE if persistent else 0)),
                )
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    return None
                raise

        return await self._call(read)

    async def domain_xml(self, uuid: str) -> str:
        """The persistent domain XML."""
        return await self._on_domain(
            uuid, lambda dom: str(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)))

    async def get_metadata(self, uuid: str) -> str | None:
        """The watcher's metadata element of the persistent config, or None."""
        return await self._on_domain(uuid, _metadata)

    async def set_metadata(self, uuid: str, element: str) -> None:
        """Replace the watcher's metadata element in the persistent config."""
        await self._on_domain(uuid, lambda dom: _set_metadata(dom, element))

    async def set_state(self, uuid: str, state: DomainState) -> None:
        await self.set_metadata(uuid, render_state(state))

    async def is_shut_off(self, uuid: str) -> bool:
        return await self._on_domain(
            uuid, lambda dom: dom.state()[0] == libvirt.VIR_DOMAIN_SHUTOFF)

    async def has_managed_save(self, uuid: str) -> bool:
        return await self._on_domain(uuid, lambda dom: bool(dom.hasManagedSaveImage(0)))

    async def volume_for_path(self, path: str) -> VolumeFacts | None:
        """The libvirt storage volume at ``path``, or None when no active pool holds it."""
        def look(conn: Any) -> VolumeFacts | None:
            vol = _lookup_volume(conn, path)
            return _volume_facts(vol) if vol is not None else None

        return await self._call(look)

    async def volume_path(self, pool: str, volume: str) -> str:
        """The path of ``volume`` in ``pool`` (a disk of ``type='volume'``)."""
        return await self._call(
            lambda conn: str(conn.storagePoolLookupByName(pool)
                             .storageVolLookupByName(volume).path()))

    async def pool_type(self, pool: str) -> str:
        return await self._call(lambda conn: _pool_type(conn.storagePoolLookupByName(pool)))

    async def grow_volume(self, path: str, capacity: int) -> VolumeFacts:
        """Grow the storage volume at ``path`` to at least ``capacity`` bytes; never shrinks."""
        def grow(conn: Any) -> VolumeFacts:
            vol = _lookup_volume(conn, path)
            if vol is None:
                raise HypervisorError(f"{path} is not a libvirt storage volume")
            current = int(vol.info()[1])
            if current < capacity:
                # Without VIR_STORAGE_VOL_RESIZE_SHRINK libvirt refuses to shrink.
                vol.resize(capacity, 0)
                # Let the pool see the new size (and its free space) at once.
                vol.storagePoolLookupByVolume().refresh(0)
            return _volume_facts(vol)

        return await self._call(grow)

    async def start(self, uuid: str) -> None:
        await self._on_domain(uuid, lambda dom: dom.create())


# ---- one-shot helpers for the command line -------------------------------------------------


@contextlib.contextmanager
def _connection(uri: str) -> Iterator[Any]:
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as exc:
        raise HypervisorUnavailable(f"cannot connect to {uri}: {exc}") from exc
    try:
        yield conn
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()


def _lookup_domain(conn: Any, domain: str) -> Any:
    for lookup in (conn.lookupByName, conn.lookupByUUIDString):
        try:
            return lookup(domain)
        except libvirt.libvirtError:
            continue
    raise DomainGone(f"no domain named {domain!r}")


def request_reprovision(uri: str, domain: str, image: str | None) -> None:
    """Tag ``domain`` (name or UUID) with ``<reprovision/>``, naming ``image`` if given.

    The request goes into the persistent config, so a running domain is rewritten when
    it shuts off.
    """
    with _connection(uri) as conn:
        dom = _lookup_domain(conn, domain)
        if not dom.isPersistent():
            raise HypervisorError(f"{domain} is transient; only defined domains can be rewritten")
        try:
            _set_metadata(dom, render_state(DomainState("reprovision", image=image)))
        except libvirt.libvirtError as exc:
            raise _translate(exc) from exc


def domain_overview(uri: str, policies: PolicySet) -> list[dict[str, Any]]:
    """One row per domain a policy matches, for ``status``.

    Keys: ``domain``, ``uuid``, ``match`` (the rule's glob), ``image`` (the rule's image),
    ``power`` (running, shut off...), ``state`` (the metadata element: reprovision,
    provisioning, provisioned, failed, or none / malformed), ``provisioned_image``,
    ``provisioned_sha256``, ``finished``, ``reason``.
    """
    rows: list[dict[str, Any]] = []
    with _connection(uri) as conn:
        for dom in sorted(conn.listAllDomains(0), key=lambda d: str(d.name())):
            name = str(dom.name())
            rule = policies.rule_for(name)
            if rule is None:
                continue
            kind: str
            try:
                state = parse_state(_metadata(dom))
                kind = state.kind if state else "none"
            except MalformedState:
                state, kind = None, "malformed"
            except libvirt.libvirtError:
                continue  # undefined while listing
            power, _reason = dom.state()
            done = state is not None and state.kind == "provisioned"
            rows.append({
                "domain": name,
                "uuid": str(dom.UUIDString()),
                "match": rule.match,
                "image": rule.image,
                "power": _POWER_STATES.get(power, str(power)),
                "state": kind,
                "provisioned_image": state.image if done and state else None,
                "provisioned_sha256": state.sha256 if done and state else None,
                "finished": state.time if done and state else None,
                "reason": state.reason if state is not None else None,
            })
    return rows
