"""When the watcher must refuse to write a logical volume: a table over the pure rule."""

from __future__ import annotations

from dataclasses import replace

import pytest

from watcher.core.lvm_rules import (
    MAX_LV_NAME,
    LvInfo,
    cow_snapshot_size,
    golden_name,
    lv_from_path,
    refusal_reason,
    swap_leftover,
)

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


# ---- clone names, recognisable from LVM alone ---------------------------------------------


def test_a_golden_name_is_deterministic_lvm_safe_and_fits_with_a_long_pool_name() -> None:
    digest = "0123456789abcdef" * 4
    assert golden_name(digest, "pool0") == "lvw-golden-0123456789abcdef-pool0"
    long = golden_name(digest, "p" * 120)
    assert long == golden_name(digest, "p" * 120) and len(long) + len("-part") <= MAX_LV_NAME
    assert long != golden_name(digest, "p" * 121)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        pytest.param("/dev/vg0/web1", ("vg0", "web1"), id="vg-path"),
        pytest.param("/dev/mapper/vg0-web1", ("vg0", "web1"), id="mapper-name"),
        pytest.param("/dev/mapper/my--vg-web--1", ("my-vg", "web-1"), id="mapper-escaped-dashes"),
        pytest.param("/dev/dm-3", None, id="dm-node"),
        pytest.param("/srv/vms/web1.img", None, id="a-file"),
        pytest.param("/dev/mapper/nodash", None, id="mapper-without-lv"),
    ],
)
def test_the_lv_a_path_names_is_known_without_the_device(
        path: str, expected: tuple[str, str] | None) -> None:
    assert lv_from_path(path) == expected


def test_an_interrupted_swap_is_recognised_from_the_lvs_in_the_vg() -> None:
    root = replace(PLAIN, lv="web1", size=8 << 20)
    previous = replace(PLAIN, lv="web1-vw-prev", size=16 << 20)
    assert swap_leftover("vg", "web1", [root, replace(PLAIN, lv="other-vw-prev")]) is None
    renamed = swap_leftover("vg", "web1", [previous])
    assert renamed is not None and not renamed.cloned
    cloned = swap_leftover("vg", "web1", [replace(root, active=False), previous])
    assert cloned is not None and cloned.cloned and not cloned.lv_active
    assert (cloned.lv_size, cloned.previous_size) == (8 << 20, 16 << 20)
