"""The whole product as operators run it: the daemon process, real S3, RabbitMQ, libvirtd.

These cover what only the assembled daemon can show: a write interrupted by kill -9 is
resumed after a restart (and the hook keeps the domain from starting meanwhile), a
hostile image never reaches a volume, and ``status`` / ``/metrics`` tell which domains
are outdated.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.bootimage import domain_xml, write_qcow2_image
from tests.integration.harness import Env
from tests.integration.test_reprovision import (
    hook_installed,  # noqa: F401 - fixture
    sha256_of,
    virsh_sync,
)
from testsupport.daemon import DaemonProcess
from testsupport.services import delete_amqp, free_port, minio_event, publish
from watcher.core.domain import NAMESPACE, parse_state

pytestmark = pytest.mark.libvirt
CLI = [sys.executable, "-m", "watcher"]
MiB = 1024 * 1024


@pytest.fixture
def env(services_env: dict[str, str], s3_bucket: str, unique_name: str,
        world_readable_tmp: Path, hook_installed: None) -> Iterator[Env]:  # noqa: F811
    world = Env(root=world_readable_tmp, bucket=s3_bucket,
                exchange=f"minio-events-{unique_name}", queue=f"lvw-test-{unique_name}",
                s3=services_env)
    world.domains = []  # type: ignore[attr-defined]
    yield world
    for name in world.domains:  # type: ignore[attr-defined]
        virsh_sync("destroy", name, check=False)
        virsh_sync("undefine", name, check=False)
    asyncio.run(delete_amqp(world.exchange, world.queue))


def qemu_img_compare(image: Path, volume: Path) -> subprocess.CompletedProcess[str]:
    """Whether a raw volume holds exactly a qcow2 image's guest-visible content (exit 0)."""
    return subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(image),
                           str(volume)], capture_output=True, text=True)


def state_of(name: str) -> str:
    out = virsh_sync("metadata", name, "--uri", NAMESPACE, "--config", check=False)
    if out.returncode != 0 or not out.stdout.strip():
        return ""
    state = parse_state(out.stdout)
    return state.kind if state else ""


def reason_of(name: str) -> str:
    out = virsh_sync("metadata", name, "--uri", NAMESPACE, "--config", check=False)
    state = parse_state(out.stdout)
    return (state.reason or "") if state else ""


def define_domain(env: Env, name: str, volume: Path) -> None:
    xml = env.root / f"{name}.xml"
    xml.write_text(domain_xml(name, str(volume), env.root / f"{name}.log"))
    virsh_sync("define", str(xml))
    env.domains.append(name)  # type: ignore[attr-defined]


def setup(env: Env, name: str, image_key: str, *, volume_size: int) -> Path:
    disks = env.root / "disks"
    disks.mkdir(mode=0o755, exist_ok=True)
    volume = disks / f"{name}.img"
    with open(volume, "wb") as fh:
        fh.write(os.urandom(MiB))  # old content whose survival the refusals must prove
        fh.truncate(volume_size)
    env.write_config(http={"listen": f"127.0.0.1:{free_port()}"},
                     volumes={"allow": [str(disks.resolve()) + "/*"]})
    env.write_policy({"base": {"bucket": env.bucket, "key": image_key, "format": "qcow2"}},
                     [{"match": name, "image": "base"}])
    define_domain(env, name, volume)
    return volume


def test_a_write_killed_by_sigkill_is_resumed_after_restart_and_the_hook_holds_the_domain(
        env: Env, unique_name: str) -> None:
    name = f"lvw-{unique_name}"
    key = "images/big.qcow2"
    size = 768 * MiB
    image = env.root / "big.qcow2"
    raw = env.root / "big.raw"
    with open(raw, "wb") as fh:  # incompressible, so the write takes a while
        for _ in range(size // (8 * MiB)):
            fh.write(os.urandom(8 * MiB))
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw),
                    str(image)], check=True)
    raw.unlink()
    volume = setup(env, name, key, volume_size=size)
    env.upload_with_sidecar(key, image)
    daemon = DaemonProcess(env.config_path, log=env.root / "watcher.log").start()
    try:
        daemon.wait(lambda: (env.cache_dir / "objects").exists() and any(
            (env.cache_dir / "objects").glob("*.json")), 120, "image warmed")
        subprocess.run([*CLI, "reprovision", name], check=True, timeout=60)
        daemon.wait(lambda: state_of(name) == "provisioning", 60, "the write to start")
        daemon.kill()
        assert state_of(name) == "provisioning"

        refused = virsh_sync("start", name, check=False)
        assert refused.returncode != 0
        assert "it can start once the write has finished" in refused.stderr

        daemon.start()
        daemon.wait(lambda: state_of(name) == "provisioned", 180, "the write to be resumed")
        compare = qemu_img_compare(image, volume)
        assert compare.returncode == 0, compare.stdout + compare.stderr
    finally:
        daemon.stop()


def test_a_hostile_image_never_reaches_a_volume(env: Env, unique_name: str) -> None:
    name = f"lvw-{unique_name}"
    key = "images/hostile.qcow2"
    base = write_qcow2_image(env.root / "base.qcow2", "BASE", MiB)
    hostile = env.root / "hostile.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2",
                    str(hostile)], check=True)
    volume = setup(env, name, key, volume_size=4 * MiB)
    before = sha256_of(volume)
    env.upload_with_sidecar(key, hostile)
    daemon = DaemonProcess(env.config_path, log=env.root / "watcher.log").start()
    try:
        subprocess.run([*CLI, "reprovision", name], check=True, timeout=60)
        daemon.wait(lambda: state_of(name) == "failed", 60, "the reprovision to fail")
        assert "backing file" in reason_of(name)
        assert sha256_of(volume) == before
        assert not list((env.cache_dir / "objects").glob("*.json"))
    finally:
        assert daemon.stop() == 0


def test_status_and_metrics_show_a_domain_outdated_once_a_newer_image_is_cached(
        env: Env, unique_name: str) -> None:
    name = f"lvw-{unique_name}"
    key = "images/boot.qcow2"
    volume = setup(env, name, key, volume_size=MiB)
    v1_image = write_qcow2_image(env.root / "v1.qcow2", "V1", MiB)
    env.upload_with_sidecar(key, v1_image)
    port = json.loads(json.dumps(__import__("yaml").safe_load(
        env.config_path.read_text())))["http"]["listen"].rsplit(":", 1)[1]
    daemon = DaemonProcess(env.config_path, log=env.root / "watcher.log").start()
    try:
        subprocess.run([*CLI, "reprovision", name], check=True, timeout=60)
        daemon.wait(lambda: state_of(name) == "provisioned", 60, "v1 to be written")
        v2 = env.upload_with_sidecar(key, write_qcow2_image(env.root / "v2.qcow2", "V2", MiB))
        asyncio.run(publish(env.exchange, minio_event(env.bucket, key)))
        daemon.wait(lambda: (env.cache_dir / "objects" / f"{v2}.json").exists(), 30,
                    "v2 cached")
        status = subprocess.run([*CLI, "status", "--json", "--config", str(env.config_path)],
                                capture_output=True, text=True, check=True, timeout=60)
        rows = {row["domain"]: row for row in json.loads(status.stdout)["domains"]}
        assert rows[name]["outdated"] is True
        assert rows[name]["current_sha256"] == v2
        # Outdated, not rewritten: the volume still holds v1, byte for byte.
        assert qemu_img_compare(v1_image, volume).returncode == 0

        daemon.signal(signal.SIGHUP)  # reload -> reconcile

        def outdated_metric() -> bool:
            body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
            return b"volume_watcher_domains_outdated 1.0" in body

        daemon.wait(outdated_metric, 60, "domains_outdated metric")
    finally:
        assert daemon.stop() == 0
