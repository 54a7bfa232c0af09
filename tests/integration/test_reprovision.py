"""Reprovisioning end to end: real libvirtd, real QEMU guests, real volumes.

Each guest boots a 512-byte boot sector that prints its image's banner on COM1, which
libvirt logs to a file: a guest that booted v1, was tagged and shut off, and then prints
v2 was rewritten by the watcher. The watcher runs in the test's event loop (a
``DomainWatcher`` and the keyed worker running a ``Reprovisioner`` with a local image
source instead of S3).
Domains, pools and loop devices get unique names and are removed even when a test fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import struct
import subprocess
import sys
import termios
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from prometheus_client import generate_latest

from tests.bootimage import domain_xml, write_qcow2_image
from testsupport.polling import wait_for
from testsupport.proxy import Proxy
from watcher import telemetry
from watcher.adapters.hypervisor import DomainWatcher
from watcher.adapters.qemu_img import write_image
from watcher.cache import CacheEntry
from watcher.core.backoff import Backoff
from watcher.core.domain import NAMESPACE, DomainState, parse_state
from watcher.core.policy import DomainRule, ImageSpec, PolicySet
from watcher.core.units import format_size
from watcher.explain import explain
from watcher.reprovision import Reprovisioner
from watcher.runtime.keyed import KeyedWorker
from watcher.settings import (
    Config,
    LibvirtSettings,
    LibvirtTuning,
    ReprovisionSettings,
    VolumesSettings,
)

pytestmark = pytest.mark.libvirt

ROOT = Path(__file__).resolve().parents[2]
URI = "qemu:///system"
MiB = 1024 * 1024
IMAGE_SIZE = 2 * MiB
BANNER_V1 = "LVW TEST IMAGE V1"
BANNER_V2 = "LVW TEST IMAGE V2"


# ---- talking to libvirt the way an operator does: virsh ------------------------------------


def virsh_sync(*args: str, check: bool = True,
               timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["virsh", "-q", "-c", URI, *args], check=check, capture_output=True,
                          text=True, timeout=timeout)


async def virsh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """virsh off the event loop, so the watcher keeps handling events meanwhile."""
    return await asyncio.to_thread(virsh_sync, *args, check=check)


def run(*argv: str | Path) -> str:
    return subprocess.run([str(a) for a in argv], check=True, capture_output=True, text=True,
                          timeout=60).stdout


def sha256_of(path: str | Path, size: int | None = None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        remaining = size if size is not None else -1
        while remaining != 0:
            chunk = handle.read(MiB if remaining < 0 else min(MiB, remaining))
            if not chunk:
                break
            digest.update(chunk)
            if remaining > 0:
                remaining -= len(chunk)
    return digest.hexdigest()


async def metadata_state(name: str) -> DomainState | None:
    out = await virsh("metadata", name, "--uri", NAMESPACE, "--config", check=False)
    return parse_state(out.stdout) if out.returncode == 0 and out.stdout.strip() else None


async def wait_for_state(name: str, kinds: tuple[str, ...] = ("provisioned", "failed"),
                         timeout: float = 60) -> DomainState:
    last: list[DomainState | None] = [None]

    async def reached() -> DomainState | None:
        last[0] = state = await metadata_state(name)
        return state if state is not None and state.kind in kinds else None

    found: DomainState = await wait_for(reached, timeout, interval=0.2,
                                        what=lambda: f"{name} to reach {kinds}; last {last[0]}")
    return found


async def wait_for_banner(log: Path, banner: str, timeout: float = 30) -> None:
    def printed() -> bool:
        return log.exists() and banner in log.read_text(errors="replace")

    await wait_for(printed, timeout, what=f"{banner!r} in {log}")


async def tag(name: str, element: str = "<reprovision/>") -> None:
    await virsh("metadata", name, "--uri", NAMESPACE, "--key", "vw", "--set", element,
                "--config")


# ---- images, as the cache would hand them out --------------------------------------------


def cache_entry(path: Path, image: str) -> CacheEntry:
    info = json.loads(run("qemu-img", "info", "-f", "qcow2", "--output=json", path))
    return CacheEntry(digest=sha256_of(path), path=path, format="qcow2",
                      virtual_size=int(info["virtual-size"]), size=path.stat().st_size,
                      image=image, bucket="local", key=path.name, etag="-")


@dataclass
class LocalImages:
    """An ``ImageSource`` serving files the test built."""

    entries: dict[str, CacheEntry]
    ensured: list[str] = field(default_factory=list)

    async def ensure(self, image: ImageSpec) -> CacheEntry:
        self.ensured.append(image.name)
        return self.entries[image.name]

    def current(self, image_name: str) -> CacheEntry | None:
        return self.entries.get(image_name)

    async def durable(self, entry: CacheEntry) -> CacheEntry | None:
        return entry  # files the test wrote and closed


@dataclass
class World:
    """One test's directory, names, images and cleanup list."""

    dir: Path
    prefix: str
    images: LocalImages
    cleanups: list[Callable[[], object]] = field(default_factory=list)

    def name(self, suffix: str) -> str:
        return f"{self.prefix}-{suffix}"

    def policies(self, *, grow: bool = False, start: bool = False) -> PolicySet:
        specs = {n: ImageSpec(n, "local", n, None, "qcow2") for n in self.images.entries}
        return PolicySet(images=specs, rules=(
            DomainRule(f"{self.prefix}-*", "v2", grow=grow, start=start),))

    def allow_own_files(self) -> VolumesSettings:
        """Volume settings allowing this test's directory (as the watcher sees it, resolved)."""
        return VolumesSettings(allow=(os.path.realpath(self.dir) + "/*",))

    def write_v1(self, target: str | Path) -> None:
        run("qemu-img", "convert", "-q", "-n", "-f", "qcow2", "-O", "raw",
            self.images.entries["v1"].path, target)

    def dir_pool(self, suffix: str = "pool") -> tuple[str, Path]:
        """A transient ``dir`` pool in the test directory."""
        name = self.name(suffix)
        path = self.dir / suffix
        path.mkdir(mode=0o755)
        virsh_sync("pool-create-as", name, "dir", "--target", str(path))
        self.cleanups.append(lambda: virsh_sync("pool-destroy", name, check=False))
        return name, path

    def volume(self, pool: str, volume: str, size: int) -> str:
        virsh_sync("vol-create-as", pool, volume, str(size), "--format", "raw")
        return virsh_sync("vol-path", volume, "--pool", pool).stdout.strip()

    def loop_device(self, size: int) -> str:
        backing = self.dir / f"loop-{len(self.cleanups)}.img"
        with backing.open("wb") as handle:
            handle.truncate(size)
        device = run("losetup", "--find", "--show", backing).strip()
        self.cleanups.append(lambda: run("losetup", "-d", device))
        return device

    def define(self, suffix: str, source: str, *, disk_type: str = "file") -> tuple[str, Path]:
        """A persistent, shut-off domain booting from ``source``; returns name and serial log."""
        name = self.name(suffix)
        log = self.dir / f"{suffix}.console.log"
        xml = self.dir / f"{suffix}.xml"
        xml.write_text(domain_xml(name, source, log, disk_type=disk_type))
        virsh_sync("define", str(xml))
        self.cleanups.append(lambda: (
            virsh_sync("destroy", name, check=False),
            virsh_sync("undefine", name, "--managed-save", check=False)))
        return name, log


@pytest.fixture(scope="module")
def hook_installed(services_env: dict[str, str]) -> None:
    """The start interlock hook; restarts libvirtd only when the hook is new or changed."""
    subprocess.run([str(ROOT / "scripts" / "install-hook.sh")], check=True,
                   capture_output=True, timeout=120)


@pytest.fixture
def world(world_readable_tmp: Path, unique_name: str, hook_installed: None) -> Iterator[World]:
    v1 = write_qcow2_image(world_readable_tmp / "v1.qcow2", BANNER_V1, IMAGE_SIZE)
    v2 = write_qcow2_image(world_readable_tmp / "v2.qcow2", BANNER_V2, IMAGE_SIZE)
    images = LocalImages({"v1": cache_entry(v1, "v1"), "v2": cache_entry(v2, "v2")})
    w = World(world_readable_tmp, f"lvw-{unique_name}", images)
    try:
        yield w
    finally:
        # Domains first (they hold volumes and devices), then pools and loop devices.
        for cleanup in reversed(w.cleanups):
            with contextlib.suppress(subprocess.SubprocessError):
                cleanup()


@dataclass
class Watcher:
    hypervisor: DomainWatcher
    reprovisioner: Reprovisioner
    jobs: KeyedWorker[str]


@contextlib.asynccontextmanager
async def watching(world: World, policies: PolicySet, volumes: VolumesSettings,
                   *, write: Callable[..., Awaitable[None]] = write_image,
                   max_concurrent: int = 2, uri: str = URI) -> AsyncIterator[Watcher]:
    """The watcher's two tasks running in this loop until the block ends."""
    stop = asyncio.Event()
    jobs: KeyedWorker[str] | None = None

    def report(uuid: str) -> None:
        assert jobs is not None
        jobs.submit(uuid)

    hypervisor = DomainWatcher(
        uri, report, tuning=LibvirtTuning(reconnect_backoff=Backoff(base=0.2, cap=1.0, attempts=0)))
    settings = ReprovisionSettings(max_concurrent=max_concurrent)
    reprovisioner = Reprovisioner(hypervisor, world.images, lambda: policies, volumes,
                                  write_image=write)
    jobs = KeyedWorker(reprovisioner, unit="reprovision", key_field="uuid",
                       max_concurrent=settings.max_concurrent,
                       retry=Backoff(base=0.2, cap=1, attempts=3))
    tasks = [asyncio.create_task(hypervisor.run(stop), name="libvirt"),
             asyncio.create_task(jobs.run(stop), name="reprovision")]
    try:
        await wait_for(lambda: hypervisor.connected or any(t.done() for t in tasks),
                       what="the watcher to connect")
        for task in tasks:
            if task.done():
                task.result()
        yield Watcher(hypervisor, reprovisioner, jobs)
    finally:
        stop.set()
        await jobs.drain(10)
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=15)


# ---- the core path -----------------------------------------------------------------------


async def test_shut_off_tagged_domain_on_a_dir_pool_volume_boots_the_new_image(
        world: World) -> None:
    pool, _ = world.dir_pool()
    path = world.volume(pool, "root.img", IMAGE_SIZE)
    world.write_v1(path)
    name, log = world.define("dir", f"{pool}/root.img", disk_type="volume")
    volumes = world.allow_own_files()

    async with watching(world, world.policies(), volumes) as watcher:
        await virsh("start", name)
        await wait_for_banner(log, BANNER_V1)
        await tag(name)
        await virsh("destroy", name)
        state = await wait_for_state(name)

        assert state.kind == "provisioned", state
        assert state.image == "v2"
        assert state.sha256 == world.images.entries["v2"].digest
        assert state.time is not None
        await virsh("start", name)
        await wait_for_banner(log, BANNER_V2)
        assert BANNER_V1 not in log.read_text()
        # The result is recorded once: our own metadata updates do not start a second write.
        assert world.images.ensured == ["v2"]
        assert watcher.reprovisioner.running_jobs == 0


async def test_loop_device_block_volume_is_written_and_the_domain_started_by_policy(
        world: World) -> None:
    device = world.loop_device(IMAGE_SIZE)
    world.write_v1(device)
    name, log = world.define("blk", device, disk_type="block")
    volumes = VolumesSettings(allow=("/dev/loop*",))

    async with watching(world, world.policies(start=True), volumes):
        await virsh("start", name)
        await wait_for_banner(log, BANNER_V1)
        await tag(name, '<reprovision image="v2"/>')
        await virsh("destroy", name)
        state = await wait_for_state(name)

        assert state.kind == "provisioned", state
        await wait_for_banner(log, BANNER_V2)  # started by the watcher: rule.start
        v2_raw = world.dir / "v2.raw"
        run("qemu-img", "convert", "-q", "-f", "qcow2", "-O", "raw",
            world.images.entries["v2"].path, v2_raw)
        assert sha256_of(device) == sha256_of(v2_raw)
        assert (await virsh("domstate", name)).stdout.strip() == "running"


async def test_domain_tagged_while_running_is_untouched_until_it_shuts_off(
        world: World) -> None:
    pool, _ = world.dir_pool()
    path = world.volume(pool, "root.img", IMAGE_SIZE)
    world.write_v1(path)
    name, log = world.define("run", path)
    volumes = world.allow_own_files()

    async with watching(world, world.policies(), volumes) as watcher:
        await virsh("start", name)
        await wait_for_banner(log, BANNER_V1)
        uuid = (await virsh("domuuid", name)).stdout.strip()
        looked = watcher.jobs.runs[uuid]
        before = sha256_of(path)
        await tag(name)
        # The metadata-change event arrives, the job looks at the domain and sets it aside.
        await wait_for(lambda: watcher.jobs.runs[uuid] > looked, what="the job to see the tag")

        assert sha256_of(path) == before
        assert await metadata_state(name) == DomainState("reprovision")
        assert world.images.ensured == []
        await virsh("shutdown", name, check=False)  # a halted guest ignores ACPI
        await virsh("destroy", name)
        assert (await wait_for_state(name)).kind == "provisioned"
        assert sha256_of(path) != before


async def test_starting_a_domain_while_its_volume_is_written_is_refused_by_the_hook(
        world: World) -> None:
    pool, _ = world.dir_pool()
    path = world.volume(pool, "root.img", IMAGE_SIZE)
    world.write_v1(path)
    name, log = world.define("hook", path)
    volumes = world.allow_own_files()
    writing, release = asyncio.Event(), asyncio.Event()

    async def paused_write(*args: Any, **kwargs: Any) -> None:
        writing.set()
        await release.wait()
        await write_image(*args, **kwargs)

    async with watching(world, world.policies(), volumes, write=paused_write):
        await tag(name)
        await asyncio.wait_for(writing.wait(), timeout=30)
        assert (await metadata_state(name) or DomainState("failed")).kind == "provisioning"

        refused = await virsh("start", name, check=False)

        assert refused.returncode != 0
        assert "libvirt-volume-watcher is writing v2" in refused.stderr
        assert (await virsh("domstate", name)).stdout.strip() == "shut off"
        release.set()
        assert (await wait_for_state(name)).kind == "provisioned"
        await virsh("start", name)
        await wait_for_banner(log, BANNER_V2)


async def test_no_more_than_max_concurrent_volumes_are_written_at_once(world: World) -> None:
    pool, _ = world.dir_pool()
    names = []
    for suffix in ("c1", "c2", "c3"):
        path = world.volume(pool, f"{suffix}.img", IMAGE_SIZE)
        names.append(world.define(suffix, path)[0])
    running, peak = 0, 0
    release = asyncio.Event()

    async def counted_write(*args: Any, **kwargs: Any) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        try:
            await asyncio.wait_for(release.wait(), 120)  # held until the third one waits
            await write_image(*args, **kwargs)
        finally:
            running -= 1

    async with watching(world, world.policies(), world.allow_own_files(), write=counted_write,
                        max_concurrent=2) as watcher:
        uuids = {(await virsh("domuuid", name)).stdout.strip() for name in names}
        jobs, process = Counter[str](), watcher.jobs.process

        async def counted_process(uuid: str) -> None:  # the job as a whole, not only its write
            jobs[uuid] += 1
            try:
                await process(uuid)
            finally:
                jobs[uuid] -= 1

        watcher.jobs.process = counted_process
        for name in names:
            await tag(name)
        # Every job has its worker, and writes are held: two run, the third waits for a
        # slot without having started (a job runs as soon as its worker has a slot).
        await wait_for(lambda: uuids <= set(watcher.jobs.keys) and running >= 2, timeout=60,
                       what=lambda: f"3 jobs, 2 writing; {watcher.jobs.keys}, {running}")
        assert running == 2 and sum(jobs[u] for u in uuids) == 2, (running, jobs)
        release.set()
        states = [await wait_for_state(name) for name in names]

    assert [s.kind for s in states] == ["provisioned"] * 3
    assert peak == 2


# ---- refusals ------------------------------------------------------------------------------


async def test_volume_too_small_fails_and_is_left_unchanged(world: World) -> None:
    pool, _ = world.dir_pool()
    path = world.volume(pool, "root.img", IMAGE_SIZE // 2)
    name, _log = world.define("small", f"{pool}/root.img", disk_type="volume")
    volumes = world.allow_own_files()
    before = sha256_of(path)

    async with watching(world, world.policies(grow=False), volumes):
        await tag(name)
        state = await wait_for_state(name)

    assert state.kind == "failed"
    assert state.reason is not None and "grow: false" in state.reason
    assert state.image == "v2"
    assert sha256_of(path) == before
    assert (await asyncio.to_thread(os.stat, path)).st_size == IMAGE_SIZE // 2


async def test_volume_too_small_is_grown_through_libvirt_when_the_policy_allows(
        world: World) -> None:
    pool, _ = world.dir_pool()
    world.volume(pool, "root.img", IMAGE_SIZE // 2)
    name, log = world.define("grow", f"{pool}/root.img", disk_type="volume")
    volumes = world.allow_own_files()

    async with watching(world, world.policies(grow=True), volumes):
        await tag(name)
        state = await wait_for_state(name)
        assert state.kind == "provisioned", state
        capacity = int((await virsh("vol-info", "--bytes", "root.img", "--pool", pool))
                       .stdout.split("Capacity:")[1].split()[0])
        assert capacity >= world.images.entries["v2"].virtual_size
        await virsh("start", name)
        await wait_for_banner(log, BANNER_V2)


async def test_root_disk_outside_the_allow_list_fails_and_is_left_unchanged(
        world: World) -> None:
    pool, _ = world.dir_pool()
    path = world.volume(pool, "root.img", IMAGE_SIZE)
    world.write_v1(path)
    name, _log = world.define("deny", path)
    before = sha256_of(path)
    volumes = VolumesSettings(allow=("/dev/mapper/*",))

    async with watching(world, world.policies(), volumes):
        await tag(name)
        state = await wait_for_state(name)

    assert state.kind == "failed"
    assert state.reason is not None and "matches no volumes.allow pattern" in state.reason
    assert sha256_of(path) == before


async def test_empty_allow_list_accepts_only_logical_pool_volumes(world: World) -> None:
    pool, _ = world.dir_pool()
    path = world.volume(pool, "root.img", IMAGE_SIZE)
    world.write_v1(path)
    name, _log = world.define("dirpool", path)
    before = sha256_of(path)

    async with watching(world, world.policies(), VolumesSettings()):
        await tag(name)
        state = await wait_for_state(name)

    assert state.kind == "failed"
    assert state.reason is not None and "in a 'dir' pool" in state.reason
    assert sha256_of(path) == before


async def test_domain_with_a_managed_save_image_fails_found_by_the_start_up_sweep(
        world: World) -> None:
    pool, _ = world.dir_pool()
    path = world.volume(pool, "root.img", IMAGE_SIZE)
    world.write_v1(path)
    name, log = world.define("saved", path)
    volumes = world.allow_own_files()
    await virsh("start", name)
    await wait_for_banner(log, BANNER_V1)
    await virsh("managedsave", name)
    await tag(name)  # before the watcher runs: only the start-up sweep can see it
    before = sha256_of(path)

    async with watching(world, world.policies(), volumes):
        state = await wait_for_state(name)

    assert state.kind == "failed"
    assert state.reason is not None and "managed-save image" in state.reason
    assert sha256_of(path) == before


async def test_a_tagged_domain_no_rule_matches_is_left_exactly_as_it_is(world: World) -> None:
    pool, _ = world.dir_pool()
    path = world.volume(pool, "root.img", IMAGE_SIZE)
    name, _log = world.define("orphan", path)
    uuid = virsh_sync("domuuid", name).stdout.strip()
    policies = PolicySet(images=world.policies().images,
                         rules=(DomainRule("someone-else-*", "v2"),))
    before = sha256_of(path)

    async with watching(world, policies, VolumesSettings()) as watcher:
        await tag(name)
        element = (await virsh("metadata", name, "--uri", NAMESPACE, "--config")).stdout
        # The tag's event was handled: the watcher looked at the domain and said so.
        await wait_for(lambda: watcher.jobs.runs[uuid] >= 1 and uuid in watcher.reprovisioner
                       .unmatched, 30, what="the unmatched domain to be looked at")

    assert (await virsh("metadata", name, "--uri", NAMESPACE, "--config")).stdout == element
    assert await metadata_state(name) == DomainState("reprovision")
    assert sha256_of(path) == before


# ---- reconnect ---------------------------------------------------------------------------

LIBVIRT_SOCKET = "/var/run/libvirt/libvirt-sock"


async def test_watcher_reconnects_after_its_libvirt_connection_drops_and_handles_the_next_tag(
        world: World, proxy_to: Callable[..., Proxy]) -> None:
    pool, _ = world.dir_pool()
    path = world.volume(pool, "root.img", IMAGE_SIZE)
    world.write_v1(path)
    name, log = world.define("reconnect", path)
    volumes = world.allow_own_files()
    # The watcher's own connection goes through a relay; libvirtd stays up for everyone.
    proxy = proxy_to(LIBVIRT_SOCKET, listen=str(world.dir / "libvirt.sock"))
    uri = f"qemu+unix:///system?socket={proxy.address}"

    async with watching(world, world.policies(), volumes, uri=uri) as watcher:
        proxy.cut()
        await wait_for(lambda: watcher.hypervisor.connects >= 2
                       and watcher.hypervisor.connected, 60, what="the watcher to reconnect")
        await tag(name)
        state = await wait_for_state(name)

        assert state.kind == "provisioned", state
        await virsh("start", name)
        await wait_for_banner(log, BANNER_V2)


# --- explain: the same decisions as a dry run ---------------------------------------------

def config_for(world: World) -> Config:
    return dataclasses.replace(Config(), libvirt=LibvirtSettings(uri="qemu:///system"),
                               volumes=world.allow_own_files())


async def test_explain_shows_rule_disk_volume_verdicts_and_steps_without_writing(
        world: World) -> None:
    pool, _ = world.dir_pool()
    path = world.volume(pool, "root", 64 * MiB)
    world.write_v1(path)
    name, _ = world.define("fits", path)
    before = sha256_of(path)

    answer = await explain(config_for(world), world.policies(), world.images, name)

    assert answer.rule is not None and answer.rule.startswith(f"{world.prefix}-*")
    assert answer.image == "v2" and answer.cached == world.images.entries["v2"].digest
    assert answer.disk is not None and path in answer.disk
    assert answer.volume is not None and path in answer.volume
    assert answer.allowed == "allowed"
    assert answer.size is not None and "it fits" in answer.size
    assert answer.now.startswith("a request would write the image")
    assert any(step.startswith("write") for step in answer.steps), answer.steps
    assert answer.state is None
    # A dry run: the volume and the metadata are as they were.
    assert sha256_of(path) == before
    assert await metadata_state(name) is None
    assert "write" in "\n".join(answer.lines())


async def test_explain_names_the_refusals_a_job_would_give(world: World) -> None:
    pool, _ = world.dir_pool()
    small = world.volume(pool, "small", IMAGE_SIZE // 2)
    name, _ = world.define("small", small)
    await tag(name)

    answer = await explain(config_for(world), world.policies(), world.images, name)
    assert answer.state == "<reprovision/>" or (answer.state or "").startswith("<reprovision")
    assert answer.now.startswith("a request would fail"), answer.now
    assert "grow" in answer.now or "small" in answer.now
    assert answer.steps == []

    outside = dataclasses.replace(config_for(world), volumes=dataclasses.replace(
        config_for(world).volumes, allow=("/nowhere/*",)))
    refused = await explain(outside, world.policies(), world.images, name)
    assert refused.allowed is not None and refused.allowed.startswith("refused")
    assert refused.now.startswith("a request would fail")


async def test_explain_of_a_domain_no_rule_matches_says_so(world: World) -> None:
    pool, _ = world.dir_pool()
    path = world.volume(pool, "root", 64 * MiB)
    name, _ = world.define("other", path)
    policies = dataclasses.replace(world.policies(), rules=())
    answer = await explain(config_for(world), policies, world.images, name)
    assert answer.rule is None
    assert answer.unmatched == "no rule of this watcher matches it (another instance may own it)"
    assert answer.now.startswith("unmatched: a request is left exactly as it is")

    # A rule for other hosts only: it does not match here, and explain says why.
    elsewhere = dataclasses.replace(world.policies(), host="hv-here", rules=(
        DomainRule(f"{world.prefix}-*", "v2", hosts=("hv-there-*",)),))
    scoped = await explain(config_for(world), elsewhere, world.images, name)
    assert scoped.rule is None
    assert scoped.unmatched is not None and "only on hosts hv-there-*" in scoped.unmatched
    assert scoped.now.startswith("unmatched:")
    assert any("other hosts" in note and "hv-here" in note for note in scoped.notes)


# --- reprovision --wait / --shutdown / --cancel, the CLI a script drives -------------------


async def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m watcher ARGS`` as a process, as automation runs it."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "watcher", *args, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return subprocess.CompletedProcess(args, proc.returncode, out.decode(), err.decode())


async def test_a_pending_request_can_be_cancelled_but_not_twice(world: World) -> None:
    pool, _ = world.dir_pool()
    world.volume(pool, "root.img", IMAGE_SIZE)
    name, _log = world.define("cancel", f"{pool}/root.img", disk_type="volume")
    tagged = await cli("reprovision", name, "--connect", URI)
    assert tagged.returncode == 0, tagged.stderr
    state = await metadata_state(name)
    assert state is not None and state.kind == "reprovision"

    cancelled = await cli("reprovision", name, "--cancel", "--connect", URI)
    assert cancelled.returncode == 0, cancelled.stderr
    assert await metadata_state(name) is None
    again = await cli("reprovision", name, "--cancel", "--connect", URI)
    assert again.returncode == 1 and "no pending request" in again.stderr


async def test_wait_with_shutdown_stops_the_domain_follows_the_job_and_exits_0(
        world: World) -> None:
    pool, _ = world.dir_pool()
    path = world.volume(pool, "root.img", IMAGE_SIZE)
    world.write_v1(path)
    name, log = world.define("wait", f"{pool}/root.img", disk_type="volume")
    async with watching(world, world.policies(), world.allow_own_files()):
        await virsh("start", name)
        await wait_for_banner(log, BANNER_V1)
        # The boot sector halts and ignores ACPI: the hard stop after --timeout ends it.
        started = time.monotonic()
        result = await cli("reprovision", name, "--wait", "--shutdown", "--timeout", "2",
                           "--connect", URI)
        took = time.monotonic() - started
    assert result.returncode == 0, result.stdout + result.stderr
    assert "stopping it hard" in result.stdout
    assert "\r" not in result.stdout and "\x1b" not in result.stdout  # not a terminal
    assert "provisioned with v2" in result.stdout
    assert took >= 2
    state = await metadata_state(name)
    assert state is not None and state.kind == "provisioned"
    assert state.sha256 == world.images.entries["v2"].digest


class Pty:
    """A pseudo-terminal a CLI process writes to, read in this loop as it arrives."""

    def __init__(self, columns: int = 160) -> None:
        self.master, self.slave = os.openpty()
        fcntl.ioctl(self.slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
        self.output = bytearray()
        self.closed = asyncio.Event()
        asyncio.get_running_loop().add_reader(self.master, self._read)

    def _read(self) -> None:
        try:
            chunk = os.read(self.master, 65536)
        except OSError:  # EIO: every writer closed its end
            chunk = b""
        if not chunk:
            asyncio.get_running_loop().remove_reader(self.master)
            self.closed.set()
        self.output += chunk

    @property
    def text(self) -> str:
        return self.output.decode(errors="replace")

    async def shows(self, expected: str, timeout: float = 30) -> None:
        await wait_for(lambda: expected in self.text, timeout, what=f"{expected!r} on the pty")

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.master)
        for fd in (self.master, self.slave):
            with contextlib.suppress(OSError):
                os.close(fd)


@contextlib.asynccontextmanager
async def serving_metrics() -> AsyncIterator[str]:
    """This process's metrics (the in-loop watcher's gauges) on a loopback port, as
    ``http.listen`` would serve them; yields the listen address."""
    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(telemetry.REGISTRY),
                            content_type="text/plain")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        host, port = runner.addresses[0][:2]
        yield f"{host}:{port}"
    finally:
        await runner.cleanup()


async def _wait_on(terminal: Pty, world: World, name: str) -> tuple[str, int]:
    """``reprovision NAME --wait`` on ``terminal`` against an in-loop watcher whose write
    holds at 25% and 50% until the terminal shows each; returns the output and exit code."""
    async def paced_write(source: Path, source_format: str, target: Path, *,
                          target_is_zero: bool = False,
                          on_progress: Callable[[float], None] | None = None) -> None:
        # Hold the write at two points until the terminal has shown each of them.
        assert on_progress is not None
        for percent in (25.0, 50.0):
            on_progress(percent)
            await terminal.shows(f"{percent:5.1f}%")
        await write_image(source, source_format, target, target_is_zero=target_is_zero,
                          on_progress=on_progress)

    async with serving_metrics() as listen, watching(
            world, world.policies(), world.allow_own_files(), write=paced_write):
        policies_dir = world.dir / "policies"
        policies_dir.mkdir()
        config = world.dir / "config.yaml"
        config.write_text(f"libvirt: {{uri: '{URI}'}}\npolicies: {{dir: '{policies_dir}'}}\n"
                          f"cache: {{dir: '{world.dir / 'cache'}'}}\n"
                          f"http: {{listen: '{listen}'}}\n")
        env = {key: value for key, value in os.environ.items()
               if key not in ("COLUMNS", "LINES")}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "watcher", "reprovision", name, "--wait", "-c", str(config),
            stdin=subprocess.DEVNULL, stdout=terminal.slave, stderr=terminal.slave, cwd=ROOT,
            env={**env, "PYTHONPATH": str(ROOT), "TERM": "xterm"})
        os.close(terminal.slave)
        terminal.slave = -1
        returncode = await asyncio.wait_for(proc.wait(), 120)
        await asyncio.wait_for(terminal.closed.wait(), 10)

    return terminal.text, returncode


async def test_wait_on_a_terminal_redraws_one_progress_line_and_exits_0(world: World) -> None:
    pool, _ = world.dir_pool()
    world.volume(pool, "root.img", IMAGE_SIZE)
    name, _log = world.define("tty", f"{pool}/root.img", disk_type="volume")
    terminal = Pty()
    try:
        text, returncode = await _wait_on(terminal, world, name)
    finally:
        terminal.close()
    assert returncode == 0, text

    size = world.images.entries["v2"].virtual_size
    # One line redrawn in place: each update starts with a carriage return, and carries
    # the bar, the percent and the bytes written of the total.
    drawn = [part.split("\x1b[K")[0] for part in text.split("\r") if "writing [" in part]
    assert any(f" 25.0%  {format_size(size // 4)} / {format_size(size)}" in line
               for line in drawn), drawn
    assert any(f" 50.0%  {format_size(size // 2)} / {format_size(size)}" in line
               for line in drawn), drawn
    assert any(line.endswith("/s") for line in drawn), drawn  # the rate, from two samples
    # The result clears the bar and stays, on a line of its own, as the last output.
    result = f"\r\x1b[K{name}: provisioned with v2"
    assert result in text, text
    assert "writing [" not in text.split(result)[1], text


async def test_wait_exits_1_when_the_job_fails(world: World) -> None:
    pool, _ = world.dir_pool()
    world.volume(pool, "root.img", IMAGE_SIZE // 2)  # too small, grow: false
    name, _log = world.define("waitfail", f"{pool}/root.img", disk_type="volume")
    async with watching(world, world.policies(grow=False), world.allow_own_files()):
        result = await cli("reprovision", name, "--wait", "--connect", URI)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "failed:" in result.stdout and "grow: false" in result.stdout

    # status DOMAIN shows the failure in detail, as JSON and nothing else on stdout.
    policies_dir = world.dir / "policies"
    policies_dir.mkdir()
    (policies_dir / "p.yaml").write_text(
        "images:\n  v2: {bucket: local, key: v2.qcow2, format: qcow2}\n"
        f"domains:\n  - {{match: '{world.prefix}-*', image: v2}}\n")
    config = world.dir / "config.yaml"
    config.write_text(f"libvirt: {{uri: '{URI}'}}\npolicies: {{dir: '{policies_dir}'}}\n"
                      f"cache: {{dir: '{world.dir / 'cache'}'}}\nhttp: {{listen: ''}}\n")
    shown = await cli("status", name, "--json", "-c", str(config))
    assert shown.returncode == 0, shown.stderr
    detail = json.loads(shown.stdout)
    assert (detail["domain"], detail["state"], detail["power"]) == (name, "failed", "shut off")
    assert "grow: false" in detail["reason"]
    assert detail["image"] == "v2" and detail["rule"].startswith(f"{world.prefix}-*")
    assert detail["root_disk"] and detail["volume"]

    # Policies scoped to other hosts: the rule does not match here, in status as elsewhere.
    (policies_dir / "p.yaml").write_text(
        "images:\n  v2: {bucket: local, key: v2.qcow2, format: qcow2}\n"
        f"domains:\n  - {{match: '{world.prefix}-*', image: v2, hosts: ['hv-other-*']}}\n")
    config.write_text(config.read_text() + "host: {name: hv-here}\n")
    listed = await cli("status", "--json", "-c", str(config))
    assert listed.returncode == 0, listed.stderr
    assert name not in [row["domain"] for row in json.loads(listed.stdout)["domains"]]
    shown = await cli("status", name, "--json", "-c", str(config))
    assert json.loads(shown.stdout)["rule"] is None, shown.stdout


async def test_wait_on_a_domain_no_rule_here_matches_refuses_without_tagging(
        world: World) -> None:
    pool, _ = world.dir_pool()
    world.volume(pool, "root.img", IMAGE_SIZE)
    name, _log = world.define("notours", f"{pool}/root.img", disk_type="volume")
    policies_dir = world.dir / "policies"
    policies_dir.mkdir()
    (policies_dir / "p.yaml").write_text(
        "images:\n  v2: {bucket: local, key: v2.qcow2, format: qcow2}\n"
        "domains:\n  - {match: 'someone-else-*', image: v2}\n")
    config = world.dir / "config.yaml"
    config.write_text(f"libvirt: {{uri: '{URI}'}}\npolicies: {{dir: '{policies_dir}'}}\n"
                      f"cache: {{dir: '{world.dir / 'cache'}'}}\nhttp: {{listen: ''}}\n")

    # --wait could only time out: this watcher would leave the request as it is.
    waited = await cli("reprovision", name, "--wait", "-c", str(config))
    assert waited.returncode == 1, waited.stdout + waited.stderr
    assert "not requested" in waited.stderr and "no rule of this watcher" in waited.stderr
    assert await metadata_state(name) is None

    # Without --wait the tag is set for the instance that owns the domain, with a warning.
    tagged = await cli("reprovision", name, "-c", str(config))
    assert tagged.returncode == 0, tagged.stderr
    assert "warning:" in tagged.stderr and "no rule of this watcher" in tagged.stderr
    state = await metadata_state(name)
    assert state is not None and state.kind == "reprovision"
