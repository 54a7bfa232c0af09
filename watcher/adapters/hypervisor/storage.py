"""Storage pools and volumes for the HTTP job API, and which domains use a volume.

Why it exists: an API job names a volume of a pool (``api.pool``) rather than a domain.
It must find that volume (or create it), and before writing it must know that no domain
that is not shut off uses it, whatever way the domain refers to it: a file or block
device path, a ``type='volume'`` disk naming pool and volume, a CD-ROM, in the running
config or in the persistent one. Each function here is a plain function of a libvirt
connection that blocks on RPCs, run in a worker thread through ``call`` (``jobcalls``).
libvirt errors escape as ``libvirtError`` for ``call`` to translate, except where a
clearer message is worth it.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import libvirt

from watcher.adapters.hypervisor.base import (
    _POWER_STATES,
    HypervisorError,
    PoolBusy,
    VolumeFacts,
    pool_busy,
    volume_facts,
)

FILE_POOL_TYPES = frozenset({"dir", "fs", "netfs"})
"""Pools whose volumes are files: a new one is a sparse raw file."""

BLOCK_POOL_TYPES = frozenset({"logical"})
"""Pools whose volumes are LVs: a new one is a fully allocated (thick) LV."""


@dataclass(frozen=True)
class PoolFacts:
    """A libvirt storage pool."""

    name: str
    type: str
    """The pool's ``type`` attribute: ``logical``, ``dir``..."""
    active: bool
    target: str | None
    """The pool's target path (``/dev/VG`` for a logical pool), if it has one."""


@dataclass(frozen=True)
class DiskUser:
    """A domain with a disk on the volume in question."""

    name: str
    uuid: str
    power: str
    """``running``, ``shut off``, ``paused``..."""
    shut_off: bool
    managed_save: bool = False
    """A saved state waits to be restored: writing the disk under it corrupts the guest."""


def _lookup_pool(conn: Any, pool: str) -> Any | None:
    try:
        return conn.storagePoolLookupByName(pool)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_STORAGE_POOL:
            return None
        raise


def _active_pool(conn: Any, pool: str) -> tuple[Any, str]:
    """The pool object and its type; ``HypervisorError`` when missing or inactive."""
    found = _lookup_pool(conn, pool)
    if found is None:
        raise HypervisorError(f"there is no storage pool named {pool!r}")
    if not found.isActive():
        raise HypervisorError(f"storage pool {pool!r} is not active")
    return found, ET.fromstring(found.XMLDesc(0)).get("type") or "unknown"


def pool_info(conn: Any, pool: str) -> PoolFacts | None:
    """The pool named ``pool``, or None when there is none."""
    found = _lookup_pool(conn, pool)
    if found is None:
        return None
    root = ET.fromstring(found.XMLDesc(0))
    return PoolFacts(name=str(found.name()), type=root.get("type") or "unknown",
                     active=bool(found.isActive()), target=root.findtext("target/path"))


def pool_volume(conn: Any, pool: str, name: str) -> VolumeFacts | None:
    """The volume ``name`` of ``pool``, or None when the pool has none by that name.

    The pool is refreshed first: libvirt lists only what it saw at its last refresh, and
    an LV made with ``lvcreate`` (or a file copied in) is otherwise invisible to it.
    """
    found, _type = _active_pool(conn, pool)
    found.refresh(0)
    try:
        vol = found.storageVolLookupByName(name)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_STORAGE_VOL:
            return None
        raise
    return volume_facts(vol)


def volume_xml(pool_type: str, name: str, capacity: int) -> str:
    """The ``<volume>`` definition of a new volume of ``capacity`` bytes in such a pool.

    A file is sparse raw (nothing allocated; the write allocates what the image holds).
    An LV is thick: libvirt makes an LV with an allocation below its capacity a sparse
    COW snapshot, which would fill up and break the guest.
    """
    if pool_type not in FILE_POOL_TYPES | BLOCK_POOL_TYPES:
        raise HypervisorError(f"cannot create volumes in a {pool_type!r} pool; "
                              f"supported: {', '.join(sorted(FILE_POOL_TYPES | BLOCK_POOL_TYPES))}")
    volume = ET.Element("volume")
    ET.SubElement(volume, "name").text = name
    ET.SubElement(volume, "capacity", unit="bytes").text = str(capacity)
    allocation = 0 if pool_type in FILE_POOL_TYPES else capacity
    ET.SubElement(volume, "allocation", unit="bytes").text = str(allocation)
    if pool_type in FILE_POOL_TYPES:
        ET.SubElement(ET.SubElement(volume, "target"), "format", type="raw")
    return ET.tostring(volume, encoding="unicode")


def create_volume(conn: Any, pool: str, name: str, capacity: int) -> VolumeFacts:
    """Create the volume ``name`` of ``capacity`` bytes in ``pool`` through libvirt.

    A ``logical`` pool gets an LV of that size, a ``dir`` pool a sparse raw file.
    ``HypervisorError`` (saying what and where) when the pool is missing or inactive, the
    volume exists already (made meanwhile by someone else) or there is no room.
    """
    if capacity <= 0:
        raise HypervisorError(f"volume {name!r}: capacity must be positive, not {capacity}")
    found, pool_type = _active_pool(conn, pool)
    definition = volume_xml(pool_type, name, capacity)
    try:
        vol = found.createXML(definition, 0)
    except libvirt.libvirtError as exc:
        message = str(exc.get_error_message() or exc)
        if pool_busy(exc):
            raise PoolBusy(f"storage pool {pool!r} is busy: {message}") from exc
        if exc.get_error_code() == libvirt.VIR_ERR_STORAGE_VOL_EXIST:
            raise HypervisorError(
                f"volume {name!r} already exists in storage pool {pool!r}") from exc
        if exc.get_error_code() in (libvirt.VIR_ERR_NO_STORAGE_POOL,
                                    libvirt.VIR_ERR_OPERATION_INVALID):
            raise HypervisorError(f"storage pool {pool!r} cannot take a new volume: "
                                  f"{message}") from exc
        if exc.get_error_domain() in (libvirt.VIR_FROM_RPC, libvirt.VIR_FROM_REMOTE):
            raise  # connection trouble: ``call`` makes it temporary
        raise HypervisorError(f"creating volume {name!r} of {capacity} bytes in storage "
                              f"pool {pool!r} failed: {message}") from exc
    return volume_facts(vol)


# ---- who uses a volume --------------------------------------------------------------------


@dataclass(frozen=True)
class _Source:
    """Where one disk (or one image of its backing chain) reads from."""

    path: str | None
    pool: str | None
    volume: str | None


def _disk_sources(disk: ET.Element) -> Iterator[_Source]:
    """The sources of a ``<disk>`` and of its ``<backingStore>`` chain (read, so used)."""
    node: ET.Element | None = disk
    while node is not None:
        kind = node.get("type")
        source = node.find("source")
        if source is not None:
            if kind == "volume":
                yield _Source(None, source.get("pool"), source.get("volume"))
            elif kind in ("file", "block"):
                path = source.get("file") if kind == "file" else source.get("dev")
                if path:
                    yield _Source(path, None, None)
        node = node.find("backingStore")


def _uses(xml: str, matches: Callable[[_Source], bool]) -> bool:
    root = ET.fromstring(xml)
    return any(matches(source) for disk in root.iterfind("devices/disk")
               for source in _disk_sources(disk))


def domains_using(conn: Any, real_path: str, *, pool: str | None = None,
                  volume: str | None = None) -> list[DiskUser]:
    """Every domain with a disk on ``real_path`` (or on ``volume`` of ``pool``), by name.

    Running and defined-but-inactive domains alike; every disk of both the live and the
    persistent config, CD-ROMs and floppies included (all can open the file). A
    ``type='volume'`` disk matches when it names the given pool and volume, or when its
    volume's path resolves to ``real_path``. A domain undefined during the scan is skipped.
    """
    resolved: dict[tuple[str, str], str | None] = {}

    def volume_real_path(pool_name: str, volume_name: str) -> str | None:
        key = (pool_name, volume_name)
        if key not in resolved:
            try:
                path = conn.storagePoolLookupByName(pool_name).storageVolLookupByName(
                    volume_name).path()
                resolved[key] = os.path.realpath(str(path))
            except libvirt.libvirtError:
                resolved[key] = None  # a missing or inactive pool holds nothing of ours
        return resolved[key]

    def matches(source: _Source) -> bool:
        if source.path is not None:
            return os.path.realpath(source.path) == real_path
        if source.pool is None or source.volume is None:
            return False
        if (source.pool, source.volume) == (pool, volume):
            return True
        return volume_real_path(source.pool, source.volume) == real_path

    users: list[DiskUser] = []
    for dom in conn.listAllDomains(0):
        try:
            state = dom.state()[0]
            persistent = bool(dom.isPersistent())
            configs = [str(dom.XMLDesc(0))]
            if persistent and dom.isActive():
                configs.append(str(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)))
            if not any(_uses(xml, matches) for xml in configs):
                continue
            users.append(DiskUser(
                name=str(dom.name()), uuid=str(dom.UUIDString()),
                power=_POWER_STATES.get(state, str(state)),
                shut_off=state == libvirt.VIR_DOMAIN_SHUTOFF,
                managed_save=persistent and bool(dom.hasManagedSaveImage(0)),
            ))
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                continue
            raise
    return sorted(users, key=lambda user: user.name)
