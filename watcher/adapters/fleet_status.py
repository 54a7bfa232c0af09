"""The fleet's status objects in S3: each host writes its own, anyone reads them all.

The bucket is the only place a fleet's hosts meet, so it also holds their view of
themselves: ``<status_bucket>/.libvirt-volume-watcher/hosts/<host>.json``, one small JSON
document per host (shape in ``watcher.core.fleet``). A host only ever writes its own key,
so there is nothing to lock. Writes give up fast (``FleetTuning``): a status that cannot be
written now is rewritten at the next change or reconcile, and must never hold up the
daemon. Blocking, like every S3 call: run it in an executor thread.
"""

from __future__ import annotations

import json
from typing import Any

from watcher.adapters.s3 import S3Store
from watcher.core.fleet import STATUS_PREFIX, is_host_name, parse_status, status_key
from watcher.settings import FLEET_TUNING, FleetTuning, S3Settings

MAX_STATUS_BYTES = 1024 * 1024
"""A status document is a few KiB; anything larger under the prefix is not one."""


class FleetStatusStore:
    """Reads and writes the status documents of ``bucket``."""

    def __init__(self, settings: S3Settings, bucket: str, *, s3: S3Store | None = None,
                 tuning: FleetTuning = FLEET_TUNING) -> None:
        self.bucket = bucket
        self._s3 = s3 if s3 is not None else S3Store(
            settings, backoff=tuning.status_backoff, timeout=tuning.status_timeout)

    def write(self, doc: dict[str, Any]) -> None:
        """Store one host's document under its own key; raises TemporaryError on failure."""
        host = doc["host"]
        if not is_host_name(host):
            raise ValueError(f"not a host name: {host!r}")
        body = json.dumps(doc, indent=1, sort_keys=True).encode()
        self._s3.put_small(self.bucket, status_key(host), body)

    def read_all(self) -> list[dict[str, Any]]:
        """Every host's document; objects that are not one are skipped."""
        docs = []
        for obj in self._s3.list_objects(self.bucket, STATUS_PREFIX):
            if not obj.key.endswith(".json") or obj.size > MAX_STATUS_BYTES:
                continue
            data = self._s3.read_small(self.bucket, obj.key, limit=MAX_STATUS_BYTES)
            try:
                doc = parse_status(json.loads(data or b""))
            except ValueError:
                continue
            if doc is not None:
                docs.append(doc)
        return docs
