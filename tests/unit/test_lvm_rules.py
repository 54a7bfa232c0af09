"""When the watcher must refuse to write a logical volume: a table over the pure rule."""

from __future__ import annotations

from dataclasses import replace

import pytest

from watcher.core.lvm_rules import LvInfo, cow_snapshot_size, refusal_reason

PLAIN = LvInfo(vg="vg0", lv="web1-root", path="/dev/vg0/web1-root", size=10 << 30,
               active=True, device_open=False, is_snapshot=False, is_thin_pool=False,
               is_thin=False, pool=None, extent_size=4 << 20, data_percent=None, origin=None)


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        pytest.param({}, None, id="plain-inactive-closed-lv-may-be-written"),
        pytest.param({"is_thin": True, "pool": "pool0", "data_percent": 3.0}, None,
                     id="thin-volume-may-be-written"),
        pytest.param({"is_thin_pool": True}, "vg0/web1-root is a thin pool, not a volume",
                     id="thin-pool-refused"),
        pytest.param({"internal": True},
                     "vg0/web1-root is an internal part of another logical volume",
                     id="internal-lv-refused"),
        pytest.param({"is_snapshot": True, "origin": "web1"},
                     "vg0/web1-root is a snapshot of vg0/web1", id="snapshot-refused"),
        pytest.param({"merging": True}, "vg0/web1-root has a snapshot merge in progress",
                     id="merging-refused"),
        pytest.param({"active": False}, "vg0/web1-root is not active", id="inactive-refused"),
        pytest.param({"device_open": True}, "vg0/web1-root is open by another process or device",
                     id="open-refused"),
    ],
)
def test_refusal_reason_names_why_an_lv_must_not_be_written(
        changes: dict[str, object], expected: str | None) -> None:
    assert refusal_reason(replace(PLAIN, **changes)) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("size", "requested", "expected"),
    [
        pytest.param(10 << 30, 1 << 30, (10 << 30) + (10 << 30) // 50 + (4 << 20),
                     id="a-small-request-grows-to-cover-a-full-write"),
        pytest.param(10 << 30, 20 << 30, 20 << 30, id="a-larger-request-is-kept"),
    ],
)
def test_a_rollback_snapshot_covers_the_whole_lv(size: int, requested: int,
                                                  expected: int) -> None:
    assert cow_snapshot_size(replace(PLAIN, size=size), requested) == expected
