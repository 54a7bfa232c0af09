"""Bucket notifications from MinIO, Ceph RGW and AWS parse into the same object events."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from watcher.core.errors import MalformedEvent
from watcher.core.events import MAX_BODY_BYTES, ObjectEvent, parse_bucket_notification


def record(
    key: str = "ubuntu%2Fubuntu-24.04.qcow2",
    *,
    bucket: str = "vm-images",
    event: str = "s3:ObjectCreated:Put",
    size: Any = 1024,
    etag: Any = "d41d8cd98f00b204e9800998ecf8427e",
) -> dict[str, Any]:
    obj: dict[str, Any] = {"key": key, "sequencer": "17A2B3C4D5E6F708"}
    if size is not None:
        obj["size"] = size
    if etag is not None:
        obj["eTag"] = etag
    return {
        "eventVersion": "2.0",
        "eventSource": "minio:s3",
        "eventName": event,
        "s3": {"s3SchemaVersion": "1.0", "bucket": {"name": bucket}, "object": obj},
    }


def minio_body(*records: dict[str, Any], event: str = "s3:ObjectCreated:Put") -> bytes:
    return json.dumps({"EventName": event, "Key": "vm-images/ubuntu/x", "Records": list(records)}
                      ).encode()


def bare_body(*records: dict[str, Any]) -> bytes:
    return json.dumps({"Records": list(records)}).encode()


def event(key: str, *, name: str = "s3:ObjectCreated:Put", size: int | None = 1024,
          etag: str | None = "d41d8cd98f00b204e9800998ecf8427e") -> ObjectEvent:
    return ObjectEvent(event_name=name, bucket="vm-images", key=key, size=size, etag=etag)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param(minio_body(record()), [event("ubuntu/ubuntu-24.04.qcow2")], id="minio-shape"),
        pytest.param(bare_body(record()), [event("ubuntu/ubuntu-24.04.qcow2")], id="bare-records"),
        pytest.param(
            bare_body(record("ubuntu/a.qcow2", event="ObjectCreated:CompleteMultipartUpload")),
            [event("ubuntu/a.qcow2", name="ObjectCreated:CompleteMultipartUpload")],
            id="aws-event-name-without-s3-prefix",
        ),
        pytest.param(bare_body(record("my+image.qcow2")), [event("my image.qcow2")],
                     id="plus-is-a-space"),
        pytest.param(bare_body(record("c%2B%2B.qcow2")), [event("c++.qcow2")],
                     id="percent-2b-is-a-plus"),
        pytest.param(bare_body(record("dir%20one/a%20b.qcow2")), [event("dir one/a b.qcow2")],
                     id="percent-20-is-a-space"),
        pytest.param(bare_body(record("images/%C3%A9t%C3%A9.qcow2")), [event("images/été.qcow2")],
                     id="unicode-key"),
        pytest.param(bare_body(record("plain.qcow2")), [event("plain.qcow2")],
                     id="key-without-encoding"),
        pytest.param(bare_body(record(etag='"abc-3"')), [event("ubuntu/ubuntu-24.04.qcow2",
                                                                etag="abc-3")],
                     id="etag-quotes-stripped"),
        pytest.param(bare_body(record(etag="")), [event("ubuntu/ubuntu-24.04.qcow2", etag=None)],
                     id="empty-etag-is-none"),
        pytest.param(
            bare_body(record("a.qcow2", event="s3:ObjectRemoved:Delete", size=None, etag=None)),
            [event("a.qcow2", name="s3:ObjectRemoved:Delete", size=None, etag=None)],
            id="removal-without-size-or-etag",
        ),
        pytest.param(
            minio_body(record("a.qcow2"), record("a.qcow2.sha256", size=100)),
            [event("a.qcow2"), event("a.qcow2.sha256", size=100)],
            id="several-records-in-order",
        ),
        pytest.param(bare_body(), [], id="empty-records-list"),
        pytest.param(bare_body(record(size=0)), [event("ubuntu/ubuntu-24.04.qcow2", size=0)],
                     id="zero-size"),
    ],
)
def test_notification_parses_into_object_events(body: bytes, expected: list[ObjectEvent]) -> None:
    assert parse_bucket_notification(body) == expected


def test_record_without_event_name_takes_minio_top_level_event_name() -> None:
    rec = record("a.qcow2")
    del rec["eventName"]
    body = minio_body(rec, event="s3:ObjectCreated:Copy")
    assert parse_bucket_notification(body)[0].event_name == "s3:ObjectCreated:Copy"


@pytest.mark.parametrize(
    ("name", "created", "removed"),
    [
        ("s3:ObjectCreated:Put", True, False),
        ("ObjectCreated:Put", True, False),
        ("s3:ObjectCreated:CompleteMultipartUpload", True, False),
        ("s3:ObjectRemoved:Delete", False, True),
        ("ObjectRemoved:DeleteMarkerCreated", False, True),
        ("s3:ObjectAccessed:Get", False, False),
        ("s3:ObjectCreatedXPut", False, False),
    ],
)
def test_event_kind_follows_event_name(name: str, created: bool, removed: bool) -> None:
    assert (event("k", name=name).created, event("k", name=name).removed) == (created, removed)


def with_record(mutate: Any) -> bytes:
    rec = record()
    mutate(rec)
    return bare_body(rec)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        pytest.param(b"\xff\xfe{}", "not UTF-8", id="not-utf8"),
        pytest.param(b"{not json", "not JSON", id="not-json"),
        pytest.param(b"", "not JSON", id="empty-body"),
        pytest.param(b"[1, 2]", "must be a JSON object", id="array-body"),
        pytest.param(b'"text"', "must be a JSON object", id="string-body"),
        pytest.param(b"{}", "no Records list", id="no-records"),
        pytest.param(b'{"EventName": "s3:ObjectCreated:Put", "Key": "b/k"}', "no Records list",
                     id="minio-without-records"),
        pytest.param(b'{"EventName": "s3:ObjectCreated:Put", "Key": "b/k", "Records": null}',
                     "Records: null", id="minio-records-null"),
        pytest.param(b'{"Records": {"s3": {}}}', "must be a list", id="records-not-a-list"),
        pytest.param(b'{"Records": ["x"]}', "record 0: must be an object", id="record-not-object"),
        pytest.param(b'{"EventName": 3, "Records": []}', "EventName must be a string",
                     id="event-name-wrong-type"),
        pytest.param(with_record(lambda r: r.pop("eventName")), "eventName missing",
                     id="no-event-name-anywhere"),
        pytest.param(with_record(lambda r: r.update(eventName=7)), "eventName missing",
                     id="event-name-not-a-string"),
        pytest.param(with_record(lambda r: r.pop("s3")), "s3 missing", id="no-s3"),
        pytest.param(with_record(lambda r: r.update(s3=[])), "s3 missing", id="s3-not-object"),
        pytest.param(with_record(lambda r: r["s3"].pop("bucket")), "s3.bucket missing",
                     id="no-bucket"),
        pytest.param(with_record(lambda r: r["s3"]["bucket"].pop("name")), "s3.bucket.name",
                     id="no-bucket-name"),
        pytest.param(with_record(lambda r: r["s3"]["bucket"].update(name=5)), "s3.bucket.name",
                     id="bucket-name-not-a-string"),
        pytest.param(with_record(lambda r: r["s3"].pop("object")), "s3.object missing",
                     id="no-object"),
        pytest.param(with_record(lambda r: r["s3"]["object"].pop("key")), "s3.object.key",
                     id="no-key"),
        pytest.param(with_record(lambda r: r["s3"]["object"].update(key="")), "s3.object.key",
                     id="empty-key"),
        pytest.param(with_record(lambda r: r["s3"]["object"].update(key=["a"])), "s3.object.key",
                     id="key-not-a-string"),
        pytest.param(with_record(lambda r: r["s3"]["object"].update(key="%FF.qcow2")),
                     "not URL-encoded UTF-8", id="key-bad-percent-encoding"),
        pytest.param(with_record(lambda r: r["s3"]["object"].update(size="1024")), "size",
                     id="size-as-string"),
        pytest.param(with_record(lambda r: r["s3"]["object"].update(size=True)), "size",
                     id="size-as-bool"),
        pytest.param(with_record(lambda r: r["s3"]["object"].update(size=-1)), "size",
                     id="size-negative"),
        pytest.param(with_record(lambda r: r["s3"]["object"].update(size=1.5)), "size",
                     id="size-fractional"),
        pytest.param(with_record(lambda r: r["s3"]["object"].update(eTag=12)), "eTag",
                     id="etag-not-a-string"),
        pytest.param(b"[" * 100_000 + b"]" * 100_000, "nested too deeply", id="deeply-nested"),
        pytest.param(b" " * (MAX_BODY_BYTES + 1), "over", id="body-over-1-mib"),
    ],
)
def test_malformed_notification_is_rejected_with_a_clear_message(body: bytes, message: str) -> None:
    with pytest.raises(MalformedEvent, match=message):
        parse_bucket_notification(body)


def test_one_bad_record_rejects_the_whole_notification_and_names_it() -> None:
    bad = record()
    del bad["s3"]["object"]["key"]
    with pytest.raises(MalformedEvent, match=re.escape("record 1: s3.object.key")):
        parse_bucket_notification(bare_body(record(), bad))
