"""One-shot libvirt queries for the command line: tag a domain, list domains for ``status``,
and a connection of its own for ``explain`` to read a domain as a job would.

Why it exists: a CLI command runs once and exits, with no event loop to keep a connection
alive for; each function here opens its own short-lived connection, does its work and
closes it. The daemon never uses these: it has its live connection (``jobcalls``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import libvirt

from watcher.adapters.hypervisor.base import (
    DomainGone,
    DomainRow,
    HypervisorError,
    HypervisorUnavailable,
    ensure_event_impl,
    read_domain_rows,
    read_metadata,
    settle_event_impl,
    translate,
    write_metadata,
)
from watcher.core.domain import NAMESPACE, DomainState, parse_state, render_state

T = TypeVar("T")


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
            write_metadata(dom, render_state(DomainState("reprovision", image=image)))
        except libvirt.libvirtError as exc:
            raise translate(exc) from exc


def cancel_request(uri: str, domain: str) -> DomainState | None:
    """Remove a pending ``<reprovision/>`` request; returns the state that stays.

    Only a request not yet taken up can be withdrawn: ``provisioning`` means the volume is
    being written (or a crashed write will resume), and that is not for a user to stop
    half-way. ``HypervisorError`` then, naming the state.
    """
    with _connection(uri) as conn:
        dom = _lookup_domain(conn, domain)
        try:
            state = parse_state(read_metadata(dom))
            if state is None or state.kind != "reprovision":
                what = "no request" if state is None else f"state {state.kind!r}"
                raise HypervisorError(f"{domain} has {what}; there is no pending request "
                                      "to cancel")
            dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, None, None, NAMESPACE,
                            libvirt.VIR_DOMAIN_AFFECT_CONFIG)
            return parse_state(read_metadata(dom))
        except libvirt.libvirtError as exc:
            raise translate(exc) from exc


@dataclass(frozen=True)
class Progress:
    """Where a domain stands, as ``reprovision --wait`` follows it."""

    state: DomainState | None
    shut_off: bool


def progress(uri: str, domain: str) -> Progress:
    """The domain's watcher state and whether it is shut off (one short connection)."""
    with _connection(uri) as conn:
        dom = _lookup_domain(conn, domain)
        try:
            shut_off = dom.state()[0] in (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_CRASHED)
            return Progress(parse_state(read_metadata(dom)), shut_off)
        except libvirt.libvirtError as exc:
            raise translate(exc) from exc


def shut_down(uri: str, domain: str, *, force: bool) -> None:
    """ACPI shutdown, or with ``force`` pull the plug (``virsh destroy``)."""
    with _connection(uri) as conn:
        dom = _lookup_domain(conn, domain)
        try:
            if dom.isActive():
                dom.destroy() if force else dom.shutdown()
        except libvirt.libvirtError as exc:
            raise translate(exc) from exc


def domain_overview(uri: str, include: Callable[[str], bool]) -> list[DomainRow]:
    """A row per domain whose name ``include`` accepts (the caller's policy match), by name."""
    with _connection(uri) as conn:
        try:
            return read_domain_rows(conn, include)
        except libvirt.libvirtError as exc:
            raise translate(exc) from exc


class OneShotConnection:
    """A connection of the CLI's own for a job's read calls (``DomainCalls`` over it).

    Opened on first use in a worker thread and closed by ``close``; the daemon's kept
    event connection is never involved.
    """

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self._conn: Any = None

    async def call(self, operation: Callable[[Any], T]) -> T:
        ensure_event_impl()  # on this loop, before the connection registers its socket

        def run() -> T:
            if self._conn is None:
                try:
                    self._conn = libvirt.open(self.uri)
                except libvirt.libvirtError as exc:
                    raise HypervisorUnavailable(f"cannot connect to {self.uri}: {exc}") from exc
            try:
                return operation(self._conn)
            except libvirt.libvirtError as exc:
                raise translate(exc) from exc

        return await asyncio.to_thread(run)

    async def uuid_of(self, domain: str) -> str:
        """The UUID of the domain named (or with the UUID) ``domain``; ``DomainGone`` if none."""
        return await self.call(lambda conn: str(_lookup_domain(conn, domain).UUIDString()))

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(libvirt.libvirtError):
                await asyncio.to_thread(conn.close)
            await settle_event_impl()
