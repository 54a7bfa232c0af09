"""A failed rebuild is explained by one warning line: the daemon process, real libvirtd.

Two domains of one watcher fail at two different steps (a volume too small to hold the
image: ``check``; a request naming an image no policy defines: ``resolve``). Each gets a
``failed`` element with a reason and exactly one warning line naming the domain, the rule
(glob, index, file:line) and the step, with the same reason.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.bootimage import domain_xml, write_qcow2_image
from tests.integration.harness import Env
from tests.integration.test_reprovision import (
    hook_installed,  # noqa: F401 - fixture
    virsh_sync,
)
from tests.integration.test_two_watchers import state_of
from testsupport.daemon import DaemonProcess
from testsupport.services import delete_amqp
from watcher.core.domain import NAMESPACE

pytestmark = pytest.mark.libvirt
MiB = 1024 * 1024


@pytest.fixture
def env(services_env: dict[str, str], s3_bucket: str, unique_name: str,
        world_readable_tmp: Path, hook_installed: None,  # noqa: F811
        ) -> Iterator[tuple[Env, list[str]]]:
    world = Env(root=world_readable_tmp, bucket=s3_bucket,
                exchange=f"minio-events-{unique_name}", queue=f"lvw-test-{unique_name}",
                s3=services_env)
    domains: list[str] = []
    yield world, domains
    for name in domains:
        virsh_sync("undefine", name, check=False)
    asyncio.run(delete_amqp(world.exchange, world.queue))


def test_each_failure_has_a_reason_and_one_warning_with_domain_rule_and_step(
        env: tuple[Env, list[str]], unique_name: str) -> None:
    world, domains = env
    prefix = f"lvw-{unique_name}"
    disks = world.root / "disks"
    disks.mkdir(mode=0o755)
    image = write_qcow2_image(world.root / "image.qcow2", "FAILURE LINE", 2 * MiB)
    digest = world.upload_with_sidecar("f/image.qcow2", image)
    world.write_config(volumes={"allow": [str(disks.resolve()) + "/*"]})
    world.write_policy({"base": {"bucket": world.bucket, "key": "f/image.qcow2",
                                 "format": "qcow2"}},
                       [{"match": f"{prefix}-none-*", "image": "base"},
                        {"match": f"{prefix}-*", "image": "base"}])
    requests = {f"{prefix}-small": "<reprovision/>",
                f"{prefix}-unknown": '<reprovision image="nowhere"/>'}
    for name in requests:
        volume = disks / f"{name}.img"
        with open(volume, "wb") as fh:
            fh.write(os.urandom(MiB // 2))  # smaller than the image's 2 MiB
        xml = world.root / f"{name}.xml"
        xml.write_text(domain_xml(name, str(volume), world.root / f"{name}.log"))
        virsh_sync("define", str(xml))
        domains.append(name)

    daemon = DaemonProcess(world.config_path).start()
    try:
        entry = world.cache_dir / "objects" / f"{digest}.json"
        daemon.wait(entry.exists, 120, "the image to be warmed")
        for name, element in requests.items():
            virsh_sync("metadata", name, "--uri", NAMESPACE, "--key", "vw", "--set", element,
                       "--config")

        def failed_lines() -> list[dict[str, object]]:
            return [record for _, record in list(daemon.records)
                    if record.get("event") == "reprovision finished"
                    and record.get("result") == "failed"]

        daemon.wait(lambda: len(failed_lines()) >= len(requests), 60, "both jobs to fail")
    finally:
        assert daemon.stop() == 0

    lines = {str(record["domain"]): record for record in failed_lines()}
    assert len(failed_lines()) == len(lines) == len(requests), failed_lines()
    steps = {f"{prefix}-small": "check", f"{prefix}-unknown": "resolve"}
    reasons = {f"{prefix}-small": "grow: false", f"{prefix}-unknown": "'nowhere' is not defined"}
    for name, record in lines.items():
        state = state_of(name)  # recorded before its line was written
        assert state is not None and state.kind == "failed" and state.reason, state
        assert reasons[name] in state.reason
        assert record["level"] == "warning"
        warnings = [r for _, r in daemon.records
                    if r.get("level") == "warning" and r.get("domain") == name]
        assert warnings == [record], warnings  # the one line that says why
        assert (record["rule"], record["rule_index"], record["step"]) == (
            f"{prefix}-*", 1, steps[name]), record
        assert record["rule_origin"] == f"{world.policies_dir / '10-test.yaml'}:4", record
        assert record["reason"] == state.reason
        assert record["uuid"] and "seconds" in record
