"""Running a plan, a domain's or an API job's, in the one executor: steps in order, the
write marker, the rollback guard around the write, errors that say whether the volume
was rolled back or touched. libvirt, LVM and qemu-img are fakes here; the LVM
suite and the libvirt integration tests run the real ones."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from watcher.adapters import lvm, openers, write_markers
from watcher.adapters.hypervisor import VolumeFacts
from watcher.adapters.hypervisor.storage import DiskUser
from watcher.core.domain import DomainState, RootDiskSource
from watcher.core.errors import ImageWriteError, Refused, TemporaryImageWriteError, WatcherError
from watcher.core.lvm_rules import LvInfo
from watcher.core.plan import ImageFacts, JobFacts, PoolVolume, TargetFacts, plan
from watcher.core.policy import DomainRule
from watcher.core.steps import Plan
from watcher.core.volume_plan import VolumeJobFacts, plan_volume_job
from watcher.executor import Deferred, Executor, Target, WriteFailed

MiB = 1 << 20
DIGEST = "cd" * 32
LV = LvInfo(vg="vg0", lv="web1", path="/dev/vg0/web1", size=64 * MiB, active=True,
            device_open=False, is_snapshot=False, is_thin_pool=False, is_thin=False,
            pool=None, extent_size=4 * MiB, data_percent=None, origin=None)


class Volumes:
    allow = ("/dev/*", "/srv/*")
    lvm_vgs: tuple[str, ...] = ()


@dataclass
class Grown:
    capacity: int


class World:
    """A fake hypervisor, LVM and writer that log every call in one list."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[str] = []
        self.shut_off = [True, True]
        self.write_error: BaseException | None = None
        self.start_error: WatcherError | None = None
        self.grown_to: int | None = None
        self.during_write: Callable[[], None] = lambda: None
        monkeypatch.setattr(lvm, "rollback_snapshot", self.rollback_snapshot)
        monkeypatch.setattr(lvm, "discard", self.discard)
        monkeypatch.setattr(lvm, "grow", self.grow)
        monkeypatch.setattr(lvm, "recognise", self.recognise)
        monkeypatch.setattr(write_markers, "marked_writing", self.marked_writing)
        monkeypatch.setattr(openers, "open_by", lambda path: [])
        monkeypatch.setattr(openers, "kernel_holders", lambda path: [])
        self.users: list[list[DiskUser]] = []
        """What ``domains_using`` answers in turn (then nobody)."""
        self.show_markers = False
        """Log the write marker's taking and removal in ``calls`` too."""

    # the hypervisor
    async def set_state(self, uuid: str, state: DomainState) -> None:
        self.calls.append(f"state {state.kind} {state.image}")

    async def is_shut_off(self, uuid: str) -> bool:
        self.calls.append("is shut off")
        return self.shut_off.pop(0)

    async def grow_volume(self, path: str, capacity: int) -> Grown:
        self.calls.append(f"grow volume {path} {capacity}")
        return Grown(self.grown_to if self.grown_to is not None else capacity)

    async def start(self, uuid: str) -> None:
        self.calls.append("start")
        if self.start_error is not None:
            raise self.start_error

    # LVM
    @contextlib.asynccontextmanager
    async def rollback_snapshot(self, info: LvInfo, size: int) -> AsyncIterator[LvInfo]:
        self.calls.append(f"snapshot {info.name} {size}")
        try:
            yield info
        except BaseException:
            self.calls.append("merged back")
            raise
        self.calls.append("snapshot removed")

    async def discard(self, path: str) -> None:
        self.calls.append(f"discard {path}")

    async def grow(self, info: LvInfo, size: int) -> LvInfo:
        self.calls.append(f"lvextend {info.name} {size}")
        return replace(info, size=size)

    async def recognise(self, path: str) -> LvInfo:
        self.calls.append(f"recognise {path}")
        return LV

    async def create_volume(self, pool: str, name: str, capacity: int) -> VolumeFacts:
        self.calls.append(f"create volume {pool}/{name} {capacity}")
        return VolumeFacts(f"/{pool}/{name}.img", name, pool, "dir", capacity, 0)

    async def domains_using(self, real_path: str, *, pool: str | None = None,
                            volume: str | None = None) -> list[DiskUser]:
        self.calls.append(f"users of {real_path}")
        return self.users.pop(0) if self.users else []

    # the start interlock
    @contextlib.contextmanager
    def marked_writing(self, real_path: str, *, pool: str | None, volume: str | None,
                       job_id: str) -> Iterator[Path]:
        if self.show_markers:
            self.calls.append(f"marker {real_path} for {job_id}")
        try:
            yield Path("/run/marker")
        finally:
            if self.show_markers:
                self.calls.append("marker removed")

    # qemu-img
    async def write_image(self, source: Path, source_format: str, target: Path, *,
                          target_is_zero: bool = False,
                          on_progress: Callable[[float], None] | None = None) -> None:
        self.calls.append(f"write {target} zero={target_is_zero}")
        if on_progress is not None:
            on_progress(100.0)
        self.during_write()
        if self.write_error is not None:
            raise self.write_error

    async def run(self, target: TargetFacts, rule: DomainRule, virtual_size: int = 64 * MiB,
                  ) -> None:
        facts = JobFacts("web1", "uuid-1", "v2", ImageFacts("v2", DIGEST, "qcow2", virtual_size),
                         RootDiskSource("block", "vda", path=target.path), target=target)
        decided = plan(facts, rule, Volumes())
        assert isinstance(decided, Plan), decided
        log = Log()
        await Executor.for_domain(self, self.write_image, facts, Path("/cache/x"),
                                 log).run(decided)


class Log:
    def __init__(self) -> None:
        self.warnings: list[str] = []

    def warning(self, message: str, **fields: Any) -> None:
        self.warnings.append(message)

    def info(self, message: str, **fields: Any) -> None:
        pass

    def debug(self, message: str, **fields: Any) -> None:
        pass


@pytest.fixture
def world(monkeypatch: pytest.MonkeyPatch) -> World:
    return World(monkeypatch)


THICK = TargetFacts("/dev/vg0/web1", "/dev/dm-1", lv=LV)
THIN = replace(THICK, lv=replace(LV, is_thin=True, pool="pool"))
SNAPSHOT = DomainRule("web*", "v2", snapshot=MiB)
SNAPSHOT_SIZE = 64 * MiB + 64 * MiB // 50 + 4 * MiB


async def test_a_thin_lv_plan_runs_every_step_in_order(world: World) -> None:
    await world.run(THIN, replace(SNAPSHOT, start=True, clone="never"))
    assert world.calls == [
        "state provisioning v2", "is shut off", f"snapshot vg0/web1 {SNAPSHOT_SIZE}",
        "discard /dev/vg0/web1",
        "write /dev/dm-1 zero=True", "is shut off", "snapshot removed",
        "state provisioned v2", "start"]


async def test_a_failed_write_under_a_snapshot_is_rolled_back_and_says_so(world: World) -> None:
    world.write_error = ImageWriteError.build("/dev/dm-1", 1, "I/O error", temporary=False)
    with pytest.raises(WriteFailed) as failed:
        await world.run(THICK, SNAPSHOT)
    assert failed.value.rolled_back is True
    assert str(failed.value) == ("writing /dev/dm-1 failed (exit 1): I/O error; the volume was "
                                 "rolled back to its previous content")
    assert world.calls[-1] == "merged back"


async def test_a_failed_write_without_a_snapshot_may_leave_a_partial_image(
        world: World) -> None:
    world.write_error = ImageWriteError.build("/dev/dm-1", 1, "I/O error", temporary=False)
    with pytest.raises(WriteFailed) as failed:
        await world.run(THICK, DomainRule("web*", "v2"))
    assert failed.value.rolled_back is False
    assert str(failed.value).endswith("; the volume may hold a partial image")
    assert "state provisioned v2" not in world.calls


async def test_a_busy_device_is_rolled_back_and_left_to_the_retry(world: World) -> None:
    world.write_error = ImageWriteError.build("/dev/dm-1", 1, "busy", temporary=True)
    with pytest.raises(TemporaryImageWriteError):
        await world.run(THICK, SNAPSHOT)
    assert world.calls[-1] == "merged back"


async def test_a_domain_started_before_the_write_defers_and_restores_the_request(
        world: World) -> None:
    world.shut_off = [False]
    with pytest.raises(Deferred):
        await world.run(THICK, SNAPSHOT)
    assert world.calls == ["state provisioning v2", "is shut off", "state reprovision v2"]


async def test_a_domain_started_during_the_write_fails_it_after_the_rollback(
        world: World) -> None:
    world.shut_off = [True, False]
    with pytest.raises(Refused, match="started while its volume was being written"):
        await world.run(THICK, SNAPSHOT)
    assert world.calls[-2:] == ["is shut off", "merged back"]


async def test_a_libvirt_grow_that_falls_short_is_refused_before_writing(world: World) -> None:
    target = replace(THICK, lv=replace(LV, size=16 * MiB),
                     pool_volume=PoolVolume("vg0", "logical", 16 * MiB))
    world.grown_to = 32 * MiB
    with pytest.raises(Refused, match=f"left {32 * MiB}"):
        await world.run(target, replace(SNAPSHOT, grow=True))
    assert not any(call.startswith("write") for call in world.calls)


async def test_a_grown_lv_is_read_again_before_its_snapshot(world: World) -> None:
    target = replace(THICK, lv=replace(LV, size=16 * MiB),
                     pool_volume=PoolVolume("vg0", "logical", 16 * MiB))
    await world.run(target, replace(SNAPSHOT, grow=True))
    assert world.calls[2:5] == [f"grow volume /dev/dm-1 {64 * MiB}", "recognise /dev/dm-1",
                                f"snapshot vg0/web1 {SNAPSHOT_SIZE}"]


async def test_an_lv_outside_libvirt_is_extended(world: World) -> None:
    await world.run(replace(THICK, lv=replace(LV, size=16 * MiB)),
                    replace(SNAPSHOT, grow=True, snapshot=None))
    assert world.calls[2] == f"lvextend vg0/web1 {64 * MiB}"


async def test_a_failed_start_leaves_the_job_done(world: World) -> None:
    world.start_error = WatcherError("no memory")
    await world.run(TargetFacts("/srv/web1.img", "/srv/web1.img", size=64 * MiB),
                    DomainRule("web*", "v2", start=True))
    assert world.calls[-2:] == ["state provisioned v2", "start"]


# ---- the clone path ----------------------------------------------------------------------


class FakeSwap:
    """``lvm.swapping_in`` and ``Goldens`` as calls in the world's list."""

    def __init__(self, world: World) -> None:
        self.world = world

    async def rename_old(self) -> None:
        self.world.calls.append("rename old away")

    async def clone(self, golden: str, tags: Any) -> None:
        self.world.calls.append(f"clone {golden} tags={','.join(tags)}")

    async def grow(self, size: int) -> None:
        self.world.calls.append(f"grow clone {size}")

    @contextlib.asynccontextmanager
    async def swapping_in(self, vg: str, lv: str) -> AsyncIterator[FakeSwap]:
        try:
            yield self
        except BaseException:
            self.world.calls.append("clone removed, old lv back")
            raise
        self.world.calls.append("previous removed")

    @contextlib.asynccontextmanager
    async def held(self, vg: str, name: str) -> AsyncIterator[None]:
        yield

    async def ensure(self, vg: str, pool: str, digest: str, size: int, source: Path,
                     image_format: str) -> None:
        self.world.calls.append(f"golden made in {vg}/{pool}")


async def run_clone(world: World, monkeypatch: pytest.MonkeyPatch, rule: DomainRule) -> None:
    fake = FakeSwap(world)
    monkeypatch.setattr(lvm, "swapping_in", fake.swapping_in)
    target = replace(THIN, lv=replace(LV, is_thin=True, pool="pool", size=128 * MiB,
                                      tags=("owner=ops",)))
    facts = JobFacts("web1", "uuid-1", "v2", ImageFacts("v2", DIGEST, "qcow2", 64 * MiB),
                     RootDiskSource("block", "vda", path=target.path), target=target)
    decided = plan(facts, rule, Volumes())
    assert isinstance(decided, Plan) and decided.clones, decided
    await Executor.for_domain(world, world.write_image, facts, Path("/cache/x"), Log(),
                              goldens=fake).run(decided)  # type: ignore[arg-type]


async def test_a_clone_plan_runs_its_steps_in_order_and_records_before_removing_the_old_lv(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    await run_clone(world, monkeypatch, DomainRule("web*", "v2", start=True))
    assert world.calls == [
        "state provisioning v2", "golden made in vg0/pool", "is shut off", "rename old away",
        f"clone vg0/lvw-golden-{DIGEST[:16]}-pool tags=owner=ops", f"grow clone {128 * MiB}",
        "is shut off", "state provisioned v2", "start", "previous removed"]


async def test_a_domain_started_before_the_record_gets_its_old_lv_back(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    world.shut_off = [True, False]
    with pytest.raises(Refused, match="started while its volume was being written"):
        await run_clone(world, monkeypatch, DomainRule("web*", "v2"))
    assert world.calls[-2:] == ["is shut off", "clone removed, old lv back"]
    assert not any(call.startswith("state provisioned") for call in world.calls)


# ---- the write marker, and an API job's plan in the same executor ------------------------


async def test_a_domain_plan_holds_the_write_marker_from_the_write_until_the_record(
        world: World) -> None:
    world.show_markers = True
    await world.run(THICK, DomainRule("web*", "v2"))
    write = world.calls.index("write /dev/dm-1 zero=False")
    assert world.calls[write - 1] == "marker /dev/dm-1 for reprovision web1"
    assert world.calls[write + 1:] == ["is shut off", "state provisioned v2", "marker removed"]


async def test_a_failed_domain_plan_removes_the_marker_after_the_rollback(
        world: World) -> None:
    world.show_markers = True
    world.shut_off = [True, False]
    with pytest.raises(Refused):
        await world.run(THICK, SNAPSHOT)
    assert world.calls[-3:] == ["is shut off", "merged back", "marker removed"]


def api_facts(**changes: Any) -> VolumeJobFacts:
    facts = VolumeJobFacts("images", "pool", "web1", 128 * MiB,
                           ImageFacts("api-0123", DIGEST, "qcow2", 64 * MiB), pool_type="dir")
    return replace(facts, **changes)


async def run_api(world: World, facts: VolumeJobFacts) -> Target:
    decided = plan_volume_job(facts)
    assert isinstance(decided, Plan), decided
    target = Target(facts.pool, facts.volume)
    await Executor(world, world.write_image, facts.image, Path("/cache/x"), target, Log(),
                   "job-1").run(decided)
    return target


async def test_an_api_plan_runs_in_the_same_executor_under_the_marker(world: World) -> None:
    world.show_markers = True
    target = await run_api(world, api_facts())
    assert world.calls == [
        f"create volume images/web1 {128 * MiB}",
        "marker /images/web1.img for job-1", "users of /images/web1.img",
        "write /images/web1.img zero=True", "users of /images/web1.img", "marker removed"]
    assert target.path == "/images/web1.img" and target.touched and target.wrote


async def test_an_api_plan_refused_before_the_write_says_what_it_changed(
        world: World) -> None:
    world.show_markers = True
    world.users = [[DiskUser("web1", "u-1", "running", False)]]
    with pytest.raises(Refused, match=r"in use by domain web1 \(running\)") as refused:
        await run_api(world, api_facts())
    assert refused.value.touched is True  # it created the volume first
    assert not any(call.startswith("write") for call in world.calls)
    assert world.calls[-1] == "marker removed"


async def test_a_volume_used_during_an_api_write_is_undefined_and_the_error_says_so(
        world: World) -> None:
    world.users = [[], [DiskUser("web1", "u-1", "running", False)]]
    with pytest.raises(Refused, match="used while being written") as refused:
        await run_api(world, api_facts())
    assert refused.value.touched is True
