"""What the three libvirt parts share: errors, the metadata element, typed facts and rows.

Why it exists: the events connection, the job's calls and the command line's one-shots
all read the watcher's metadata element, translate libvirt errors the same way and
return the same typed values. Everything here is a plain function of a libvirt object;
none of it opens a connection or touches the event loop, and all of it blocks on RPCs,
so callers run it in a worker thread (or in a short-lived CLI process).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import libvirt
import libvirtaio

from watcher.core.domain import KEY, NAMESPACE, MalformedState, parse_state
from watcher.core.errors import PermanentError, TemporaryError

_CONNECTION_ERRORS = frozenset({
    libvirt.VIR_ERR_NO_CONNECT, libvirt.VIR_ERR_INVALID_CONN, libvirt.VIR_ERR_SYSTEM_ERROR,
    libvirt.VIR_ERR_RPC, libvirt.VIR_ERR_OPERATION_TIMEOUT,
})
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


class PoolBusy(TemporaryError):
    """libvirt turned a storage call away because the pool has another job running (a
    volume being built, a refresh); it clears in moments, so the call is retried."""


def pool_busy(exc: libvirt.libvirtError) -> bool:
    """True for libvirt's "pool ... has asynchronous jobs running" refusal."""
    return "asynchronous jobs running" in str(exc.get_error_message() or exc)


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


@dataclass(frozen=True)
class DomainRow:
    """One domain as ``status`` shows it: power state and the watcher's metadata element."""

    domain: str
    uuid: str
    power: str
    """``running``, ``shut off``, ``paused``..."""
    state: str
    """The metadata element: ``reprovision``, ``provisioning``, ``provisioned``, ``failed``,
    or ``none`` (no element) / ``malformed``."""
    provisioned_image: str | None
    """Set only while the state is ``provisioned``, like the two fields below."""
    provisioned_sha256: str | None
    finished: str | None
    reason: str | None
    """Why the last reprovision failed; None unless the element carries one."""


def _ignore_error(_context: object, _error: object) -> None:
    """libvirt's default handler prints every error on stderr; ours are raised and translated."""


libvirt.registerErrorHandler(_ignore_error, None)


def ensure_event_impl() -> None:
    """Register libvirtaio on the running loop unless it already is.

    libvirt takes one event implementation per process, for good, and every connection
    opened afterwards registers its socket with it. A process that runs several loops one
    after the other (``asyncio.run`` twice, a test suite) hands the registered
    implementation over to the new loop, which is safe only once the old loop is gone and
    nothing is left registered on it; two live loops cannot share it. So every connection
    this package opens, the daemon's kept one and the CLI's one-shots, calls this first.
    """
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


async def settle_event_impl() -> None:
    """Wait until libvirt has removed a closed connection's handles and freed what it handed
    to the loop, so the loop can go away (or another take the implementation over)."""
    impl = libvirtaio.getCurrentImpl()
    if impl is None or impl.loop is not asyncio.get_running_loop():
        return
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(impl.drain(), timeout=2)
    for _ in range(200):
        if impl.is_idle():
            return
        await asyncio.sleep(0.01)


def translate(exc: libvirt.libvirtError) -> Exception:
    """The watcher error for a libvirt error: connection trouble is temporary."""
    message = str(exc.get_error_message() or exc)
    if (exc.get_error_code() in _CONNECTION_ERRORS
            or exc.get_error_domain() in (libvirt.VIR_FROM_RPC, libvirt.VIR_FROM_REMOTE)):
        return HypervisorUnavailable(f"libvirt connection: {message}")
    if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
        return DomainGone(message)
    if pool_busy(exc):
        return PoolBusy(message)
    return HypervisorError(message)


def read_metadata(dom: Any) -> str | None:
    """The watcher's metadata element (of the persistent config when there is one), or None."""
    flags = (libvirt.VIR_DOMAIN_AFFECT_CONFIG if dom.isPersistent()
             else libvirt.VIR_DOMAIN_AFFECT_CURRENT)
    try:
        return str(dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, NAMESPACE, flags))
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_METADATA:
            return None
        raise


def write_metadata(dom: Any, element: str) -> None:
    """Replace the watcher's metadata element in the persistent config.

    The persistent config: a shut-off domain has no live one, and a running one keeps the
    request for when it stops.
    """
    dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, element, KEY, NAMESPACE,
                    libvirt.VIR_DOMAIN_AFFECT_CONFIG)


def volume_facts(vol: Any) -> VolumeFacts:
    pool = vol.storagePoolLookupByVolume()
    _kind, capacity, allocation = vol.info()
    pool_type = ET.fromstring(pool.XMLDesc(0)).get("type") or "unknown"
    return VolumeFacts(path=str(vol.path()), name=str(vol.name()), pool=str(pool.name()),
                       pool_type=pool_type, capacity=int(capacity), allocation=int(allocation))


def lookup_volume(conn: Any, path: str) -> Any | None:
    """The storage volume at ``path`` (as written, then with symlinks resolved)."""
    for candidate in dict.fromkeys((path, os.path.realpath(path))):
        try:
            return conn.storageVolLookupByPath(candidate)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() not in (libvirt.VIR_ERR_NO_STORAGE_VOL,
                                            libvirt.VIR_ERR_NO_STORAGE_POOL):
                raise
    return None


def read_domain_rows(conn: Any, include: Callable[[str], bool]) -> list[DomainRow]:
    """A row for every domain whose name ``include`` accepts, in name order.

    ``include`` is asked before anything else is read, so domains the caller does not care
    about cost no RPC. A domain undefined while the list is read is left out.
    """
    rows: list[DomainRow] = []
    for dom in sorted(conn.listAllDomains(0), key=lambda d: str(d.name())):
        name = str(dom.name())
        if not include(name):
            continue
        try:
            kind: str
            try:
                state = parse_state(read_metadata(dom))
                kind = state.kind if state else "none"
            except MalformedState:
                state, kind = None, "malformed"
            power, _reason = dom.state()
        except libvirt.libvirtError:
            continue
        done = state if state is not None and state.kind == "provisioned" else None
        rows.append(DomainRow(
            domain=name,
            uuid=str(dom.UUIDString()),
            power=_POWER_STATES.get(power, str(power)),
            state=kind,
            provisioned_image=done.image if done else None,
            provisioned_sha256=done.sha256 if done else None,
            finished=done.time if done else None,
            reason=state.reason if state is not None else None,
        ))
    return rows
