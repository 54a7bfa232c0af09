"""One-shot libvirt queries for the command line: tag a domain, list domains for ``status``.

Why it exists: a CLI command runs once and exits, with no event loop to keep a connection
alive for; each function here opens its own short-lived connection, does its work and
closes it. The daemon never uses these: it has its live connection (``jobcalls``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

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
