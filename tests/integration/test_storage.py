"""The job API's volume edge against the real system: libvirt pools, volumes and the
domains using them; the processes and loop devices holding a file open; and the hook
refusing to start a domain whose disk a live writer has marked.

Pools, domains and loop devices get unique names and are removed even when a test fails.
"""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
import sys
import uuid
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.bootimage import domain_xml, write_raw_image
from testsupport.polling import wait_for_sync
from watcher.adapters import openers
from watcher.adapters.hypervisor import HypervisorError
from watcher.adapters.hypervisor.jobcalls import DomainCalls
from watcher.adapters.hypervisor.queries import OneShotConnection
from watcher.adapters.write_markers import marked_writing

ROOT = Path(__file__).resolve().parents[2]
URI = "qemu:///system"
MiB = 1024 * 1024


def run(*argv: str | Path) -> str:
    return subprocess.run([str(a) for a in argv], check=True, capture_output=True, text=True,
                          timeout=60).stdout


def virsh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["virsh", "-q", "-c", URI, *args], check=check, capture_output=True,
                          text=True, timeout=60)


@dataclass
class Storage:
    """One test's job calls, dir pool and domains, all removed afterwards.

    Pools and domains are made and removed with virsh, as an operator would; the calls
    under test run through ``DomainCalls`` on a connection of the test's own.
    """

    calls: DomainCalls
    dir: Path
    prefix: str
    pool: str
    pool_dir: Path
    cleanups: list[Callable[[], object]] = field(default_factory=list)

    def define(self, suffix: str, disks: list[tuple[str, str, str]]) -> str:
        """A persistent, shut-off domain with ``(type, device, source)`` disks; the first is
        its boot disk. A source is a file or block path, or ``pool/volume``."""
        name = f"{self.prefix}-{suffix}"
        kind, _device, source = disks[0]
        root = ET.fromstring(domain_xml(name, source, self.dir / f"{suffix}.log",
                                        disk_type=kind))
        devices = root.find("devices")
        assert devices is not None
        for index, (kind, device, source) in enumerate(disks[1:], start=1):
            disk = ET.SubElement(devices, "disk", type=kind, device=device)
            ET.SubElement(disk, "driver", name="qemu", type="raw")
            if kind == "volume":
                pool, volume = source.split("/", 1)
                ET.SubElement(disk, "source", pool=pool, volume=volume)
            else:
                ET.SubElement(disk, "source", {"file" if kind == "file" else "dev": source})
            bus, dev = ("virtio", "vd") if device == "disk" else ("ide", "hd")
            ET.SubElement(disk, "target", dev=f"{dev}{'abcdefgh'[index]}", bus=bus)
            if device != "disk":
                ET.SubElement(disk, "readonly")
        definition = self.dir / f"{suffix}.xml"
        definition.write_text(ET.tostring(root, encoding="unicode"))
        virsh("define", str(definition))
        self.cleanups.append(lambda: (virsh("destroy", name, check=False),
                                      virsh("undefine", name, check=False)))
        return name

    def boot_disk(self, name: str) -> str:
        return str(write_raw_image(self.dir / name, "LVW STORAGE TEST"))

    def inactive_pool(self) -> str:
        name = f"{self.prefix}-inactive"
        virsh("pool-define-as", name, "dir", "--target", str(self.dir))
        self.cleanups.append(lambda: virsh("pool-undefine", name, check=False))
        return name


@pytest.fixture
async def storage(services_env: dict[str, str], world_readable_tmp: Path,
                  unique_name: str) -> AsyncIterator[Storage]:
    prefix = f"lvw-{unique_name}"
    pool, pool_dir = f"{prefix}-pool", world_readable_tmp / "pool"
    pool_dir.mkdir(mode=0o755)
    virsh("pool-create-as", pool, "dir", "--target", str(pool_dir))
    connection = OneShotConnection(URI)
    world = Storage(DomainCalls(connection), world_readable_tmp, prefix, pool, pool_dir)
    try:
        yield world
    finally:
        await connection.close()
        for cleanup in reversed(world.cleanups):
            cleanup()
        virsh("pool-destroy", pool, check=False)


async def real_path_of(storage: Storage, volume: str) -> str:
    facts = await storage.calls.pool_volume(storage.pool, volume)
    assert facts is not None
    return os.path.realpath(facts.path)


# ---- pools and volumes --------------------------------------------------------------------


@pytest.mark.libvirt
async def test_pool_info_describes_a_pool_and_none_for_a_missing_one(storage: Storage) -> None:
    facts = await storage.calls.pool_info(storage.pool)
    assert facts is not None
    assert (facts.name, facts.type, facts.active, facts.target) == (
        storage.pool, "dir", True, str(storage.pool_dir))
    assert await storage.calls.pool_info(f"{storage.prefix}-missing") is None


@pytest.mark.libvirt
async def test_create_volume_in_a_dir_pool_makes_a_sparse_raw_file_of_that_capacity(
        storage: Storage) -> None:
    assert await storage.calls.pool_volume(storage.pool, "api-root") is None

    created = await storage.calls.create_volume(storage.pool, "api-root", 64 * MiB)

    path = storage.pool_dir / "api-root"
    assert (created.path, created.name, created.pool, created.pool_type) == (
        str(path), "api-root", storage.pool, "dir")
    assert created.capacity == path.stat().st_size == 64 * MiB
    assert path.stat().st_blocks * 512 < MiB  # sparse: nothing written yet
    assert "raw" in virsh("vol-dumpxml", "api-root", "--pool", storage.pool).stdout
    assert await storage.calls.pool_volume(storage.pool, "api-root") == created


@pytest.mark.libvirt
async def test_pool_volume_sees_a_volume_made_outside_libvirt(storage: Storage) -> None:
    virsh("pool-refresh", storage.pool)  # before the file exists
    with (storage.pool_dir / "copied-in").open("wb") as handle:
        handle.truncate(2 * MiB)
    found = await storage.calls.pool_volume(storage.pool, "copied-in")
    assert found is not None and found.capacity == 2 * MiB


@pytest.mark.libvirt
async def test_create_volume_refuses_an_existing_name_and_a_missing_or_inactive_pool(
        storage: Storage) -> None:
    await storage.calls.create_volume(storage.pool, "taken", MiB)
    with pytest.raises(HypervisorError, match="'taken' already exists in storage pool"):
        await storage.calls.create_volume(storage.pool, "taken", 2 * MiB)
    assert (storage.pool_dir / "taken").stat().st_size == MiB
    missing = f"{storage.prefix}-missing"
    with pytest.raises(HypervisorError, match="no storage pool named"):
        await storage.calls.create_volume(missing, "x", MiB)
    with pytest.raises(HypervisorError, match="no storage pool named"):
        await storage.calls.pool_volume(missing, "x")

    inactive = storage.inactive_pool()
    with pytest.raises(HypervisorError, match="is not active"):
        await storage.calls.create_volume(inactive, "x", MiB)
    facts = await storage.calls.pool_info(inactive)
    assert facts is not None and not facts.active


@pytest.mark.libvirt
async def test_a_created_volume_grows_with_the_existing_grow_volume(storage: Storage) -> None:
    created = await storage.calls.create_volume(storage.pool, "grown", 4 * MiB)

    grown = await storage.calls.grow_volume(created.path, 16 * MiB)

    assert grown.capacity == os.stat(created.path).st_size == 16 * MiB
    assert await storage.calls.pool_volume(storage.pool, "grown") == grown


# ---- who uses a volume --------------------------------------------------------------------


@pytest.mark.libvirt
async def test_domains_using_finds_inactive_domains_whatever_way_their_disk_names_the_volume(
        storage: Storage) -> None:
    target = await storage.calls.create_volume(storage.pool, "target", MiB)
    other = await storage.calls.create_volume(storage.pool, "other", MiB)
    link = storage.dir / "link-to-target"
    link.symlink_to(target.path)
    boot = storage.boot_disk("boot.img")
    storage.define("as-file", [("file", "disk", str(link))])
    storage.define("as-volume", [("file", "disk", boot),
                                 ("volume", "disk", f"{storage.pool}/target")])
    storage.define("as-cdrom", [("file", "disk", boot), ("file", "cdrom", target.path)])
    storage.define("elsewhere", [("file", "disk", other.path),
                                 ("volume", "disk", f"{storage.pool}/other")])
    real_path = await real_path_of(storage, "target")

    users = await storage.calls.domains_using(real_path, pool=storage.pool, volume="target")

    assert [(u.name, u.power, u.shut_off, u.managed_save) for u in users] == [
        (f"{storage.prefix}-{suffix}", "shut off", True, False)
        for suffix in ("as-cdrom", "as-file", "as-volume")]
    assert all(len(u.uuid) == 36 for u in users)
    # Without pool and volume, a type='volume' disk is found through its resolved path.
    resolved = await storage.calls.domains_using(real_path)
    assert [u.name for u in resolved] == [u.name for u in users]


@pytest.mark.libvirt
async def test_a_running_domain_is_not_shut_off_and_found_by_a_disk_only_its_live_config_has(
        storage: Storage) -> None:
    boot = storage.boot_disk("boot.img")
    target = await storage.calls.create_volume(storage.pool, "live-only", MiB)
    name = storage.define("running", [("file", "disk", boot), ("file", "disk", target.path)])
    virsh("start", name)
    virsh("detach-disk", name, "vdb", "--config")  # still in the running guest
    assert target.path not in virsh("dumpxml", name, "--inactive").stdout

    for disk in (target.path, boot):
        users = await storage.calls.domains_using(os.path.realpath(disk))
        assert [(u.name, u.power, u.shut_off) for u in users] == [(name, "running", False)]


# ---- who has a file open ------------------------------------------------------------------


@contextlib.contextmanager
def holder(path: str) -> Iterator[int]:
    """A child process holding ``path`` open for reading until the block ends."""
    child = subprocess.Popen(
        [sys.executable, "-c",
         "import sys; f = open(sys.argv[1], 'rb'); print('open', flush=True); sys.stdin.read()",
         path], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "open"
        yield child.pid
    finally:
        assert child.stdin is not None and child.stdout is not None
        child.stdin.close()
        child.wait(timeout=10)
        child.stdout.close()


@pytest.mark.integration
def test_open_by_names_a_process_holding_the_file_by_any_name_and_not_ourselves(
        tmp_path: Path) -> None:
    target = tmp_path / "volume.img"
    target.write_bytes(b"x" * 4096)
    alias = tmp_path / "hard-link"
    os.link(target, alias)
    untouched = tmp_path / "other.img"
    untouched.write_bytes(b"y")

    with holder(str(alias)) as pid, target.open("rb"):
        assert openers.open_by(str(target)) == [pid]
        assert openers.open_by(str(untouched)) == []
    wait_for_sync(lambda: openers.open_by(str(target)) == [], timeout=10,
                  what="the holder to let go")


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    backing = tmp_path / f"loop-{uuid.uuid4().hex[:8]}.img"
    with backing.open("wb") as handle:
        handle.truncate(4 * MiB)
    try:
        device = run("losetup", "--find", "--show", backing).strip()
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"no loop device here: {exc}")
    try:
        yield device, backing
    finally:
        subprocess.run(["losetup", "--detach", device], check=False, capture_output=True)


@pytest.mark.integration
def test_open_by_matches_a_block_device_by_number_and_kernel_holders_name_the_loop(
        loop_device: tuple[str, Path], tmp_path: Path) -> None:
    device, backing = loop_device
    node = tmp_path / "same-device"
    os.mknod(node, 0o600 | stat.S_IFBLK, os.stat(device).st_rdev)  # another node, same device

    with holder(device) as pid:
        assert openers.open_by(str(node)) == [pid]
        # The loop driver, not a process, holds the backing file.
        assert openers.open_by(str(backing)) == []
    assert openers.kernel_holders(str(backing)) == [device]
    assert openers.kernel_holders(str(tmp_path)) == []
    assert openers.open_by(device) == []


# ---- the start interlock ------------------------------------------------------------------


@pytest.fixture(scope="module")
def hook_installed(services_env: dict[str, str]) -> None:
    """The start interlock hook; restarts libvirtd only when the hook is new or changed."""
    subprocess.run([str(ROOT / "scripts" / "install-hook.sh")], check=True,
                   capture_output=True, timeout=120)


@pytest.mark.libvirt
async def test_a_domain_whose_disk_is_being_written_cannot_start_until_the_marker_is_gone(
        storage: Storage, hook_installed: None) -> None:
    await storage.calls.create_volume(storage.pool, "written", MiB)
    boot = storage.boot_disk("boot.img")
    name = storage.define("marked", [("file", "disk", boot),
                                     ("volume", "disk", f"{storage.pool}/written")])
    job = f"job-{uuid.uuid4()}"

    with marked_writing(await real_path_of(storage, "written"), pool=storage.pool,
                        volume="written", job_id=job):
        refused = virsh("start", name, check=False)
        assert refused.returncode != 0
        assert f"volume written of pool {storage.pool}" in refused.stderr
        assert f"for job {job}" in refused.stderr
        assert virsh("domstate", name).stdout.strip() == "shut off"

    virsh("start", name)
    assert virsh("domstate", name).stdout.strip() == "running"
