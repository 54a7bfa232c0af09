"""Reprovisioning a thin LV by cloning its image's golden LV, on real device-mapper.

The whole job runs (``Reprovisioner``: facts, plan, executor, goldens) against real LVM.
Most tests let ``Host`` stand in for libvirt: one shut-off domain whose root disk is the
test's LV, and its metadata element in a file, so that a process killed mid-job leaves its
state for the next one exactly as libvirt would. The last one runs libvirtd and QEMU (TCG)
inside the guest and boots a domain from the cloned LV.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest

from tests.lvm.conftest import LVM_ENV, VolumeGroup, sh
from tests.lvm.test_lvm import MiB, fill_random, images_match, make_qcow2, sha256_of
from watcher.adapters import lvm
from watcher.adapters.hypervisor import DomainFacts
from watcher.adapters.lvm import clones as lvm_clones
from watcher.adapters.qemu_img import write_image
from watcher.cache import CacheEntry
from watcher.core.domain import DomainState, parse_state, render_state
from watcher.core.errors import WatcherError
from watcher.core.lvm_rules import GOLDEN_TAG, golden_name
from watcher.core.policy import DomainRule, ImageSpec, PolicySet
from watcher.reprovision import Reprovisioner

pytestmark = pytest.mark.lvm

UUID = "4a1b6c2e-0000-4000-8000-00000000c10e"
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Host:
    """libvirt's part of one domain: its XML, power state and metadata (in ``state_file``)."""

    disk: str
    state_file: Path
    shut_off_answers: list[bool] | None = None
    """Answers to ``is_shut_off`` in turn (then True); None: always True."""
    started: int = 0
    connected: bool = True

    @property
    def state(self) -> DomainState | None:
        text = self.state_file.read_text() if self.state_file.exists() else ""
        return parse_state(text or None)

    def request(self) -> None:
        self.state_file.write_text(render_state(DomainState("reprovision")))

    def lease(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    async def describe(self, uuid: str) -> DomainFacts | None:
        xml = (f"<domain type='kvm'><name>web1</name><uuid>{UUID}</uuid><devices>"
               "<disk type='block' device='disk'><driver name='qemu' type='raw'/>"
               f"<source dev='{self.disk}'/><target dev='vda' bus='virtio'/></disk>"
               "</devices></domain>")
        text = self.state_file.read_text() if self.state_file.exists() else None
        return DomainFacts(UUID, "web1", True, False, text or None, xml)

    async def set_state(self, uuid: str, state: DomainState) -> None:
        self.state_file.write_text(render_state(state))

    async def is_shut_off(self, uuid: str) -> bool:
        answers = self.shut_off_answers
        return answers.pop(0) if answers else True

    async def start(self, uuid: str) -> None:
        self.started += 1

    async def volume_for_path(self, path: str) -> None:
        return None  # no libvirt pool holds the LV

    async def volume_path(self, pool: str, volume: str) -> str:
        raise WatcherError("no pools here")

    async def domain_overview(self, include: Any) -> list[Any]:
        @dataclass
        class Row:
            domain: str
            uuid: str

        return [Row("web1", UUID)] if include("web1") else []


class Images:
    """The cache, holding the one entry."""

    def __init__(self, entry: CacheEntry) -> None:
        self.entry = entry

    async def ensure(self, image: ImageSpec) -> CacheEntry:
        return self.entry

    def current(self, image_name: str) -> CacheEntry | None:
        return self.entry

    async def durable(self, entry: CacheEntry) -> CacheEntry | None:
        return entry  # a file the test wrote and closed


class Volumes:
    def __init__(self, vg: str) -> None:
        self.allow = (f"/dev/{vg}/*",)
        self.lvm_vgs: tuple[str, ...] = ()


class CountingWriter:
    """``qemu_img.write_image``, counting what it writes."""

    def __init__(self) -> None:
        self.targets: list[str] = []

    async def __call__(self, source: Path, source_format: str, target: Path, *,
                       target_is_zero: bool = False,
                       on_progress: Callable[[float], None] | None = None) -> None:
        self.targets.append(str(target))
        await write_image(source, source_format, target, target_is_zero=target_is_zero,
                          on_progress=on_progress)


def entry_for(image: Path, virtual_size: int) -> CacheEntry:
    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    return CacheEntry(digest=digest, path=image, format="qcow2", virtual_size=virtual_size,
                      size=image.stat().st_size, image="ubuntu", bucket="b", key="k", etag="e")


def reprovisioner(host: Host, entry: CacheEntry, vg: str, *, clone: str = "auto",
                  writer: CountingWriter | None = None, **options: Any) -> Reprovisioner:
    """The daemon's job for ``host``'s one domain, under a rule for ``entry``'s image
    (``options``: more of the rule's fields, e.g. ``snapshot=``, ``grow=``)."""
    rule = DomainRule("web*", "ubuntu", clone=clone, **options)  # type: ignore[arg-type]
    policies = PolicySet({"ubuntu": ImageSpec("ubuntu", "b", "k", None, "qcow2")}, (rule,))
    return Reprovisioner(cast(Any, host), Images(entry), lambda: policies, Volumes(vg),
                         write_image=writer or CountingWriter())


def lv_row(vg: str, lv: str) -> dict[str, str]:
    out = sh("lvs", "--reportformat", "json", "--options",
             "lv_name,lv_uuid,lv_tags,lv_attr,lv_size,origin,lv_skip_activation",
             "--units", "b", "--nosuffix", f"{vg}/{lv}")
    row: dict[str, str] = json.loads(out)["report"][0]["lv"][0]
    return row


def names(vg: VolumeGroup) -> set[str]:
    return {n for n in vg.lv_names() if not n.startswith(("lvol", "pool"))}


@dataclass
class World:
    vg: VolumeGroup
    host: Host
    image: Path
    entry: CacheEntry
    path: str

    @property
    def golden(self) -> str:
        return golden_name(self.entry.digest, "pool")


@pytest.fixture
def world(vg: VolumeGroup, tmp_path: Path) -> Iterator[World]:
    """A thin pool, a 64 MiB thin LV ``root`` full of random bytes with two tags, and a
    48 MiB qcow2 image with about 10% data, cached."""
    vg.create_thin_pool("pool", "320m")
    path = vg.create_thin_lv("root", "64m", "pool")
    sh("lvchange", "--addtag", "owner=ops", "--addtag", "backup", f"{vg.name}/root")
    fill_random(path, 64 * MiB)
    image = make_qcow2(tmp_path, 48 * MiB, [(0, 3 * MiB), (30 * MiB, 2 * MiB)])
    host = Host(path, tmp_path / "state.xml")
    host.request()
    yield World(vg, host, image, entry_for(image, 48 * MiB), path)


async def test_a_clone_reprovision_puts_the_image_under_the_same_path_with_the_tags(
    world: World,
) -> None:
    before = lv_row(world.vg.name, "root")
    writer = CountingWriter()
    await reprovisioner(world.host, world.entry, world.vg.name, writer=writer)(UUID)

    state = world.host.state
    assert state is not None and state.kind == "provisioned", state
    assert state.sha256 == world.entry.digest
    after = lv_row(world.vg.name, "root")
    assert after["lv_uuid"] != before["lv_uuid"]  # a new LV under the same name and path
    assert set(after["lv_tags"].split(",")) == {"owner=ops", "backup"}
    assert after["lv_attr"][4] == "a" and after["lv_skip_activation"] in ("0", "")
    assert int(after["lv_size"]) == 64 * MiB  # grown to the old LV's size
    assert after["origin"] == world.golden
    assert images_match(world.image, world.path)  # the image, and zeroes after its end
    assert names(world.vg) == {"root", world.golden}  # the old LV is gone
    golden = lv_row(world.vg.name, world.golden)
    assert GOLDEN_TAG in golden["lv_tags"].split(",") and golden["lv_attr"][1] == "r"
    assert golden["lv_attr"][4] != "a"  # inactive, and skipped by vgchange -ay
    assert writer.targets == [f"/dev/{world.vg.name}/{world.golden}-part"]


async def test_the_golden_is_made_at_prewarm_once_and_every_reprovision_reuses_it(
    world: World,
) -> None:
    writer = CountingWriter()
    job = reprovisioner(world.host, world.entry, world.vg.name, writer=writer)
    made = await job.prepare_goldens("ubuntu", world.entry)
    assert made == [f"{world.vg.name}/{world.golden}"] and len(writer.targets) == 1
    assert await job.prepare_goldens("ubuntu", world.entry) == []

    for _ in range(2):
        world.host.request()
        await job(UUID)
        state = world.host.state
        assert state is not None and state.kind == "provisioned", state
        assert images_match(world.image, world.path)
    assert len(writer.targets) == 1  # written once, at pre-warm time
    assert names(world.vg) == {"root", world.golden}


async def test_removing_the_cache_entry_removes_its_golden_and_the_clone_keeps_its_data(
    world: World,
) -> None:
    job = reprovisioner(world.host, world.entry, world.vg.name)
    await job(UUID)
    assert world.golden in names(world.vg)

    assert await job.remove_goldens([world.entry.digest]) == [f"{world.vg.name}/{world.golden}"]
    assert names(world.vg) == {"root"}
    assert lv_row(world.vg.name, "root")["origin"] == ""
    assert images_match(world.image, world.path)

    await job(UUID)  # nothing requested: nothing happens, no golden comes back
    assert names(world.vg) == {"root"}
    world.host.request()
    await job(UUID)  # the next reprovision makes a golden again
    assert names(world.vg) == {"root", world.golden}
    assert await job.remove_orphan_goldens({world.entry.digest}) == []
    assert await job.remove_orphan_goldens(set()) == [f"{world.vg.name}/{world.golden}"]


async def test_a_start_before_the_record_puts_the_old_lv_back(world: World) -> None:
    before = sha256_of(world.path)
    uuid_before = lv_row(world.vg.name, "root")["lv_uuid"]
    world.host.shut_off_answers = [True, False]  # started between the clone and the record
    await reprovisioner(world.host, world.entry, world.vg.name)(UUID)

    state = world.host.state
    assert state is not None and state.kind == "failed"
    assert state.reason is not None and "started while its volume" in state.reason
    assert lv_row(world.vg.name, "root")["lv_uuid"] == uuid_before
    assert sha256_of(world.path) == before
    assert names(world.vg) == {"root", world.golden}


async def test_a_failure_after_the_clone_removes_it_and_renames_the_old_lv_back(
    world: World, monkeypatch: pytest.MonkeyPatch,
) -> None:
    before = sha256_of(world.path)

    async def failing_grow(swap: lvm.CloneSwap, size: int) -> None:
        assert {"root", "root-vw-prev"} <= names(world.vg)  # the clone, and the old LV
        raise lvm.LvmError(["lvextend", swap.name], 5, "Insufficient free space")

    monkeypatch.setattr(lvm.CloneSwap, "grow", failing_grow)
    await reprovisioner(world.host, world.entry, world.vg.name)(UUID)

    state = world.host.state
    assert state is not None and state.kind == "failed"
    assert state.reason is not None and "Insufficient free space" in state.reason
    assert sha256_of(world.path) == before
    assert names(world.vg) == {"root", world.golden}


async def test_clone_never_writes_the_image_onto_the_same_lv(world: World) -> None:
    uuid_before = lv_row(world.vg.name, "root")["lv_uuid"]
    writer = CountingWriter()
    await reprovisioner(world.host, world.entry, world.vg.name, clone="never",
                        writer=writer)(UUID)
    state = world.host.state
    assert state is not None and state.kind == "provisioned", state
    assert lv_row(world.vg.name, "root")["lv_uuid"] == uuid_before
    assert writer.targets == [os.path.realpath(world.path)]
    assert images_match(world.image, world.path)
    assert names(world.vg) == {"root"}  # no golden


# ---- a crash halfway ---------------------------------------------------------------------


def crash_child(vg: str, image: str, state_file: str, crash_at: str) -> None:
    """The job in a process of its own that SIGKILLs itself at ``crash_at``."""
    entry = entry_for(Path(image), 48 * MiB)
    host = Host(f"/dev/{vg}/root", Path(state_file))
    job = reprovisioner(host, entry, vg)

    def die(*_args: object, **_kwargs: object) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    if crash_at != "making-golden":  # that one dies at the golden's rename, once written
        asyncio.run(job.prepare_goldens("ubuntu", entry))
        # Patched where the clone path looks them up: the clones module.
        if crash_at == "after-rename":
            lvm_clones.clone_lv = die  # type: ignore[assignment]
        if crash_at == "before-grow":
            lvm_clones.extend_to = die  # type: ignore[assignment]
    else:
        lvm_clones.rename_lv = die  # type: ignore[attr-defined,assignment]
    if crash_at == "before-record":
        original_set = host.set_state

        async def set_state(uuid: str, state: DomainState) -> None:
            if state.kind == "provisioned":
                die()
            await original_set(uuid, state)

        host.set_state = set_state  # type: ignore[method-assign]
    asyncio.run(job(UUID))


@pytest.mark.parametrize("crash_at", ["making-golden", "after-rename", "before-grow",
                                      "before-record"])
async def test_a_job_killed_mid_swap_is_finished_or_rolled_back_by_the_next_run(
    world: World, crash_at: str,
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tests.lvm.test_clone", world.vg.name, str(world.image),
         str(world.host.state_file), crash_at],
        cwd=ROOT, env=LVM_ENV, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == -signal.SIGKILL, done.stderr
    state = world.host.state
    assert state is not None and state.kind == "provisioning"  # the hook blocks a start
    leftovers = names(world.vg) - {"root", world.golden}
    expected = {"making-golden": {f"{world.golden}-part"}}.get(crash_at, {"root-vw-prev"})
    assert leftovers == expected
    # Renamed away, the disk does not even exist: the domain could not start.
    assert ("root" in names(world.vg)) is (crash_at != "after-rename")
    if crash_at == "before-grow":
        assert int(lv_row(world.vg.name, "root")["lv_size"]) == 48 * MiB

    await reprovisioner(world.host, world.entry, world.vg.name)(UUID)  # the next run
    state = world.host.state
    assert state is not None and state.kind == "provisioned", state
    assert names(world.vg) == {"root", world.golden}
    assert images_match(world.image, world.path)
    assert set(lv_row(world.vg.name, "root")["lv_tags"].split(",")) == {"owner=ops", "backup"}


# ---- end to end: libvirtd and QEMU inside the guest --------------------------------------

URI = "qemu:///system"
QEMU_CONF = """
stdio_handler = "file"
user = "root"
group = "root"
dynamic_ownership = 0
security_driver = "none"
cgroup_controllers = []
namespaces = []
"""


def virsh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["virsh", "-q", "-c", URI, *args], check=check, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture(scope="module")
def guest_libvirtd() -> Iterator[None]:
    """libvirtd of the UML guest's own, its state on tmpfs; the host's is never involved."""
    if "uml_job=" not in Path("/proc/cmdline").read_text():
        pytest.skip("starts a libvirtd: only inside the User-Mode Linux guest")
    for directory in ("/var/lib/libvirt", "/var/log/libvirt", "/var/cache/libvirt"):
        sh("mount", "-t", "tmpfs", "tmpfs", directory)
    sh("mkdir", "-p", "/run/etc-libvirt")
    sh("cp", "-a", "/etc/libvirt/.", "/run/etc-libvirt/")
    sh("mount", "--bind", "/run/etc-libvirt", "/etc/libvirt")
    sh("rm", "-rf", "/etc/libvirt/hooks")  # the host's hooks are not this test's
    with open("/etc/libvirt/qemu.conf", "a") as conf:
        conf.write(QEMU_CONF)  # no KVM, cgroups, namespaces or virtlogd in the guest
    sh("/usr/sbin/libvirtd", "--daemon", "--pid-file", "/run/lvw-test-libvirtd.pid")
    deadline = 60.0
    while virsh("version", check=False).returncode != 0:
        deadline -= 0.5
        assert deadline > 0, "the guest's libvirtd did not answer"
        subprocess.run(["sleep", "0.5"], check=True)
    yield
    pid = int(Path("/run/lvw-test-libvirtd.pid").read_text())
    os.kill(pid, signal.SIGTERM)


async def test_a_domain_on_a_thin_lv_boots_the_new_image_from_its_clone(
    guest_libvirtd: None, vg: VolumeGroup, tmp_path: Path,
) -> None:
    from tests.bootimage import domain_xml, write_qcow2_image, write_raw_image
    from testsupport.polling import wait_for
    from watcher.adapters.hypervisor import DomainWatcher
    from watcher.core.backoff import Backoff
    from watcher.core.domain import NAMESPACE
    from watcher.runtime.keyed import KeyedWorker

    vg.create_thin_pool("pool", "64m")
    path = vg.create_thin_lv("root", "8m", "pool")
    sh("lvchange", "--addtag", "owner=ops", f"{vg.name}/root")
    v1 = write_raw_image(tmp_path / "v1.raw", "LVW CLONE V1")
    sh("dd", f"if={v1}", f"of={path}", "bs=1M", "oflag=direct", "status=none")
    v2 = write_qcow2_image(tmp_path / "v2.qcow2", "LVW CLONE V2", 4 * MiB)
    entry = entry_for(v2, 4 * MiB)
    name = f"lvw-clone-{vg.name}"
    log = tmp_path / "console.log"
    xml_file = tmp_path / "domain.xml"
    xml_file.write_text(domain_xml(name, path, log, disk_type="block"))
    virsh("define", str(xml_file))
    uuid_before = lv_row(vg.name, "root")["lv_uuid"]
    rule = DomainRule(name, "ubuntu", start=True)
    policies = PolicySet({"ubuntu": ImageSpec("ubuntu", "b", "k", None, "qcow2")}, (rule,))
    stop = asyncio.Event()
    jobs: KeyedWorker[str] | None = None

    def report(uuid: str) -> None:
        assert jobs is not None
        jobs.submit(uuid)

    hypervisor = DomainWatcher(URI, report)
    job = Reprovisioner(hypervisor, Images(entry), lambda: policies, Volumes(vg.name))
    jobs = KeyedWorker(job, unit="reprovision", key_field="uuid", max_concurrent=1,
                       retry=Backoff(base=0.2, cap=1, attempts=3))
    tasks = [asyncio.create_task(hypervisor.run(stop)), asyncio.create_task(jobs.run(stop))]

    def printed(banner: str) -> bool:
        return log.exists() and banner in log.read_text(errors="replace")

    try:
        await wait_for(lambda: hypervisor.connected, 60, what="the watcher to connect")
        await asyncio.to_thread(virsh, "start", name)
        await wait_for(lambda: printed("LVW CLONE V1"), 120, what="v1's banner")
        await asyncio.to_thread(virsh, "metadata", name, "--uri", NAMESPACE, "--key", "vw",
                                "--set", "<reprovision/>", "--config")
        xml_before = (await asyncio.to_thread(virsh, "dumpxml", "--inactive", name)).stdout
        log.write_text("")
        await asyncio.to_thread(virsh, "destroy", name)
        await wait_for(lambda: printed("LVW CLONE V2"), 180, what="v2's banner")

        state = parse_state((await asyncio.to_thread(
            virsh, "metadata", name, "--uri", NAMESPACE, "--config")).stdout)
        assert state is not None and state.kind == "provisioned" and state.sha256 == entry.digest
        xml_after = (await asyncio.to_thread(virsh, "dumpxml", "--inactive", name)).stdout
        disk = f"<source dev='{path}'"
        assert disk in xml_before and disk in xml_after
        after = lv_row(vg.name, "root")
        assert after["lv_uuid"] != uuid_before and after["lv_tags"] == "owner=ops"
        assert names(vg) == {"root", golden_name(entry.digest, "pool")}
    finally:
        stop.set()
        await jobs.drain(10)
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout=30)
        virsh("destroy", name, check=False)
        virsh("undefine", name, check=False)


if __name__ == "__main__":
    crash_child(*sys.argv[1:5])
