"""Entries committed before their data is durable: synced before use, re-hashed after a crash.

A pre-warm commits its entry as soon as the bytes are verified, marked ``durable: false``,
and fsyncs it right after. A volume write must never start from bytes a crash may have
lost, so ``ensure`` (the job paths' call) returns only durable entries, and a daemon that
finds an entry still marked at start-up hashes it again before anything can use it. The
crash tests kill a real daemon process with SIGKILL right after the entry appears, drop the
page cache where allowed, and restart it; in one of them the data is corrupted on purpose
meanwhile, as a torn write would leave it. The killed daemon's background sync is turned
off, as if the crash came before it: otherwise the kill would race an fsync that takes
well under a second.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from tests.integration.harness import Env
from testsupport.daemon import DaemonProcess
from testsupport.services import make_qcow2, sha256_file
from watcher.adapters.s3 import S3Store
from watcher.cache import Cache
from watcher.config import load_config, load_policy_dir
from watcher.core.policy import ImageSpec

pytestmark = pytest.mark.integration
KEY = "images/base.qcow2"
# The daemon, with the background sync of unsynced entries turned off.
WITHOUT_BACKGROUND_SYNC = (sys.executable, "-c", (
    "from watcher.cache import Cache\n"
    "Cache._sync_in_background = lambda self, entry: None\n"
    "from watcher.cli import main\n"
    "raise SystemExit(main())"))


async def open_cache(env: Env) -> Cache:
    """The cache freshly read from disk, as a new process would build it."""
    config = load_config(env.config_path)
    policies = load_policy_dir(config.policies.dir)
    cache = Cache(config.cache.dir, S3Store(config.s3), max_size=config.cache.max_size,
                  policies=lambda: policies)
    await cache.load(create=True)
    return cache


def record(env: Env, digest: str) -> dict[str, object]:
    data = json.loads((env.cache_dir / "objects" / f"{digest}.json").read_text())
    assert isinstance(data, dict)
    return data


def spec(env: Env) -> ImageSpec:
    return ImageSpec("base", env.bucket, KEY, None, "qcow2")


def drop_caches() -> None:
    """Write back and drop the page cache, where this process may (root)."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3\n")
    except OSError:
        pass


async def test_a_pre_warm_commits_unsynced_and_ensure_returns_the_entry_durable(
        env: Env, tmp_path: Path) -> None:
    digest = env.upload_with_sidecar(KEY, make_qcow2(tmp_path / "i.qcow2"))
    cache = await open_cache(env)
    warmed = await cache.ensure(spec(env), durable=False)
    assert warmed.digest == digest and not warmed.durable  # committed before the fsync
    # The job paths' call: the same entry, fsynced and marked durable (now, or by the
    # background sync the pre-warm started).
    used = await cache.ensure(spec(env))
    assert used.digest == digest and used.durable
    assert record(env, digest)["durable"] is True
    await cache.close()


async def test_another_process_hashes_an_unsynced_entry_before_using_it(
        env: Env, tmp_path: Path) -> None:
    digest = env.upload_with_sidecar(KEY, make_qcow2(tmp_path / "i.qcow2"))
    first = await open_cache(env)
    entry = await first.ensure(spec(env), durable=False)
    await first.close()
    # What a crash of the machine before the background sync would leave: the record
    # still unsynced, and bytes the page cache never got to write.
    path = env.cache_dir / "objects" / f"{digest}.json"
    path.write_text(json.dumps({**record(env, digest), "durable": False}))
    with open(entry.path, "r+b") as fh:
        fh.seek(70_000)
        fh.write(b"torn")

    second = await open_cache(env)
    stale = second.get(digest)
    assert stale is not None and not stale.durable
    assert await second.durable(stale) is None  # hashed, found corrupt, removed
    assert second.get(digest) is None and not entry.path.exists()
    fetched = await second.ensure(spec(env))  # and fetched again
    assert fetched.durable and sha256_file(fetched.path) == digest


@pytest.mark.parametrize("corrupt", [False, True], ids=["intact", "corrupted"])
def test_an_entry_left_unsynced_by_a_crash_is_hashed_again_at_start_up(
        env: Env, tmp_path: Path, corrupt: bool) -> None:
    image = make_qcow2(tmp_path / "big.qcow2", size="256M", fill_mib=128)
    digest = env.upload_with_sidecar(KEY, image)
    env.write_policy({"base": {"bucket": env.bucket, "key": KEY, "format": "qcow2"}})
    data = env.cache_dir / "objects" / f"{digest}.qcow2"
    record_path = data.with_suffix(".json")
    crashing = DaemonProcess(env.config_path, log=tmp_path / "crashed.log",
                             command=WITHOUT_BACKGROUND_SYNC)
    crashing.start()  # the start-up reconcile pre-warms the image
    try:
        crashing.wait(record_path.exists, 120, "the cache entry")
        crashing.kill()
    finally:
        crashing.stop()
    daemon = DaemonProcess(env.config_path, log=tmp_path / "restarted.log")
    try:
        assert record(env, digest)["durable"] is False
        if corrupt:
            with open(data, "r+b") as fh:
                fh.seek(data.stat().st_size // 2)
                fh.write(b"\0" * 4096)
        drop_caches()

        daemon.start()
        daemon.wait(lambda: daemon.find("reconciled"), 120, "the restarted daemon")
        if corrupt:
            removed = daemon.find("corrupt cache entry removed")
            assert removed is not None and removed[1]["digest"] == digest
            # The reconcile fetched the image again; its new copy is the published bytes.
            daemon.wait(lambda: record_path.exists() and record(env, digest)["durable"],
                        120, "the fetched copy, synced")
        else:
            assert daemon.find("corrupt cache entry removed") is None
            verified = daemon.find("unsynced cache entry verified after a restart")
            assert verified is not None and verified[1]["digest"] == digest
            assert record(env, digest)["durable"] is True
        assert sha256_file(data) == digest
    finally:
        daemon.stop()
