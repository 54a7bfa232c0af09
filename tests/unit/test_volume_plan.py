"""The API job's plan: refusals in order, and the steps for each kind of volume."""

from __future__ import annotations

from dataclasses import replace

import pytest

from watcher.core.lvm_rules import LvInfo
from watcher.core.plan import ImageFacts
from watcher.core.steps import (
    CheckUnused,
    CreateVolume,
    Discard,
    ExtendLv,
    GrowVolume,
    Plan,
    Refusal,
    WriteImage,
)
from watcher.core.volume_plan import (
    DiskUserFact,
    ExistingVolume,
    VolumeJobFacts,
    plan_volume_job,
    usage_refusal,
)

MiB = 1 << 20
GiB = 1 << 30
IMAGE = ImageFacts("api-0123", "ab" * 32, "qcow2", 4 * GiB)
LV = LvInfo(vg="vg0", lv="web1", path="/dev/vg0/web1", size=10 * GiB, active=True,
            device_open=False, is_snapshot=False, is_thin_pool=False, is_thin=False,
            pool=None, extent_size=4 * MiB, data_percent=None, origin=None)
FILE = ExistingVolume("/pool/web1.img", "/pool/web1.img", 10 * GiB, "raw")
DIR = VolumeJobFacts("images", "pool", "web1", 10 * GiB, IMAGE, pool_type="dir")
LOGICAL = replace(DIR, pool="vg0", pool_type="logical")
VG = VolumeJobFacts("vg0", "vg", "web1", 10 * GiB, IMAGE)
AROUND_WRITE = (CheckUnused("before write"), WriteImage(None, target_is_zero=False),
                CheckUnused("after write"))


def steps(facts: VolumeJobFacts) -> tuple[object, ...]:
    decision = plan_volume_job(facts)
    assert isinstance(decision, Plan), decision
    return decision.steps


def reason(facts: VolumeJobFacts) -> str:
    decision = plan_volume_job(facts)
    assert isinstance(decision, Refusal), decision
    return decision.reason


def test_a_missing_volume_of_a_dir_pool_is_created_and_written_as_zeroes_skipped() -> None:
    assert steps(DIR) == (CreateVolume("images", "web1", 10 * GiB, "libvirt"),
                          CheckUnused("before write"), WriteImage(None, target_is_zero=True),
                          CheckUnused("after write"))


def test_a_missing_lv_is_created_by_libvirt_in_a_pool_and_by_lvcreate_in_a_bare_vg() -> None:
    assert steps(LOGICAL)[0] == CreateVolume("vg0", "web1", 10 * GiB, "libvirt")
    assert steps(LOGICAL)[1:] == AROUND_WRITE  # a new thick LV is not known to read as zero
    assert steps(VG)[0] == CreateVolume("vg0", "web1", 10 * GiB, "lvcreate")


def test_an_existing_volume_big_enough_is_written_as_it_is() -> None:
    assert steps(replace(DIR, existing=FILE)) == AROUND_WRITE


def test_a_smaller_volume_grows_to_the_size_asked_for_and_is_never_shrunk() -> None:
    small = replace(FILE, capacity=2 * GiB)
    assert steps(replace(DIR, existing=small))[0] == GrowVolume("/pool/web1.img", 10 * GiB)
    lv = ExistingVolume("/dev/vg0/web1", "/dev/dm-3", 2 * GiB, None, replace(LV, size=2 * GiB))
    assert steps(replace(VG, existing=lv))[0] == ExtendLv("vg0/web1", 10 * GiB)
    assert steps(replace(LOGICAL, existing=lv))[0] == GrowVolume("/dev/dm-3", 10 * GiB)
    big = replace(FILE, capacity=50 * GiB)
    assert steps(replace(DIR, existing=big, requested_size=1 * GiB)) == AROUND_WRITE


def test_a_thin_lv_is_discarded_before_a_write_that_skips_zeroes() -> None:
    thin = ExistingVolume("/dev/vg0/web1", "/dev/dm-3", 10 * GiB, None,
                          replace(LV, is_thin=True, pool="pool0"))
    assert steps(replace(VG, existing=thin)) == (
        CheckUnused("before write"), Discard("/dev/vg0/web1"),
        WriteImage(None, target_is_zero=True), CheckUnused("after write"))


@pytest.mark.parametrize(("facts", "expected"), [
    (replace(DIR, pool_kind=None), "neither a libvirt storage pool nor an LVM volume group"),
    (replace(DIR, pool_type="iscsi"), "has type iscsi"),
    (replace(DIR, pool_active=False), "is not active"),
    (replace(DIR, existing=replace(FILE, format="qcow2")), "has format qcow2"),
    (replace(VG, existing=ExistingVolume("/dev/vg0/web1", "/dev/dm-3", 10 * GiB, None,
                                         replace(LV, is_snapshot=True, origin="base"))),
     "is a snapshot"),
    (replace(DIR, existing=FILE, users=(DiskUserFact("web1", "running", False),)),
     "in use by domain web1 (running)"),
    (replace(DIR, existing=FILE, users=(DiskUserFact("web1", "paused", False),)),
     "in use by domain web1 (paused)"),
    (replace(DIR, existing=FILE, openers=("process 4242",)), "open by process 4242"),
    (replace(DIR, existing=FILE, openers=("/dev/loop3",)), "open by /dev/loop3"),
    (replace(DIR, requested_size=1 * GiB), "ask for volume_size_gb of at least 4"),
    (replace(DIR, existing=replace(FILE, capacity=1 * GiB), requested_size=2 * GiB),
     "would have 2147483648"),
])
def test_a_job_is_refused_with_the_reason(facts: VolumeJobFacts, expected: str) -> None:
    assert expected in reason(facts)


def test_shut_off_users_do_not_stop_the_job() -> None:
    users = (DiskUserFact("web1", "shut off", True), DiskUserFact("web2", "shut off", True))
    assert steps(replace(DIR, existing=FILE, users=users)) == AROUND_WRITE


def test_usage_refusal_names_every_busy_domain_and_only_those() -> None:
    users = (DiskUserFact("a", "running", False), DiskUserFact("b", "shut off", True),
             DiskUserFact("c", "paused", False))
    text = usage_refusal(users, (), "images/web1")
    assert text is not None and "a (running), c (paused)" in text and "b" not in text.split(
        "domain", 1)[1]
    assert usage_refusal((), (), "images/web1") is None
