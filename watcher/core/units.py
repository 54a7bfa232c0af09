"""Byte sizes as operators write them in YAML (``100GiB``, ``512M``, ``1073741824``)."""

from __future__ import annotations

import re

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024, "kb": 1000, "kib": 1024,
    "m": 1024**2, "mb": 1000**2, "mib": 1024**2,
    "g": 1024**3, "gb": 1000**3, "gib": 1024**3,
    "t": 1024**4, "tb": 1000**4, "tib": 1024**4,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: object) -> int:
    """Return a size in bytes.

    Single letters and IEC suffixes are binary (``G`` = ``GiB``), ``kB``/``MB``/``GB`` decimal.

    Raises ``ValueError`` with a message fit for an operator.
    """
    if isinstance(value, bool):
        raise ValueError(f"expected a size such as 100GiB, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"size must not be negative, got {value}")
        return value
    if not isinstance(value, str):
        raise ValueError(f"expected a size such as 100GiB, got {value!r}")
    match = _SIZE.match(value)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"expected a size such as 100GiB, got {value!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def format_size(size: int) -> str:
    """Render bytes with a binary suffix for logs and ``cache list``."""
    amount = float(size)
    for suffix in ("B", "KiB", "MiB", "GiB", "TiB"):
        if amount < 1024 or suffix == "TiB":
            return f"{amount:.0f}{suffix}" if suffix == "B" else f"{amount:.1f}{suffix}"
        amount /= 1024
    raise AssertionError("unreachable")
