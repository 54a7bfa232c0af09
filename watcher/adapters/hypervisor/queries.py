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
from typing import Any, TypeVar

import libvirt

from watcher.adapters.hypervisor.base import (
    DomainGone,
    DomainRow,
    HypervisorError,
    HypervisorUnavailable,
    read_domain_rows,
    translate,
    write_metadata,
)
from watcher.core.domain import DomainState, render_state

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
