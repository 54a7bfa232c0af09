"""What a reprovision does with its facts: a table of refusals and one of step lists."""

from __future__ import annotations

from dataclasses import replace

import pytest

from watcher.core.domain import DomainSnapshot, DomainState, Fail, RootDiskSource, decide
from watcher.core.lvm_rules import GOLDEN_TAG, OWNER_TAG, LvInfo, SwapLeftover, digest_tag
from watcher.core.plan import ImageFacts, JobFacts, PoolVolume, TargetFacts, plan, size_plan
from watcher.core.policy import DomainRule, ImageSpec, PolicySet
from watcher.core.steps import (
    ActivateLv,
    CheckShutOff,
    CloneGolden,
    Discard,
    DropPrevious,
    DropSnapshot,
    ExtendLv,
    GrowClone,
    GrowVolume,
    MakeGolden,
    MarkProvisioned,
    MarkProvisioning,
    Plan,
    Refusal,
    RemoveLv,
    RenameLv,
    Snapshot,
    StartDomain,
    SwapOut,
    WriteImage,
)

MiB = 1 << 20
GiB = 1 << 30
DIGEST = "ab" * 32
IMAGE = ImageFacts("ubuntu", DIGEST, "qcow2", 10 * GiB)
THICK = LvInfo(vg="vg0", lv="web1", path="/dev/vg0/web1", size=10 * GiB, active=True,
               device_open=False, is_snapshot=False, is_thin_pool=False, is_thin=False,
               pool=None, extent_size=4 * MiB, data_percent=None, origin=None)
THIN = replace(THICK, is_thin=True, pool="pool0", data_percent=12.0)
FILE = TargetFacts("/srv/vms/web1.img", "/srv/vms/web1.img", size=10 * GiB)
DIR_POOL = replace(FILE, pool_volume=PoolVolume("images", "dir", 10 * GiB))
LV = TargetFacts("/dev/vg0/web1", "/dev/dm-3", lv=THICK)
LOGICAL = replace(LV, pool_volume=PoolVolume("vg0", "logical", 10 * GiB))


class Volumes:
    def __init__(self, allow: tuple[str, ...] = ("/srv/vms/*", "/dev/vg0/*"),
                 lvm_vgs: tuple[str, ...] = ()) -> None:
        self.allow = allow
        self.lvm_vgs = lvm_vgs


ALLOW = Volumes()


def facts(target: TargetFacts | None = FILE, *, fmt: str | None = "raw",
          problem: str | None = None) -> JobFacts:
    disk = None if problem else RootDiskSource("file", "vda", path="/srv/vms/web1.img",
                                               format=fmt)
    return JobFacts("web1", "uuid-1", None, IMAGE, disk, problem, target)


def rule(**changes: object) -> DomainRule:
    return replace(DomainRule("web*", "ubuntu"), **changes)  # type: ignore[arg-type]


def smaller(target: TargetFacts, size: int = 2 * GiB) -> TargetFacts:
    if target.lv is not None:
        target = replace(target, lv=replace(target.lv, size=size))
    if target.pool_volume is not None:
        target = replace(target, pool_volume=replace(target.pool_volume, capacity=size))
    return replace(target, size=size if target.size is not None else None)


# ---- refusals ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("job", "policy", "volumes", "reason"),
    [
        pytest.param(facts(None, problem="domain has no <disk device='disk'>"), rule(), ALLOW,
                     "domain has no <disk device='disk'>", id="no-root-disk"),
        pytest.param(facts(None, fmt="qcow2"), rule(), ALLOW,
                     "disk vda has format qcow2; only raw volumes are written",
                     id="disk-not-raw"),
        pytest.param(facts(None), rule(), ALLOW, "the root disk's volume was not resolved",
                     id="volume-not-resolved"),
        pytest.param(facts(replace(LV, lv=replace(THICK, device_open=True))), rule(), ALLOW,
                     "vg0/web1 is open by another process or device", id="lv-open"),
        pytest.param(facts(replace(LV, lv=replace(THICK, is_snapshot=True, origin="x"))),
                     rule(), Volumes(lvm_vgs=("vg0",)), "vg0/web1 is a snapshot of vg0/x",
                     id="lv-is-a-snapshot-even-in-an-allowed-vg"),
        pytest.param(facts(replace(LV, lv=replace(THICK, is_thin_pool=True))), rule(), ALLOW,
                     "vg0/web1 is a thin pool, not a volume", id="thin-pool"),
        pytest.param(facts(), rule(), Volumes(allow=("/dev/mapper/*",)),
                     "root disk /srv/vms/web1.img matches no volumes.allow pattern",
                     id="not-allowed"),
        pytest.param(facts(DIR_POOL), rule(), Volumes(allow=()),
                     "root disk /srv/vms/web1.img is in a 'dir' pool; with an empty "
                     "volumes.allow only volumes of libvirt 'logical' pools are written",
                     id="empty-allow-list-refuses-a-dir-pool"),
        pytest.param(facts(replace(FILE, size=None, size_problem="cannot open root disk x")),
                     rule(), ALLOW, "cannot open root disk x", id="size-unreadable"),
        pytest.param(facts(smaller(FILE)), rule(grow=False), ALLOW,
                     f"image needs {10 * GiB} bytes, volume /srv/vms/web1.img has {2 * GiB}; "
                     "the policy does not allow growing it (grow: false)",
                     id="too-small-grow-false"),
        pytest.param(facts(smaller(FILE)), rule(grow=True), ALLOW,
                     f"image needs {10 * GiB} bytes, volume /srv/vms/web1.img has {2 * GiB}; "
                     "it is neither a libvirt storage volume nor an LV, so it cannot be grown",
                     id="too-small-plain-file-cannot-grow"),
    ],
)
def test_a_job_is_refused_with_the_reason(job: JobFacts, policy: DomainRule,
                                          volumes: Volumes, reason: str) -> None:
    assert plan(job, policy, volumes) == Refusal(reason)


def test_the_lv_refusal_comes_before_the_allow_list() -> None:
    job = facts(replace(LV, lv=replace(THICK, device_open=True)))
    assert plan(job, rule(), Volumes(allow=("/nowhere/*",))) == Refusal(
        "vg0/web1 is open by another process or device")


def test_a_domain_with_a_managed_save_image_never_gets_a_plan() -> None:
    policies = PolicySet({"ubuntu": ImageSpec("ubuntu", "b", "k", None, "qcow2")}, (rule(),))
    action = decide(DomainSnapshot("web1", "uuid-1", True, True, DomainState("reprovision")),
                    policies)
    assert isinstance(action, Fail) and "managed-save image" in action.reason


# ---- plans ---------------------------------------------------------------------------------

BEFORE = [MarkProvisioning("ubuntu", DIGEST), CheckShutOff("before write")]
AFTER = [CheckShutOff("after write")]
DONE = [MarkProvisioned("ubuntu", DIGEST)]


@pytest.mark.parametrize(
    ("target", "policy", "volumes", "steps"),
    [
        pytest.param(FILE, rule(), ALLOW,
                     [*BEFORE, WriteImage("/srv/vms/web1.img", False), *AFTER, *DONE],
                     id="file-volume-that-fits"),
        pytest.param(FILE, rule(start=True), ALLOW,
                     [*BEFORE, WriteImage("/srv/vms/web1.img", False), *AFTER, *DONE,
                      StartDomain()], id="file-volume-then-start"),
        pytest.param(replace(FILE, size=20 * GiB), rule(grow=True), ALLOW,
                     [*BEFORE, WriteImage("/srv/vms/web1.img", False), *AFTER, *DONE],
                     id="larger-volume-is-never-shrunk"),
        pytest.param(smaller(DIR_POOL), rule(grow=True), ALLOW,
                     [*BEFORE, GrowVolume("/srv/vms/web1.img", 10 * GiB),
                      WriteImage("/srv/vms/web1.img", False), *AFTER, *DONE],
                     id="pool-volume-grown-through-libvirt"),
        pytest.param(LV, rule(), ALLOW,
                     [*BEFORE, WriteImage("/dev/dm-3", False), *AFTER, *DONE],
                     id="thick-lv"),
        pytest.param(LV, rule(), Volumes(allow=(), lvm_vgs=("vg0",)),
                     [*BEFORE, WriteImage("/dev/dm-3", False), *AFTER, *DONE],
                     id="lv-of-an-allowed-vg"),
        pytest.param(LV, rule(snapshot=GiB), ALLOW,
                     [*BEFORE, Snapshot("vg0/web1", GiB), WriteImage("/dev/dm-3", False),
                      *AFTER, DropSnapshot("vg0/web1"), *DONE],
                     id="thick-lv-with-snapshot"),
        pytest.param(replace(LV, lv=THIN), rule(clone="never"), ALLOW,
                     [*BEFORE, Discard("/dev/vg0/web1"), WriteImage("/dev/dm-3", True),
                      *AFTER, *DONE], id="thin-lv-is-discarded-and-written-sparse"),
        pytest.param(replace(LV, lv=THIN), rule(snapshot=GiB, clone="never"), ALLOW,
                     [*BEFORE, Snapshot("vg0/web1", GiB), Discard("/dev/vg0/web1"),
                      WriteImage("/dev/dm-3", True), *AFTER, DropSnapshot("vg0/web1"),
                      *DONE], id="thin-lv-snapshot-before-discard"),
        pytest.param(smaller(LV), rule(grow=True, snapshot=GiB), ALLOW,
                     [*BEFORE, ExtendLv("vg0/web1", 10 * GiB), Snapshot("vg0/web1", GiB),
                      WriteImage("/dev/dm-3", False), *AFTER, DropSnapshot("vg0/web1"),
                      *DONE], id="lv-without-pool-extended-then-snapshot"),
        pytest.param(smaller(LOGICAL), rule(grow=True), Volumes(allow=()),
                     [*BEFORE, GrowVolume("/dev/dm-3", 10 * GiB),
                      WriteImage("/dev/dm-3", False), *AFTER, *DONE],
                     id="lv-of-a-logical-pool-grown-through-libvirt"),
    ],
)
def test_a_job_plans_these_steps(target: TargetFacts, policy: DomainRule, volumes: Volumes,
                                 steps: list[object]) -> None:
    decided = plan(facts(target), policy, volumes)
    assert isinstance(decided, Plan), decided
    assert list(decided.steps) == steps
    assert decided.notes == ()


def test_a_snapshot_asked_for_a_file_volume_is_a_note_not_a_step() -> None:
    decided = plan(facts(FILE), rule(snapshot=GiB), ALLOW)
    assert isinstance(decided, Plan)
    assert not any(isinstance(step, Snapshot | DropSnapshot) for step in decided.steps)
    assert decided.notes == ("policy asks for a rollback snapshot but the root disk is not an "
                             "LV; writing without one",)


def test_every_plan_marks_provisioning_first_and_checks_shut_off_around_the_write() -> None:
    decided = plan(facts(smaller(LV)), rule(grow=True, snapshot=GiB, start=True), ALLOW)
    assert isinstance(decided, Plan)
    kinds = [type(step) for step in decided.steps]
    write = kinds.index(WriteImage)
    assert kinds[:2] == [MarkProvisioning, CheckShutOff]
    assert kinds[write + 1] is CheckShutOff
    assert kinds.index(MarkProvisioned) > write
    assert decided.describe()[0] == f"mark provisioning ubuntu {DIGEST[:12]}"


# ---- the size plan -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("virtual_size", "target", "grow", "expected"),
    [
        pytest.param(10 * GiB, FILE, False, None, id="exact-fit"),
        pytest.param(GiB, FILE, False, None, id="smaller-image-fits"),
        pytest.param(10 * GiB + 1, DIR_POOL, True, GrowVolume("/srv/vms/web1.img", 10 * GiB + 1),
                     id="one-byte-over-grows-a-pool-volume"),
        pytest.param(11 * GiB, LV, True, ExtendLv("vg0/web1", 11 * GiB), id="grows-an-lv"),
        pytest.param(11 * GiB, LOGICAL, True, GrowVolume("/dev/dm-3", 11 * GiB),
                     id="libvirt-grows-an-lv-it-knows"),
    ],
)
def test_the_size_plan(virtual_size: int, target: TargetFacts, grow: bool,
                       expected: GrowVolume | ExtendLv | None) -> None:
    assert size_plan(virtual_size, target, grow) == expected


@pytest.mark.parametrize("grow", [False, True], ids=["grow-false", "grow-true"])
def test_a_too_small_volume_is_refused_unless_it_can_grow(grow: bool) -> None:
    verdict = size_plan(10 * GiB + 1, FILE, grow)
    assert isinstance(verdict, Refusal)
    assert ("grow: false" in verdict.reason) is not grow


# ---- the clone path ----------------------------------------------------------------------

GOLDEN_NAME = f"lvw-golden-{DIGEST[:16]}-pool0"
GOLDEN = replace(THIN, lv=GOLDEN_NAME, path=f"/dev/vg0/{GOLDEN_NAME}", active=False,
                 tags=(OWNER_TAG, GOLDEN_TAG, digest_tag(DIGEST)))
THIN_LV = replace(LV, lv=THIN)
SWAP = [SwapOut("vg0", "web1", "web1-vw-prev"), CloneGolden(f"vg0/{GOLDEN_NAME}", "vg0/web1", ())]
RECORD = [CheckShutOff("after write"), MarkProvisioned("ubuntu", DIGEST)]
DROP = [DropPrevious("vg0/web1-vw-prev")]
CLONE = [*SWAP, *RECORD, *DROP]
MAKE = MakeGolden("vg0", "pool0", GOLDEN_NAME, DIGEST, 10 * GiB)


def with_golden(target: TargetFacts) -> TargetFacts:
    return replace(target, golden=GOLDEN)


@pytest.mark.parametrize(
    ("target", "policy", "steps"),
    [
        pytest.param(with_golden(THIN_LV), rule(), [*BEFORE, *CLONE],
                     id="golden-ready-clone-swap-record-drop"),
        pytest.param(THIN_LV, rule(), [BEFORE[0], MAKE, BEFORE[1], *CLONE],
                     id="no-golden-yet-it-is-made-first"),
        pytest.param(with_golden(THIN_LV), rule(start=True),
                     [*BEFORE, *SWAP, *RECORD, StartDomain(), *DROP],
                     id="started-before-the-old-lv-is-removed"),
        pytest.param(with_golden(THIN_LV), rule(snapshot=GiB), [*BEFORE, *CLONE],
                     id="the-old-lv-is-the-rollback-no-snapshot"),
        pytest.param(with_golden(replace(THIN_LV, lv=replace(THIN, size=20 * GiB))), rule(),
                     [*BEFORE, *SWAP, GrowClone("vg0/web1", 20 * GiB), *RECORD, *DROP],
                     id="grown-to-the-old-lvs-size"),
        pytest.param(with_golden(smaller(THIN_LV)), rule(grow=True), [*BEFORE, *CLONE],
                     id="too-small-lv-that-may-grow-gets-the-goldens-size"),
        pytest.param(with_golden(replace(THIN_LV, lv=replace(
            THIN, is_snapshot=True, origin="lvw-golden-0000000000000000-pool0",
            origin_is_golden=True))), rule(), [*BEFORE, *CLONE],
                     id="a-clone-of-an-older-golden-is-cloned-again"),
    ],
)
def test_a_thin_lv_is_cloned_from_the_golden(target: TargetFacts, policy: DomainRule,
                                             steps: list[object]) -> None:
    decided = plan(facts(target), policy, ALLOW)
    assert isinstance(decided, Plan), decided
    assert list(decided.steps) == steps
    assert decided.clones and not decided.recovery and decided.notes == ()


def test_the_clone_takes_the_old_lvs_tags_but_not_the_watchers_own() -> None:
    tagged = replace(THIN, tags=("backup", "owner=ops", OWNER_TAG, digest_tag("ef" * 32)))
    decided = plan(facts(with_golden(replace(THIN_LV, lv=tagged))), rule(), ALLOW)
    assert isinstance(decided, Plan)
    clone = next(step for step in decided.steps if isinstance(step, CloneGolden))
    assert clone.tags == ("backup", "owner=ops")


@pytest.mark.parametrize(
    ("target", "policy", "reason"),
    [
        pytest.param(smaller(with_golden(THIN_LV)), rule(), f"image needs {10 * GiB} bytes, "
                     f"volume /dev/dm-3 has {2 * GiB}; the policy does not allow growing it "
                     "(grow: false)", id="too-small-grow-false"),
        pytest.param(with_golden(replace(THIN_LV, lv=replace(THIN, device_open=True))), rule(),
                     "vg0/web1 is open by another process or device", id="lv-open"),
        pytest.param(with_golden(replace(THIN_LV, lv=replace(THIN, active=False))), rule(),
                     "vg0/web1 is not active", id="lv-inactive"),
        pytest.param(with_golden(replace(THIN_LV, lv=replace(
            THIN, is_snapshot=True, origin="mine"))), rule(),
                     "vg0/web1 is a snapshot of vg0/mine", id="snapshot-of-an-lv-not-a-golden"),
        pytest.param(replace(THIN_LV, lv=GOLDEN), rule(),
                     f"vg0/{GOLDEN_NAME} is a golden image LV of the watcher, not a domain's "
                     "disk", id="the-golden-itself"),
    ],
)
def test_the_clone_path_refuses_like_the_copy_path(target: TargetFacts, policy: DomainRule,
                                                   reason: str) -> None:
    assert plan(facts(target), policy, ALLOW) == Refusal(reason)


def test_the_clone_path_respects_the_allow_list() -> None:
    verdict = plan(facts(with_golden(THIN_LV)), rule(), Volumes(allow=("/dev/other/*",)))
    assert isinstance(verdict, Refusal) and "matches no volumes.allow pattern" in verdict.reason


@pytest.mark.parametrize(
    "target",
    [pytest.param(with_golden(THIN_LV), id="clone-never"),
     pytest.param(with_golden(LV), id="thick-lv"),
     pytest.param(FILE, id="file")],
)
def test_clone_never_or_a_volume_that_is_no_thin_lv_is_copied(target: TargetFacts) -> None:
    decided = plan(facts(target), rule(clone="never" if target.lv == THIN else "auto"), ALLOW)
    assert isinstance(decided, Plan)
    assert not decided.clones
    assert any(isinstance(step, WriteImage) for step in decided.steps)


def test_an_lv_name_too_long_for_the_swap_names_is_copied() -> None:
    long = replace(THIN, lv="x" * 125)
    decided = plan(facts(replace(THIN_LV, lv=long)), rule(), ALLOW)
    assert isinstance(decided, Plan) and not decided.clones


def test_a_clone_plan_records_provisioned_before_it_removes_the_old_lv() -> None:
    decided = plan(facts(THIN_LV), rule(start=True), ALLOW)
    assert isinstance(decided, Plan)
    kinds = [type(step) for step in decided.steps]
    assert kinds[0] is MarkProvisioning
    assert (kinds.index(CheckShutOff) < kinds.index(SwapOut) < kinds.index(CloneGolden)
            < kinds.index(MarkProvisioned) < kinds.index(DropPrevious))
    assert kinds[kinds.index(CloneGolden) + 1] is CheckShutOff
    assert decided.describe()[2] == "check shut off before write"
    assert decided.describe()[3] == "rename vg0/web1 to vg0/web1-vw-prev (the rollback)"
    assert decided.describe()[4].startswith(f"clone vg0/{GOLDEN_NAME} as vg0/web1")


# ---- an interrupted swap -----------------------------------------------------------------


def leftover(*, lv: bool, active: bool = True, size: int = 10 * GiB) -> SwapLeftover:
    return SwapLeftover("vg0", "web1", lv, lv and active, size if lv else 0, 10 * GiB)


REMOVE_PREVIOUS = RemoveLv("vg0/web1-vw-prev", "replaced by the clone of an interrupted swap")


@pytest.mark.parametrize(
    ("swap", "steps"),
    [
        pytest.param(leftover(lv=False), [RenameLv("vg0", "web1-vw-prev", "web1")],
                     id="old-lv-renamed-away-is-renamed-back"),
        pytest.param(leftover(lv=True), [REMOVE_PREVIOUS], id="clone-made-old-lv-removed"),
        pytest.param(leftover(lv=True, size=GiB),
                     [GrowClone("vg0/web1", 10 * GiB), REMOVE_PREVIOUS],
                     id="clone-not-grown-yet-is-grown"),
        pytest.param(leftover(lv=True, active=False, size=GiB),
                     [ActivateLv("vg0/web1"), GrowClone("vg0/web1", 10 * GiB), REMOVE_PREVIOUS],
                     id="clone-not-active-yet-is-activated"),
    ],
)
def test_an_interrupted_swap_gets_a_recovery_plan(swap: SwapLeftover,
                                                  steps: list[object]) -> None:
    # With the LV renamed away there is no LV and no size: the recovery comes first.
    target = TargetFacts("/dev/vg0/web1", "/dev/vg0/web1", lv=THIN if swap.lv_exists else None,
                         size_problem=None if swap.lv_exists else "cannot open", swap=swap)
    decided = plan(facts(target), rule(), ALLOW)
    assert isinstance(decided, Plan), decided
    assert decided.recovery and list(decided.steps) == steps


def test_an_interrupted_swap_outside_the_allow_list_is_left_alone() -> None:
    target = TargetFacts("/dev/vg0/web1", "/dev/vg0/web1",
                         swap=leftover(lv=False))
    verdict = plan(facts(target), rule(), Volumes(allow=("/dev/other/*",)))
    assert isinstance(verdict, Refusal)
    verdict = plan(facts(target), rule(), Volumes(allow=(), lvm_vgs=("vg0",)))
    assert isinstance(verdict, Plan) and verdict.recovery
