"""Which root volumes the watcher may overwrite: the allow-list decision, pure.

Overwriting the wrong device destroys data no retry brings back, so the rule is one
function over facts gathered elsewhere (resolved path, LV identity, libvirt pool type)
and is tested by a table. A volume is allowed when:

- its resolved path, or for an LV its canonical ``/dev/VG/LV`` or ``/dev/mapper/VG-LV``
  path (reported by LVM itself, so no symlink can forge it), matches a ``volumes.allow``
  glob; or
- it is an LV of a volume group listed in ``volumes.lvm_vgs``; or
- ``volumes.allow`` is empty and it is a volume of a libvirt pool of type ``logical``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath

from watcher.core.paths import path_inside


@dataclass(frozen=True)
class VolumeIdentity:
    """What is known about a root disk's source once resolved."""

    path: str
    """The source path as the domain XML (or its pool) names it."""
    real_path: str
    """``path`` with symlinks resolved: what is checked is what is written."""
    lv_paths: tuple[str, ...] = ()
    """Canonical LV paths when the device is a logical volume."""
    vg: str | None = None
    """The LV's volume group, when it is one."""
    pool_type: str | None = None
    """Type of the libvirt storage pool holding the volume, if any."""


def lv_paths(vg: str, lv: str) -> tuple[str, ...]:
    """``/dev/VG/LV`` and the device-mapper name (dashes in names doubled).

    The names come from LVM's report; ``UnsafeName`` if either is not a plain name.
    """
    dev = PurePosixPath("/dev")
    mapper = f"{vg.replace('-', '--')}-{lv.replace('-', '--')}"
    return (str(path_inside(path_inside(dev, vg), lv)),
            str(path_inside(dev / "mapper", mapper)))


def refusal(volume: VolumeIdentity, allow: Sequence[str], lvm_vgs: Sequence[str]) -> str | None:
    """Why the watcher must not write ``volume``, or None when it may."""
    shown = volume.path if volume.path == volume.real_path else (
        f"{volume.path} ({volume.real_path})")
    candidates = (volume.real_path, *volume.lv_paths)
    if any(fnmatch.fnmatchcase(c, pattern) for c in candidates for pattern in allow):
        return None
    if volume.vg is not None and volume.vg in lvm_vgs:
        return None
    if not allow and volume.pool_type == "logical":
        return None
    if allow:
        return f"root disk {shown} matches no volumes.allow pattern"
    where = f"a {volume.pool_type!r} pool" if volume.pool_type else "no libvirt pool"
    extra = f" or an LV of volumes.lvm_vgs {list(lvm_vgs)}" if lvm_vgs else ""
    return (f"root disk {shown} is in {where}; with an empty volumes.allow only volumes of "
            f"libvirt 'logical' pools{extra} are written")
