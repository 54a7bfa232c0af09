"""The calls a reprovision job (and the daemon's reconcile) makes on the live connection.

Why it exists: a job reads a domain, arms and records its metadata state, resolves and
grows its volume and starts it again; the daemon counts outdated domains. All of these are
blocking libvirt RPCs on the connection the events part keeps open, so each one is a
small function of that connection run through ``call``: none opens a connection of its
own, and a call while disconnected fails at once with ``HypervisorUnavailable``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import libvirt

from watcher.adapters.hypervisor.base import (
    DomainFacts,
    DomainRow,
    HypervisorError,
    VolumeFacts,
    lookup_volume,
    read_domain_rows,
    read_metadata,
    volume_facts,
    write_metadata,
)
from watcher.adapters.hypervisor.storage import (
    DiskUser,
    PoolFacts,
    create_volume,
    domains_using,
    pool_info,
    pool_volume,
)
from watcher.core.domain import DomainState, render_state

T = TypeVar("T")


class Connection(Protocol):
    """Runs a blocking operation on a live libvirt connection (``EventConnection.call``)."""

    async def call(self, operation: Callable[[Any], T]) -> T: ...


def _everything(_name: str) -> bool:
    return True


class DomainCalls:
    """The job's calls, each one RPC round (or a few) on ``connection``."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self._pool_changes = asyncio.Lock()
        """Held by the calls that refresh a pool or change its volumes: libvirt refuses a
        refresh or a new volume while another one is being built in the same pool, so
        this daemon's own jobs (four API jobs at once, say) take turns."""

    async def _on_domain(self, uuid: str, operation: Callable[[Any], T]) -> T:
        return await self.connection.call(
            lambda conn: operation(conn.lookupByUUIDString(uuid)))

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
                    metadata=read_metadata(dom),
                    xml=str(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE if persistent else 0)),
                )
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    return None
                raise

        return await self.connection.call(read)

    async def set_metadata(self, uuid: str, element: str) -> None:
        """Replace the watcher's metadata element in the persistent config."""
        await self._on_domain(uuid, lambda dom: write_metadata(dom, element))

    async def set_state(self, uuid: str, state: DomainState) -> None:
        await self.set_metadata(uuid, render_state(state))

    async def is_shut_off(self, uuid: str) -> bool:
        return await self._on_domain(
            uuid, lambda dom: dom.state()[0] == libvirt.VIR_DOMAIN_SHUTOFF)

    async def start(self, uuid: str) -> None:
        await self._on_domain(uuid, lambda dom: dom.create())

    async def volume_for_path(self, path: str) -> VolumeFacts | None:
        """The libvirt storage volume at ``path``, or None when no active pool holds it."""
        def look(conn: Any) -> VolumeFacts | None:
            vol = lookup_volume(conn, path)
            return volume_facts(vol) if vol is not None else None

        return await self.connection.call(look)

    async def volume_path(self, pool: str, volume: str) -> str:
        """The path of ``volume`` in ``pool`` (a disk of ``type='volume'``)."""
        return await self.connection.call(
            lambda conn: str(conn.storagePoolLookupByName(pool)
                             .storageVolLookupByName(volume).path()))

    async def grow_volume(self, path: str, capacity: int) -> VolumeFacts:
        """Grow the storage volume at ``path`` to at least ``capacity`` bytes; never shrinks."""
        def grow(conn: Any) -> VolumeFacts:
            vol = lookup_volume(conn, path)
            if vol is None:
                raise HypervisorError(f"{path} is not a libvirt storage volume")
            current = int(vol.info()[1])
            if current < capacity:
                # Without VIR_STORAGE_VOL_RESIZE_SHRINK libvirt refuses to shrink.
                vol.resize(capacity, 0)
                # Let the pool see the new size (and its free space) at once.
                vol.storagePoolLookupByVolume().refresh(0)
            return volume_facts(vol)

        async with self._pool_changes:
            return await self.connection.call(grow)

    async def domain_overview(
        self, include: Callable[[str], bool] = _everything,
    ) -> list[DomainRow]:
        """A row per domain whose name ``include`` accepts, read on the live connection."""
        return await self.connection.call(lambda conn: read_domain_rows(conn, include))

    # ---- the HTTP job API's volumes (``storage``) ------------------------------------------

    async def pool_info(self, pool: str) -> PoolFacts | None:
        """The storage pool named ``pool``; None when there is none."""
        return await self.connection.call(lambda conn: pool_info(conn, pool))

    async def pool_volume(self, pool: str, name: str) -> VolumeFacts | None:
        """The volume ``name`` of ``pool`` after a refresh; None when missing."""
        async with self._pool_changes:
            return await self.connection.call(lambda conn: pool_volume(conn, pool, name))

    async def create_volume(self, pool: str, name: str, capacity: int) -> VolumeFacts:
        """A new volume of ``capacity`` bytes: an LV in a logical pool, a sparse raw file
        in a dir pool."""
        async with self._pool_changes:
            return await self.connection.call(
                lambda conn: create_volume(conn, pool, name, capacity))

    async def domains_using(self, real_path: str, *, pool: str | None = None,
                            volume: str | None = None) -> list[DiskUser]:
        """Every domain, running or not, with a disk on ``real_path`` (or pool/volume)."""
        return await self.connection.call(
            lambda conn: domains_using(conn, real_path, pool=pool, volume=volume))
