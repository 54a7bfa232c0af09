"""Downloads held for a corrected sidecar stay bounded: real S3, RabbitMQ, qemu-img, daemon.

A pipeline whose checksum step is broken publishes version after version with a sidecar
that does not match. Each test uploads such versions, publishes MinIO's notifications,
and watches the cache directory (``held/``, ``tmp/``, ``objects/``), the metrics and the
``cache`` commands, waiting on conditions rather than on time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.integration.harness import Env
from tests.integration.test_cache import cli, cli_async, tree
from testsupport.daemon import DaemonProcess, RunningDaemon, running_daemon
from testsupport.metrics import metric_async, metric_grows
from testsupport.polling import wait_for
from testsupport.services import make_qcow2, minio_event, publish, sha256_file

pytestmark = pytest.mark.integration

KEY = "images/base.qcow2"
REJECTED = "volume_watcher_images_rejected_total"
CACHE_BYTES = "volume_watcher_cache_bytes"
DOWNLOADS = "volume_watcher_downloads_total"
WRONG = b"0" * 64 + b"\n"


def held_files(env: Env) -> set[str]:
    held = env.cache_dir / "held"
    return {p.name for p in held.iterdir()} if held.is_dir() else set()


def held_record(env: Env) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads((env.cache_dir / "held" / "base.json").read_text())
    except (FileNotFoundError, ValueError):
        return None
    return data


HELD_EVENT = "refused download held for a corrected sidecar"


def logged_since_start(proc: DaemonProcess, event: str) -> list[dict[str, Any]]:
    """Log records named ``event`` of the process running now (not of earlier runs)."""
    return [r for when, r in list(proc.records)
            if when >= proc.started and r.get("event") == event]


def parts_in_tmp(env: Env) -> list[Path]:
    return list((env.cache_dir / "tmp").glob("*.part"))


def cache_dir_bytes(env: Env) -> int:
    return sum(p.stat().st_size for p in env.cache_dir.rglob("*") if p.is_file())


async def upload_refused(env: Env, daemon: RunningDaemon, image: Path) -> str:
    """Upload ``image`` with a sidecar that does not match; wait until it is held. Returns
    its ETag."""
    rejected = await metric_async(daemon, REJECTED, reason="checksum_mismatch")
    etag = env.upload_file(KEY, image)
    env.upload(KEY + ".sha256", WRONG)
    await publish(env.exchange, minio_event(env.bucket, KEY))
    await metric_grows(daemon, REJECTED, rejected, 1, reason="checksum_mismatch")
    await wait_for(lambda: (held_record(env) or {}).get("etag") == etag,
                   what=lambda: f"version {etag} held; held/ has {held_record(env)}")
    return etag


@pytest.fixture
def base_policy(env: Env) -> None:
    env.write_policy({"base": {"bucket": env.bucket, "key": KEY, "format": "qcow2"}},
                     [{"match": "*", "image": "base"}])


async def test_refused_versions_leave_one_held_file_and_a_good_version_none(
        env: Env, base_policy: None, tmp_path: Path) -> None:
    versions = [make_qcow2(tmp_path / f"v{i}.qcow2", seed=i) for i in range(1, 6)]
    size = versions[0].stat().st_size
    async with running_daemon(env.config_path) as daemon:
        for image in versions[:4]:
            await upload_refused(env, daemon, image)
            # The older one was replaced, not kept beside it; nothing is left in tmp/.
            await wait_for(lambda: not parts_in_tmp(env), what="no download in tmp/")
            assert held_files(env) == {"base.part", "base.json"}
            assert sha256_file(env.cache_dir / "held" / "base.part") == sha256_file(image)
            assert cache_dir_bytes(env) < 2 * size  # one image, plus small records
            assert await metric_async(daemon, CACHE_BYTES) == size
            assert daemon.entries() == []

        # A redelivery of the held version is refused again without a second transfer.
        downloads = await metric_async(daemon, DOWNLOADS, result="ok")
        rejected = await metric_async(daemon, REJECTED, reason="checksum_mismatch")
        await publish(env.exchange, minio_event(env.bucket, KEY))
        await metric_grows(daemon, REJECTED, rejected, 1, reason="checksum_mismatch")
        assert await metric_async(daemon, DOWNLOADS, result="ok") == downloads
        assert held_files(env) == {"base.part", "base.json"}

        # A held download is listed as such, by a process that changes nothing.
        before = tree(env.cache_dir)
        listed = await cli_async(env, "cache", "list", "--json")
        text = await cli_async(env, "cache", "list")
        assert tree(env.cache_dir) == before
        assert listed.returncode == 0, listed.stderr
        [row] = json.loads(listed.stdout)
        assert row["state"] == "held" and row["image"] == "base"
        assert row["digest"] == sha256_file(versions[3]) and row["size"] == size
        assert row["source"] == f"s3://{env.bucket}/{KEY}" and row["format"] == "qcow2"
        assert " held " in text.stdout and "STATE" in text.stdout

        good = env.upload_with_sidecar(KEY, versions[4])
        await publish(env.exchange, minio_event(env.bucket, KEY))
        await wait_for(lambda: good in daemon.entries(), what="the good version cached")
        await wait_for(lambda: not held_files(env), what="held/ emptied by the good version")
        assert not parts_in_tmp(env)
        assert await metric_async(daemon, CACHE_BYTES) == size
    assert daemon.exit_code == 0


async def test_a_held_download_expires_without_another_event(
        env: Env, base_policy: None, tmp_path: Path) -> None:
    env.write_config(cache={"stale_sidecar_hold": 1})
    image = make_qcow2(tmp_path / "v1.qcow2")
    async with running_daemon(env.config_path) as daemon:
        await upload_refused(env, daemon, image)
        # No event follows: the daemon's own sweep drops it.
        await wait_for(lambda: not held_files(env), timeout=30, what="the held download expired")
        assert await metric_async(daemon, CACHE_BYTES) == 0
        assert not parts_in_tmp(env) and daemon.entries() == []


async def test_held_bytes_push_out_an_old_version_but_never_a_current_one(
        env: Env, base_policy: None, tmp_path: Path) -> None:
    v1, v2, v3 = (make_qcow2(tmp_path / f"v{i}.qcow2", seed=i) for i in (1, 2, 3))
    size = v1.stat().st_size
    env.write_config(cache={"max_size": int(size * 2.5)})
    async with running_daemon(env.config_path) as daemon:
        old = env.upload_with_sidecar(KEY, v1)
        await publish(env.exchange, minio_event(env.bucket, KEY))
        await wait_for(lambda: old in daemon.entries(), what="v1 cached")
        current = env.upload_with_sidecar(KEY, v2)
        await publish(env.exchange, minio_event(env.bucket, KEY))
        await wait_for(lambda: current in daemon.entries(), what="v2 cached")
        assert set(daemon.entries()) == {old, current}  # 2 images fit in 2.5

        # A third image's worth, held: the old version (no longer current) goes for it.
        await upload_refused(env, daemon, v3)
        await wait_for(lambda: old not in daemon.entries(), what="v1 evicted for the held bytes")
        assert daemon.entries() == [current] and held_files(env) == {"base.part", "base.json"}
        assert await metric_async(daemon, CACHE_BYTES) == 2 * size

    # Room for one image only: the held download goes, the current version stays.
    env.write_config(cache={"max_size": int(size * 1.5)})
    async with running_daemon(env.config_path) as daemon:
        await wait_for(lambda: daemon.daemon.reconciles >= 1, what="the start-up reconcile")
        # The start-up reconcile refused v3 again, and had no room to hold it.
        assert daemon.entries() == [current] and not held_files(env)
        v4 = make_qcow2(tmp_path / "v4.qcow2", seed=4)
        env.upload_file(KEY, v4)
        rejected = await metric_async(daemon, REJECTED, reason="checksum_mismatch")
        env.upload(KEY + ".sha256", WRONG)
        await publish(env.exchange, minio_event(env.bucket, KEY))
        await metric_grows(daemon, REJECTED, rejected, 1, reason="checksum_mismatch")
        await wait_for(lambda: not held_files(env) and not parts_in_tmp(env),
                       what="the held download dropped for max_size")
        assert daemon.entries() == [current]
        assert await metric_async(daemon, CACHE_BYTES) == size
        assert cache_dir_bytes(env) < size * 1.5


def test_prune_and_start_up_remove_what_a_crashed_daemon_held(
        env: Env, base_policy: None, tmp_path: Path) -> None:
    image = make_qcow2(tmp_path / "v1.qcow2")
    env.upload_file(KEY, image)
    env.upload(KEY + ".sha256", WRONG)
    proc = DaemonProcess(env.config_path).start()  # its start-up reconcile refuses it
    try:
        proc.wait(lambda: held_files(env) == {"base.part", "base.json"}, 60, "held download")
        # A running daemon's held download is spared (it is locked: in use).
        prune = cli(env, "cache", "prune")
        assert prune.returncode == 0, prune.stderr
        assert "held download of base" in prune.stdout and "kept" in prune.stdout
        assert held_files(env) == {"base.part", "base.json"}
        proc.kill()
        # The crash left it: still listed, now removed by prune.
        [row] = json.loads(cli(env, "cache", "list", "--json").stdout)
        assert (row["state"], row["digest"]) == ("held", sha256_file(image))
        prune = cli(env, "cache", "prune")
        assert prune.returncode == 0 and "held download of base" in prune.stdout
        assert "removed" in prune.stdout and not held_files(env)
        assert json.loads(cli(env, "cache", "list", "--json").stdout) == []

        # Held again, crashed again: the next start-up removes it (then holds anew).
        proc.start()
        proc.wait(lambda: held_files(env) == {"base.part", "base.json"}, 60, "held again")
        proc.kill()
        proc.start()
        proc.wait(lambda: logged_since_start(proc, "start-up cleanup"), 60, "start-up cleanup")
        [cleanup] = logged_since_start(proc, "start-up cleanup")
        assert cleanup["removed"] == 2  # the held data and its record
        proc.wait(lambda: logged_since_start(proc, HELD_EVENT)
                  and held_files(env) == {"base.part", "base.json"}, 60, "held anew")
    finally:
        proc.stop(30)
    assert not held_files(env)  # a stop removes it
