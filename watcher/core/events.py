"""Bucket notifications, parsed into plain events the decision code can reason about.

MinIO publishes ``{"EventName", "Key", "Records": [...]}`` to AMQP; Ceph RGW and AWS send a
bare ``{"Records": [...]}``. Both carry the same S3 record shape with URL-encoded object
keys. Anything that does not fit is a ``MalformedEvent``: retrying a broken body never
helps, so the consumer dead-letters it instead.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_plus

from watcher.core.errors import MalformedEvent

MAX_BODY_BYTES = 1024 * 1024
"""Real notifications are a few KiB; anything past this is refused before parsing."""

_CREATED_PREFIXES = ("s3:ObjectCreated:", "ObjectCreated:")
_REMOVED_PREFIXES = ("s3:ObjectRemoved:", "ObjectRemoved:")


@dataclass(frozen=True)
class ObjectEvent:
    """One object changed in a bucket."""

    event_name: str
    """As sent, e.g. ``s3:ObjectCreated:Put`` (MinIO) or ``ObjectCreated:Put`` (AWS)."""
    bucket: str
    key: str
    """Decoded object key (``+`` became a space, ``%2B`` a plus)."""
    size: int | None
    """Bytes; absent from most removal events."""
    etag: str | None
    """Without the surrounding quotes."""

    @property
    def created(self) -> bool:
        return self.event_name.startswith(_CREATED_PREFIXES)

    @property
    def removed(self) -> bool:
        return self.event_name.startswith(_REMOVED_PREFIXES)


def parse_bucket_notification(body: bytes) -> list[ObjectEvent]:
    """Return the object events of one notification body, in record order.

    Raises ``MalformedEvent`` saying what is wrong when the body is not a notification.
    """
    if len(body) > MAX_BODY_BYTES:
        raise MalformedEvent(f"notification body is {len(body)} bytes, over {MAX_BODY_BYTES}")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedEvent(f"notification body is not UTF-8: {exc}") from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MalformedEvent(f"notification body is not JSON: {exc}") from None
    except RecursionError:
        raise MalformedEvent("notification body is nested too deeply") from None
    if not isinstance(document, dict):
        raise MalformedEvent(
            f"notification body must be a JSON object, got {type(document).__name__}"
        )

    if "Records" not in document:
        raise MalformedEvent("notification has no Records list")
    records = document["Records"]
    if records is None:
        # MinIO sends this for some test and non-object events.
        raise MalformedEvent("notification has Records: null (no object records)")
    if not isinstance(records, list):
        raise MalformedEvent(f"notification Records must be a list, got {type(records).__name__}")

    fallback_name = document.get("EventName")
    if fallback_name is not None and not isinstance(fallback_name, str):
        raise MalformedEvent("notification EventName must be a string")
    return [_parse_record(index, record, fallback_name) for index, record in enumerate(records)]


def _parse_record(index: int, record: object, fallback_name: str | None) -> ObjectEvent:
    where = f"record {index}"
    if not isinstance(record, dict):
        raise MalformedEvent(f"{where}: must be an object, got {type(record).__name__}")

    event_name = record.get("eventName", fallback_name)
    if not isinstance(event_name, str) or not event_name:
        raise MalformedEvent(f"{where}: eventName missing or not a string")

    s3 = _mapping(record, "s3", where)
    bucket_name = _mapping(s3, "s3.bucket", where).get("name")
    if not isinstance(bucket_name, str) or not bucket_name:
        raise MalformedEvent(f"{where}: s3.bucket.name missing or not a string")

    obj = _mapping(s3, "s3.object", where)
    raw_key = obj.get("key")
    if not isinstance(raw_key, str) or not raw_key:
        raise MalformedEvent(f"{where}: s3.object.key missing or not a string")
    try:
        key = unquote_plus(raw_key, errors="strict")
    except UnicodeDecodeError:
        problem = f"{where}: s3.object.key {raw_key!r} is not URL-encoded UTF-8"
        raise MalformedEvent(problem) from None

    size = obj.get("size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
        raise MalformedEvent(f"{where}: s3.object.size must be a non-negative integer")

    etag = obj.get("eTag", obj.get("ETag"))
    if etag is not None and not isinstance(etag, str):
        raise MalformedEvent(f"{where}: s3.object.eTag must be a string")
    if etag is not None:
        etag = etag.strip().strip('"') or None

    return ObjectEvent(event_name=event_name, bucket=bucket_name, key=key, size=size, etag=etag)


def _mapping(parent: Mapping[str, Any], path: str, where: str) -> Mapping[str, Any]:
    """``parent``'s member named by the last part of ``path``, which must be an object."""
    value = parent.get(path.rsplit(".", 1)[-1])
    if not isinstance(value, dict):
        raise MalformedEvent(f"{where}: {path} missing or not an object")
    return value
