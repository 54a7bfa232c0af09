"""Two watcher daemons on one libvirtd, each with its own policies, touch only their own
domains: real processes, real S3, RabbitMQ, libvirtd and QEMU guests.

Each watcher has its own config, policies, exchange, queue, cache and state; their rules
are disjoint. Both watchers' domains are tagged at the same moment, with one more domain
that neither owns (watcher A has a rule for it, scoped by ``hosts:`` to other hosts). Each
domain must be rebuilt by its own watcher with its own image (the provisioned digest, the
volume's content and the banner it boots), none may end ``failed``, and each watcher must
say once that the other's domains are unmatched and never write them.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pytest

from tests.bootimage import domain_xml, write_qcow2_image
from tests.integration.harness import Env
from tests.integration.test_reprovision import (
    hook_installed,  # noqa: F401 - fixture
    virsh_sync,
)
from testsupport.daemon import DaemonProcess
from testsupport.polling import wait_for_sync
from testsupport.services import delete_amqp, free_port
from watcher.core.domain import NAMESPACE, DomainState, parse_state

pytestmark = pytest.mark.libvirt
CLI = [sys.executable, "-m", "watcher"]
MiB = 1024 * 1024
PER_WATCHER = 3
UNMATCHED = "tagged domain left as it is: unmatched"
UNMATCHED_GAUGE = 'volume_watcher_domains{state="unmatched"}'


@dataclass
class Instance:
    """One watcher: its world, its image, its domains and its process."""

    label: str
    env: Env
    banner: str
    key: str
    port: int = field(default_factory=free_port)
    digest: str = ""
    image: Path | None = None
    domains: list[str] = field(default_factory=list)
    daemon: DaemonProcess | None = None

    @property
    def image_name(self) -> str:
        return f"img-{self.label}"

    def records(self, event: str) -> list[dict[str, object]]:
        assert self.daemon is not None
        return [record for _, record in list(self.daemon.records) if record.get("event") == event]

    def metric(self, line_start: str) -> float | None:
        body = urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5)
        for line in body.read().decode().splitlines():
            if line.startswith(line_start + " "):
                return float(line.rsplit(" ", 1)[1])
        return None

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*CLI, *args, "--config", str(self.env.config_path)],
                              capture_output=True, text=True, timeout=60)


def said_unmatched(instance: Instance, expected: set[str]) -> bool:
    """The watcher said of every domain in ``expected`` that it is unmatched."""
    return {str(record["domain"]) for record in instance.records(UNMATCHED)} >= expected


def counts_unmatched(instance: Instance) -> bool:
    return (instance.metric(UNMATCHED_GAUGE) or 0) >= 1


def printed(log: Path, banner: str) -> bool:
    return log.exists() and banner in log.read_text(errors="replace")


def element_of(name: str) -> str:
    """The watcher's metadata element exactly as libvirt returns it."""
    return virsh_sync("metadata", name, "--uri", NAMESPACE, "--config").stdout


def state_of(name: str) -> DomainState | None:
    text = element_of(name)
    return parse_state(text) if text.strip() else None


@pytest.fixture
def instances(services_env: dict[str, str], s3_bucket: str, unique_name: str,
              world_readable_tmp: Path, hook_installed: None,  # noqa: F811
              ) -> Iterator[tuple[Instance, Instance, list[str]]]:
    """Watchers A and B (not started) and a list of domains to remove afterwards."""
    made = []
    for label in ("a", "b"):
        root = world_readable_tmp / label
        root.mkdir(mode=0o755)
        env = Env(root=root, bucket=s3_bucket, exchange=f"minio-events-{unique_name}-{label}",
                  queue=f"lvw-test-{unique_name}-{label}", s3=services_env)
        made.append(Instance(label, env, f"WATCHER {label.upper()} IMAGE", f"{label}/image.qcow2"))
    domains: list[str] = []
    try:
        yield made[0], made[1], domains
    finally:
        for instance in made:
            if instance.daemon is not None:
                instance.daemon.stop()
        for name in domains:
            virsh_sync("destroy", name, check=False)
            virsh_sync("undefine", name, check=False)
        for instance in made:
            asyncio.run(delete_amqp(instance.env.exchange, instance.env.queue))


def test_two_watchers_on_one_libvirtd_rebuild_only_the_domains_their_rules_match(
        instances: tuple[Instance, Instance, list[str]], unique_name: str,
        world_readable_tmp: Path) -> None:
    a, b, cleanup = instances
    prefix = f"lvw-{unique_name}"
    disks = world_readable_tmp / "disks"
    disks.mkdir(mode=0o755)
    allow = {"allow": [str(disks.resolve()) + "/*"]}
    for instance in (a, b):
        instance.image = write_qcow2_image(instance.env.root / "image.qcow2", instance.banner,
                                           MiB)
        instance.digest = instance.env.upload_with_sidecar(instance.key, instance.image)
        instance.env.write_config(http={"listen": f"127.0.0.1:{instance.port}"}, volumes=allow)
        rules: list[dict[str, object]] = [
            {"match": f"{prefix}-{instance.label}-*", "image": instance.image_name}]
        if instance is a:  # a rule for the third domain, but only on other hosts
            rules.append({"match": f"{prefix}-c-*", "image": a.image_name,
                          "hosts": ["elsewhere-*"]})
        instance.env.write_policy({instance.image_name: {
            "bucket": instance.env.bucket, "key": instance.key, "format": "qcow2"}}, rules)
        instance.domains = [f"{prefix}-{instance.label}-{n}" for n in range(PER_WATCHER)]
    orphan = f"{prefix}-c-0"
    volumes: dict[str, Path] = {}
    for name in [*a.domains, *b.domains, orphan]:
        volume = volumes[name] = disks / f"{name}.img"
        with open(volume, "wb") as fh:
            fh.write(os.urandom(MiB))  # old content, so a write shows
            fh.truncate(2 * MiB)
        xml = world_readable_tmp / f"{name}.xml"
        xml.write_text(domain_xml(name, str(volume), world_readable_tmp / f"{name}.log"))
        virsh_sync("define", str(xml))
        cleanup.append(name)
    orphan_before = volumes[orphan].read_bytes()

    for instance in (a, b):
        instance.daemon = DaemonProcess(instance.env.config_path).start()
    for instance in (a, b):
        assert instance.daemon is not None
        entry = instance.env.cache_dir / "objects" / f"{instance.digest}.json"
        instance.daemon.wait(entry.exists, 120, f"watcher {instance.label} to warm its image")
        instance.daemon.wait(partial(instance.records, "connected to libvirt"), 30,
                             f"watcher {instance.label} to connect to libvirt")
        # The label exists from the start (at 0 unless another domain here is unmatched).
        assert instance.metric(UNMATCHED_GAUGE) is not None

    tagged = [*a.domains, *b.domains, orphan]
    started = time.monotonic()
    with ThreadPoolExecutor(len(tagged)) as pool:  # every tag at the same moment
        list(pool.map(lambda name: virsh_sync(
            "metadata", name, "--uri", NAMESPACE, "--key", "vw", "--set", "<reprovision/>",
            "--config"), tagged))
    orphan_element = element_of(orphan)

    owned = {name: instance for instance in (a, b) for name in instance.domains}

    def all_rebuilt() -> bool:
        for instance in (a, b):
            assert instance.daemon is not None and instance.daemon.running, instance.label
        states = {name: state_of(name) for name in owned}
        failed = {name: state for name, state in states.items()
                  if state is not None and state.kind == "failed"}
        assert not failed, f"failed: {failed}"
        return all(state is not None and state.kind == "provisioned"
                   for state in states.values())

    wait_for_sync(all_rebuilt, timeout=180, interval=0.1, what="every domain to be rebuilt")
    rebuilt_in = time.monotonic() - started

    for name, instance in owned.items():
        state = state_of(name)
        assert state is not None
        assert (state.image, state.sha256) == (instance.image_name, instance.digest), name
        assert instance.image is not None
        compare = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw",
                                  str(instance.image), str(volumes[name])],
                                 capture_output=True, text=True)
        assert compare.returncode == 0, (name, compare.stdout, compare.stderr)

    # Each watcher said once of the orphan (tagged for good) that it left it as it is, and at
    # most once of each of the other's domains: only if it looked while that one was still
    # tagged, since the owner may have rebuilt it first. It recorded nothing for any of them;
    # the orphan is the same, byte for byte, as it was tagged.
    for instance, other in ((a, b), (b, a)):
        assert instance.daemon is not None
        instance.daemon.wait(partial(said_unmatched, instance, {orphan}), 30,
                             f"watcher {instance.label} to say the orphan is unmatched")
        unmatched = [r["domain"] for r in instance.records(UNMATCHED)]
        assert unmatched.count(orphan) == 1, (instance.label, unmatched)
        for name in other.domains:
            assert unmatched.count(name) <= 1, (instance.label, name, unmatched)
        assert set(unmatched) <= {*other.domains, orphan}, (instance.label, unmatched)
        finished = instance.records("reprovision finished")
        assert sorted(str(r["domain"]) for r in finished) == sorted(instance.domains)
        assert {r["result"] for r in finished} == {"provisioned"}
        assert not [r for r in instance.records("reprovision planned")
                    if r.get("domain") not in instance.domains]
    why_in_a = next(r["why"] for r in a.records(UNMATCHED) if r["domain"] == orphan)
    assert "only on hosts elsewhere-*" in str(why_in_a)
    assert element_of(orphan) == orphan_element
    assert volumes[orphan].read_bytes() == orphan_before

    # status, status DOMAIN, explain and the gauge call the orphan unmatched.
    listing = a.cli("status", "--json")
    assert listing.returncode == 0, listing.stderr
    rows = {row["domain"]: row for row in json.loads(listing.stdout)["domains"]}
    assert rows[orphan]["state"] == "unmatched" and "elsewhere-*" in rows[orphan]["reason"]
    assert {name: rows[name]["state"] for name in a.domains} == dict.fromkeys(
        a.domains, "provisioned")
    assert not set(b.domains) & set(rows)  # provisioned by B: none of A's business
    text = b.cli("status")
    assert any(line.split()[:1] == [orphan] and "unmatched" in line
               for line in text.stdout.splitlines()), text.stdout
    one = b.cli("status", orphan, "--json")
    assert json.loads(one.stdout)["state"] == "unmatched", one.stdout
    explained = b.cli("explain", orphan)
    assert "now:" in explained.stdout and "unmatched" in explained.stdout, explained.stdout
    for instance in (a, b):
        assert instance.daemon is not None
        instance.daemon.signal(signal.SIGHUP)  # reload, then a reconcile counts the domains
        instance.daemon.wait(partial(counts_unmatched, instance), 60,
                             f"watcher {instance.label} to count the orphan as unmatched")
    assert element_of(orphan) == orphan_element
    assert state_of(orphan) == DomainState("reprovision")

    # Each rebuilt guest boots its own watcher's image.
    for name, instance in owned.items():
        log = world_readable_tmp / f"{name}.log"
        virsh_sync("start", name)
        wait_for_sync(partial(printed, log, instance.banner), 30,
                      what=f"{name} to boot its image")
        virsh_sync("destroy", name)
    print(f"{len(owned)} domains of two watchers rebuilt in {rebuilt_in:.1f}s")
