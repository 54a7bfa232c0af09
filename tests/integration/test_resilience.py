"""Hostile names, unexpected errors and uploads in either order, on the real services.

Each test drives the real daemon (or the real cache) against RabbitMQ and the S3 server
and proves one promise: a name from a policy file never becomes a path outside the
cache; an unexpected exception in one unit of work is logged, counted and retried while
the daemon keeps running; every new rejection stays visible; an event that arrives
before its object or sidecar is normal and acked, not dead-lettered.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import structlog

from tests.integration.harness import Env
from testsupport.daemon import running_daemon
from testsupport.metrics import metric_async, metric_grows, metric_now
from testsupport.polling import wait_for
from testsupport.services import make_qcow2, minio_event, publish, ready_count, sha256_file
from watcher.adapters.s3 import S3Store
from watcher.cache import Cache
from watcher.config import load_config
from watcher.core.errors import UnsafeName
from watcher.core.policy import ImageSpec
from watcher.runtime.supervisor import Daemon

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


RECEIVED = "volume_watcher_events_received_total"
UNEXPECTED = "volume_watcher_unexpected_errors_total"
DEAD_LETTERED = "volume_watcher_events_dead_lettered_total"


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


# --- names that would leave the cache ------------------------------------------------------


def test_check_reports_image_names_that_are_not_identifiers_at_their_line(env: Env) -> None:
    (env.policies_dir / "10-bad.yaml").write_text(
        "images:\n"
        "  ../../x: {bucket: b, key: k.qcow2, format: qcow2}\n"
        "  ubuntu/24.04: {bucket: b, key: u.qcow2, format: qcow2}\n"
        "  ubuntu-24.04: {bucket: b, key: u.qcow2, format: qcow2}\n")
    result = subprocess.run(
        [sys.executable, "-m", "watcher", "check", "--config", str(env.config_path)],
        capture_output=True, text=True, timeout=60, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 1, result.stdout + result.stderr
    bad = str(env.policies_dir / "10-bad.yaml")
    assert f"{bad}:2: images: image name '../../x' is not valid" in result.stderr
    assert f"{bad}:3: images: image name 'ubuntu/24.04' is not valid" in result.stderr
    assert ":4:" not in result.stdout  # ubuntu-24.04 is fine


@pytest.mark.parametrize("name", ["../../x", "ubuntu/24.04", "../../../../../../../../tmp/x"])
async def test_the_cache_refuses_an_image_name_that_is_not_an_identifier_before_any_download(
        env: Env, tmp_path: Path, name: str) -> None:
    key = "images/hostile.qcow2"
    env.upload_with_sidecar(key, make_qcow2(tmp_path / "v1.qcow2"))
    settings = load_config(env.config_path)
    cache = Cache(env.cache_dir, S3Store(settings.s3), max_size=1 << 30)
    await cache.load(create=True)
    before = files_under(tmp_path)
    image = ImageSpec(name=name, bucket=env.bucket, key=key, prefix=None, format="qcow2")
    with pytest.raises(UnsafeName):
        await cache.ensure(image)
    assert files_under(tmp_path) == before  # nothing written, inside the cache or out
    assert cache.current(name) is None


async def test_a_policy_with_a_slash_in_an_image_name_leaves_the_daemon_running(
        env: Env, tmp_path: Path) -> None:
    key = "ubuntu/24.04.qcow2"
    env.write_policy({"ubuntu/24.04": {"bucket": env.bucket, "key": key, "format": "qcow2"}})
    env.upload_with_sidecar(key, make_qcow2(tmp_path / "v1.qcow2"))
    async with running_daemon(env.config_path) as daemon:
        received = await metric_async(daemon, RECEIVED)
        await publish(env.exchange, minio_event(env.bucket, key))
        await metric_grows(daemon, RECEIVED, received, 1)
        await wait_for(lambda: daemon.daemon.consumer.messages_in_flight == 0,
                       what="the handler")
        assert daemon.daemon.readiness()["policies"] is False
        assert daemon.entries() == []
        assert not daemon.task.done()
    assert daemon.exit_code == 0
    assert not (env.cache_dir / "refs" / "ubuntu").exists()


# --- unexpected errors ---------------------------------------------------------------------


async def test_an_unexpected_error_in_a_warm_is_logged_counted_and_retried_while_running(
        env: Env, tmp_path: Path) -> None:
    key = "images/base.qcow2"
    env.write_policy({"base": {"bucket": env.bucket, "key": key, "format": "qcow2"}})
    digest = env.upload_with_sidecar(key, make_qcow2(tmp_path / "v1.qcow2"))
    # A directory where the image's reference record goes: writing it raises
    # IsADirectoryError, an OSError no code path expects, in the start-up reconcile.
    blocker = env.cache_dir / "refs" / "base.json"
    blocker.mkdir(parents=True)
    before = metric_now(UNEXPECTED, unit="warm")
    with structlog.testing.capture_logs() as logs:
        async with running_daemon(env.config_path) as daemon:
            await metric_grows(daemon, UNEXPECTED, before, 1, unit="warm")
            assert not daemon.task.done()
            assert daemon.daemon.http is not None
            health = await asyncio.to_thread(
                urllib.request.urlopen, f"http://127.0.0.1:{daemon.daemon.http.port}/healthz",
                timeout=5)
            assert health.status == 200

            blocker.rmdir()  # the cause is gone: the next event succeeds
            await publish(env.exchange, minio_event(env.bucket, key))
            await wait_for(lambda: (current := daemon.daemon.cache.current("base")) is not None
                           and current.digest == digest, what="the image's reference")
    assert daemon.exit_code == 0
    unexpected = [e for e in logs if e.get("unit") == "warm" and e["log_level"] == "error"]
    assert len(unexpected) == 1
    assert unexpected[0].get("exc_info") is True
    assert any(e["event"] == "image warm again" for e in logs)


async def test_an_unexpected_error_in_a_reconcile_pass_does_not_stop_the_next_pass(
        env: Env, tmp_path: Path) -> None:
    key = "images/base.qcow2"
    env.write_policy({"base": {"bucket": env.bucket, "key": key, "format": "qcow2"}})
    digest = env.upload_with_sidecar(key, make_qcow2(tmp_path / "v1.qcow2"))

    class FirstPassFails(Daemon):
        """The first reconcile pass raises an OSError, as a full disk would."""

        passes = 0

        async def reconcile(self) -> None:
            FirstPassFails.passes += 1
            if FirstPassFails.passes == 1:
                raise OSError(28, "No space left on device")
            await super().reconcile()

    before = metric_now(UNEXPECTED, unit="reconcile")
    async with running_daemon(env.config_path, FirstPassFails) as daemon:
        await metric_grows(daemon, UNEXPECTED, before, 1, unit="reconcile")
        assert not daemon.task.done()
        daemon.daemon.reconcile_requested.set()  # the next pass, as the interval would
        await wait_for(lambda: digest in daemon.entries(), what="the second pass")
        assert FirstPassFails.passes == 2
        assert await metric_async(daemon, UNEXPECTED, unit="reconcile") == before + 1
    assert daemon.exit_code == 0


# --- rejections stay visible ---------------------------------------------------------------


async def test_every_new_rejection_of_an_image_is_a_warning_naming_object_version_and_reason(
        env: Env, tmp_path: Path) -> None:
    key = "images/base.qcow2"
    env.write_policy({"base": {"bucket": env.bucket, "key": key, "format": "qcow2"}})
    with structlog.testing.capture_logs() as logs:
        async with running_daemon(env.config_path) as daemon:
            received = await metric_async(daemon, RECEIVED)
            # Version 1: the sidecar does not match.
            v1 = make_qcow2(tmp_path / "v1.qcow2", seed=1)
            etag1 = env.upload_file(key, v1)
            env.upload(key + ".sha256", b"0" * 64 + b"\n")
            await publish(env.exchange, minio_event(env.bucket, key))
            await wait_for(lambda: any(e["event"] == "image rejected" for e in logs),
                           what="the first rejection")
            # The same again: a repeat, not a new line.
            await publish(env.exchange, minio_event(env.bucket, key))
            await metric_grows(daemon, RECEIVED, received, 2)
            await wait_for(lambda: daemon.daemon.consumer.messages_in_flight == 0,
                           what="the repeat handled")
            # Version 2: a raw file declared qcow2, with a matching sidecar.
            v2 = tmp_path / "v2.raw"
            v2.write_bytes(os.urandom(1 << 20))
            etag2 = env.upload_file(key, v2)
            env.upload(key + ".sha256", f"{sha256_file(v2)}\n".encode())
            await publish(env.exchange, minio_event(env.bucket, key))
            await wait_for(lambda: len([e for e in logs if e["event"] == "image rejected"]) >= 2,
                           what="the second rejection")
            await wait_for(lambda: daemon.daemon.consumer.messages_in_flight == 0,
                           what="the handlers")
    rejections = [e for e in logs if e["event"] == "image rejected"]
    assert [(e["log_level"], e["version"], e["reason"]) for e in rejections] == [
        ("warning", etag1, "checksum_mismatch"), ("warning", etag2, "format_mismatch")]
    for event in rejections:
        assert event["image"] == "base" and event["bucket"] == env.bucket
        assert event["key"] == key
    assert rejections[1]["digest"] == sha256_file(v2)


async def test_a_download_that_fails_is_a_warning_with_its_reason(
        env: Env, tmp_path: Path) -> None:
    key = "images/base.qcow2"
    env.write_policy({"base": {"bucket": env.bucket, "key": key, "format": "qcow2"}})
    env.upload_with_sidecar(key, make_qcow2(tmp_path / "v1.qcow2"))
    small = tmp_path / "small-cache"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)],
                   check=True, timeout=30)
    try:
        env.write_config(cache={"dir": str(small)})
        with structlog.testing.capture_logs() as logs:
            async with running_daemon(env.config_path) as daemon:
                await wait_for(lambda: any(e["event"] == "image download failed" for e in logs),
                               what="the failed download")
                assert daemon.entries() == []
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False, timeout=30)
    failed = next(e for e in logs if e["event"] == "image download failed")
    assert failed["log_level"] == "warning"
    assert failed["reason"] == "ENOSPC"
    assert failed["key"] == key and failed["image"] == "base" and failed["version"]


# --- uploads in either order ---------------------------------------------------------------


async def test_events_for_objects_not_uploaded_yet_are_acked_and_never_dead_lettered(
        env: Env, tmp_path: Path) -> None:
    key = "images/base.qcow2"
    env.write_policy({"base": {"bucket": env.bucket, "key": key, "format": "qcow2"}})
    image = make_qcow2(tmp_path / "v1.qcow2")
    digest = sha256_file(image)
    with structlog.testing.capture_logs() as logs:
        async with running_daemon(env.config_path) as daemon:
            received = await metric_async(daemon, RECEIVED)
            dead = await metric_async(daemon, DEAD_LETTERED)
            # The sidecar first: its event arrives while the image does not exist.
            env.upload(key + ".sha256", f"{digest}\n".encode())
            await publish(env.exchange, minio_event(env.bucket, key + ".sha256"))
            # An event for the image itself, published before the object lands.
            await publish(env.exchange, minio_event(env.bucket, key))
            await metric_grows(daemon, RECEIVED, received, 2)
            await wait_for(lambda: daemon.daemon.consumer.messages_in_flight == 0,
                           what="the handlers")
            waiting = [e for e in logs if e["event"] == "waiting for the image"]
            assert waiting and all(e["log_level"] == "info" for e in waiting)
            assert await metric_async(daemon, DEAD_LETTERED) == dead

            env.upload_file(key, image)
            await publish(env.exchange, minio_event(env.bucket, key))
            await wait_for(lambda: digest in daemon.entries(), what="the cache entry")
            assert await metric_async(daemon, DEAD_LETTERED) == dead
    queue = load_config(env.config_path).amqp.queue_name()
    assert await ready_count(f"{queue}.dead") == 0
    assert await ready_count(queue) == 0
