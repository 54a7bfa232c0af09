"""What a cache entry is: a verified, inspected image file and the record describing it.

Why it exists: ``CacheDir``, ``Cache``, the reprovisioner and the CLI all hand entries
around; the record format (small JSON an operator can ``cat``) is defined once, here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from watcher.core.cache_rules import Source, Stored
from watcher.core.paths import digest_file
from watcher.core.policy import ImageFormat

__all__ = ["CacheEntry", "Source", "VerifyResult", "age_seconds", "now_stamp"]


def now_stamp() -> str:
    """The time records hold: ISO-8601 UTC to the second (compares in time order as text)."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def age_seconds(stamp: str) -> float:
    """Seconds since a record's ``stamp``; infinite for one that cannot be read."""
    try:
        return (datetime.now(UTC) - datetime.fromisoformat(stamp)).total_seconds()
    except ValueError:
        return float("inf")


@dataclass(frozen=True)
class CacheEntry:
    """A verified, inspected image file, named by its SHA-256."""

    digest: str
    path: Path
    format: ImageFormat
    virtual_size: int
    size: int
    image: str
    """Policy image name it was last fetched for."""
    bucket: str
    key: str
    etag: str
    sources: tuple[Source, ...] = ()
    created_at: str = ""
    last_used_at: str = ""
    verified_at: str = ""
    checksum: str = "sidecar"
    """``sidecar``: compared with a published checksum; ``computed``: optional-checksum image."""
    durable: bool = True
    """False while the data may still sit in the page cache only (a pre-warm commits before
    its fsync); such an entry is fsynced before a volume is written from it, and re-hashed
    after a restart (``CacheDir.recover``). Records without the field are durable."""

    def record(self) -> dict[str, Any]:
        data = asdict(self)
        data["path"] = self.path.name
        data["sources"] = [asdict(s) for s in self.sources]
        return data

    @classmethod
    def from_record(cls, directory: Path, data: dict[str, Any]) -> CacheEntry:
        """The entry a record describes; ``ValueError`` unless it names its own data file."""
        fields = dict(data)
        digest, fmt = str(data["digest"]), str(data["format"])
        if fmt not in ("qcow2", "raw") or str(data["path"]) != f"{digest}.{fmt}":
            raise ValueError(f"record names data file {data['path']!r}, not {digest}.{fmt}")
        fields["path"] = digest_file(directory, digest, f".{fmt}")
        fields["sources"] = tuple(Source(**s) for s in data.get("sources", ()))
        return cls(**fields)

    def stored(self) -> Stored:
        return Stored(self.digest, self.size, self.last_used_at)


@dataclass(frozen=True)
class VerifyResult:
    digest: str
    ok: bool
    detail: str
