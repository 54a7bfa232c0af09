"""Fleet decisions: many hosts share one bucket and one broker, and each must act alone.

No host talks to another. What keeps a fleet orderly is decided here, from facts every
host has on its own, so that any host (and ``fleet status`` on an operator's laptop)
reaches the same answer:

- ``spread_delay``: how long a host waits before downloading a new image version. A hash
  of host name and version gives every host its own fixed offset in ``[0, spread)``, so a
  fleet's downloads of one upload are spread evenly over the window, and a host that
  restarts waits the same as before rather than drawing a new random number.
- ``host_matches``: the ``hosts:`` globs of images and rules.
- the status document every host writes to ``<status_bucket>/<STATUS_PREFIX><host>.json``,
  when a host counts as stale, and the hosts x images table ``fleet status`` prints.

Pure: the caller supplies times, documents and names.
"""

from __future__ import annotations

import fnmatch
import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from watcher.core.paths import IMAGE_NAME_RULE, is_digest, is_image_name

STATUS_PREFIX = ".libvirt-volume-watcher/hosts/"
"""Key prefix of the status objects in ``fleet.status_bucket``."""
STATUS_FORMAT = 1
"""Version of the status document's shape, for readers of older or newer hosts."""
STALE_AFTER_INTERVALS = 3
"""A host whose status is older than this many of its reconcile intervals is stale."""
HOST_NAME_RULE = IMAGE_NAME_RULE
"""Host names follow the image-name rule: both become queue names, keys and file names."""


def is_host_name(name: object) -> bool:
    """True for a host name that may become a queue name and an S3 key (same shape as an
    image name: a hostname or FQDN fits)."""
    return is_image_name(name)


def spread_delay(host: str, version: str, spread: float) -> float:
    """Seconds ``host`` waits before downloading ``version``: fixed, in ``[0, spread)``."""
    if spread <= 0:
        return 0.0
    digest = hashlib.sha256(f"{host}\0{version}".encode()).digest()
    fraction = int.from_bytes(digest[:8], "big") / 2**64  # < 1
    return fraction * spread


def host_matches(globs: Sequence[str], host: str) -> bool:
    """True when ``host`` is one of ``globs``; no globs means every host."""
    return not globs or any(fnmatch.fnmatchcase(host, glob) for glob in globs)


def status_key(host: str) -> str:
    return f"{STATUS_PREFIX}{host}.json"


def status_document(
    *, host: str, version: str, cached: Mapping[str, str], warming: Iterable[str],
    failed: Mapping[str, str], outdated: Iterable[str], updated_at: datetime,
    reconcile_interval: float,
) -> dict[str, Any]:
    """What one host says about itself: images cached (name -> digest), being warmed,
    failed (name -> reason), outdated domains, and when it said so."""
    return {
        "format": STATUS_FORMAT,
        "host": host,
        "version": version,
        "updated_at": updated_at.isoformat(),
        "reconcile_interval": reconcile_interval,
        "images": dict(sorted(cached.items())),
        "warming": sorted(warming),
        "failed": dict(sorted(failed.items())),
        "outdated_domains": sorted(outdated),
    }


def parse_status(data: Any) -> dict[str, Any] | None:
    """A status document read back from the bucket, or None when it is not one."""
    if not isinstance(data, dict) or not is_host_name(data.get("host")):
        return None
    try:
        datetime.fromisoformat(str(data["updated_at"]))
        float(data["reconcile_interval"])
    except (KeyError, TypeError, ValueError):
        return None
    for key, kind in (("images", dict), ("warming", list), ("failed", dict),
                      ("outdated_domains", list)):
        if not isinstance(data.get(key, kind()), kind):
            return None
    return data


def status_age(doc: Mapping[str, Any], now: datetime) -> float:
    """Seconds since the host last wrote its status."""
    return (now - datetime.fromisoformat(str(doc["updated_at"]))).total_seconds()


def is_stale(doc: Mapping[str, Any], now: datetime) -> bool:
    """No update for ``STALE_AFTER_INTERVALS`` of the host's own reconcile interval: a
    healthy host writes after every reconcile, so it is down or cut off."""
    return status_age(doc, now) > STALE_AFTER_INTERVALS * float(doc["reconcile_interval"])


@dataclass(frozen=True)
class HostRow:
    host: str
    stale: bool
    age: float
    """Seconds since the host's last update."""
    cells: Mapping[str, str]
    """Image name -> digest (cached), ``warming``, ``failed: <reason>`` or ``-``."""
    outdated: tuple[str, ...]
    version: str


@dataclass(frozen=True)
class FleetView:
    images: tuple[str, ...]
    rows: tuple[HostRow, ...]


def fleet_view(docs: Iterable[Mapping[str, Any]], now: datetime) -> FleetView:
    """Hosts x images from every host's status document, hosts and images in name order."""
    rows = []
    names: set[str] = set()
    for doc in docs:
        cached: Mapping[str, str] = doc.get("images", {})
        failed: Mapping[str, str] = doc.get("failed", {})
        warming = set(doc.get("warming", []))
        here = set(cached) | set(failed) | warming
        names |= here
        cells = {}
        for name in here:
            if name in warming:
                cells[name] = "warming"
            elif name in failed:
                cells[name] = f"failed: {failed[name]}"
            else:
                cells[name] = str(cached[name])
        rows.append(HostRow(host=str(doc["host"]), stale=is_stale(doc, now),
                            age=status_age(doc, now), cells=cells,
                            outdated=tuple(doc.get("outdated_domains", [])),
                            version=str(doc.get("version", ""))))
    return FleetView(images=tuple(sorted(names)),
                     rows=tuple(sorted(rows, key=lambda r: r.host)))


def view_json(view: FleetView) -> dict[str, Any]:
    """The ``fleet status --json`` answer."""
    return {
        "images": list(view.images),
        "hosts": [{"host": r.host, "stale": r.stale, "age_seconds": round(r.age, 1),
                   "version": r.version, "images": dict(r.cells),
                   "outdated_domains": list(r.outdated)} for r in view.rows],
    }


def view_lines(view: FleetView) -> list[str]:
    """The ``fleet status`` table: one line per host, one column per image (digests
    shortened), stale hosts marked."""
    width = max([4, *(len(r.host) for r in view.rows)])
    columns = [max(12, len(name)) for name in view.images]
    header = f"{'HOST':<{width}}  {'STATE':<5}  " + "  ".join(
        f"{name:<{w}}" for name, w in zip(view.images, columns, strict=True)) + "  OUTDATED"
    lines = [header.rstrip()]
    for row in view.rows:
        cells = []
        for name, w in zip(view.images, columns, strict=True):
            cell = row.cells.get(name, "-")
            cells.append(f"{cell[:12] if is_digest(cell) else cell:<{w}}")
        state = "STALE" if row.stale else "ok"
        outdated = ",".join(row.outdated) or "-"
        lines.append(f"{row.host:<{width}}  {state:<5}  " + "  ".join(cells) + f"  {outdated}")
    return lines
