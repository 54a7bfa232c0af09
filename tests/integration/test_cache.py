"""The image cache against real S3 and qemu-img, and its command line.

The read-only commands (``status``, ``cache list``, ``cache verify``) run as processes
next to a real daemon whose download is held mid-way by a TCP proxy in front of S3, so
"while the daemon is downloading" is a state the test controls rather than a race.
Counters are read from the ``/metrics`` text (of the daemon, or of the registry when the
cache runs alone in the test).
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.harness import Env
from testsupport.daemon import running_daemon
from testsupport.metrics import metric_async, metric_grows, metric_now
from testsupport.polling import wait_for
from testsupport.proxy import Proxy, address_of
from testsupport.services import make_qcow2, minio_event, publish, ready_count, sha256_file
from watcher.adapters.s3 import S3Store
from watcher.cache import Cache
from watcher.cache import warmer as warmer_module
from watcher.config import load_config, load_policy_dir
from watcher.core.errors import ImageRejected
from watcher.core.policy import ImageSpec

pytestmark = pytest.mark.integration
CLI = [sys.executable, "-m", "watcher"]
ROOT = Path(__file__).resolve().parents[2]
CLI_ENV = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's code in the children
MiB = 1024 * 1024


async def open_cache(env: Env, **options: int) -> Cache:
    """A fresh cache, as the daemon builds it."""
    config = load_config(env.config_path)
    policies = load_policy_dir(config.policies.dir)
    cache = Cache(config.cache.dir, S3Store(config.s3), max_size=config.cache.max_size,
                  policies=lambda: policies, **options)
    await cache.load(create=True)
    return cache


DOWNLOADS = "volume_watcher_downloads_total"
REJECTED = "volume_watcher_images_rejected_total"


def downloads() -> float:
    """Downloads so far in this process (no daemon serves them in these tests)."""
    return metric_now(DOWNLOADS, result="ok")


async def test_the_same_bytes_under_two_keys_are_stored_once(env: Env, tmp_path: Path) -> None:
    image = make_qcow2(tmp_path / "same.qcow2")
    digest = env.upload_with_sidecar("a/one.qcow2", image)
    env.upload_with_sidecar("b/two.qcow2", image)
    cache = await open_cache(env)
    first = await cache.ensure(ImageSpec("one", env.bucket, "a/one.qcow2", None, "qcow2"))
    second = await cache.ensure(ImageSpec("two", env.bucket, "b/two.qcow2", None, "qcow2"))
    assert first.digest == second.digest == digest
    assert sorted(p.name for p in (env.cache_dir / "objects").iterdir()) == [
        f"{digest}.json", f"{digest}.qcow2"]
    keys = {s.key for s in cache.get(digest).sources}  # type: ignore[union-attr]
    assert keys == {"a/one.qcow2", "b/two.qcow2"}
    assert cache.current("one").digest == cache.current("two").digest  # type: ignore[union-attr]


async def test_concurrent_requests_for_one_image_share_one_download(
        env: Env, tmp_path: Path) -> None:
    env.upload_with_sidecar("img.qcow2", make_qcow2(tmp_path / "i.qcow2", size="64M",
                                                     fill_mib=32))
    cache = await open_cache(env)
    spec = ImageSpec("img", env.bucket, "img.qcow2", None, "qcow2")
    before = downloads()
    entries = await asyncio.gather(*(cache.ensure(spec) for _ in range(5)))
    assert len({e.digest for e in entries}) == 1
    assert downloads() - before == 1


async def test_an_optional_checksum_image_is_cached_under_its_computed_digest(
        env: Env, tmp_path: Path) -> None:
    image = make_qcow2(tmp_path / "nosidecar.qcow2")
    env.upload_file("plain.qcow2", image)
    cache = await open_cache(env)
    spec = ImageSpec("plain", env.bucket, "plain.qcow2", None, "qcow2", checksum_required=False)
    entry = await cache.ensure(spec)
    assert entry.digest == sha256_file(image)
    assert entry.checksum == "computed"
    before = downloads()
    again = await cache.ensure(spec)  # keyed to bucket/key/ETag: a hit
    assert again.digest == entry.digest and downloads() == before


async def test_a_prefix_image_is_the_newest_object_under_the_prefix(
        env: Env, tmp_path: Path) -> None:
    env.upload_with_sidecar("debian/12/2026-10.qcow2", make_qcow2(tmp_path / "a.qcow2", seed=1))
    time.sleep(1.1)  # S3 timestamps have one-second resolution
    newest = env.upload_with_sidecar("debian/12/2026-11.qcow2",
                                     make_qcow2(tmp_path / "b.qcow2", seed=2))
    cache = await open_cache(env)
    entry = await cache.ensure(ImageSpec("debian", env.bucket, None, "debian/12/", "qcow2"))
    assert entry.digest == newest and entry.key == "debian/12/2026-11.qcow2"


def cli(env: Env, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args, "--config", str(env.config_path)], capture_output=True,
                          text=True, timeout=120, env=CLI_ENV)


def tree(root: Path) -> dict[str, tuple[bool, int, int]]:
    """Every path under ``root`` (itself included): is it a directory, size, mtime."""
    found = {}
    for path in [root, *root.rglob("*")]:
        st = path.lstat()
        found[str(path.relative_to(root))] = (path.is_dir(), st.st_size, st.st_mtime_ns)
    return found


async def test_an_image_above_max_virtual_size_is_refused_and_not_cached(
        env: Env, tmp_path: Path) -> None:
    env.upload_with_sidecar("big.qcow2", make_qcow2(tmp_path / "big.qcow2", size="16M"))
    cache = await open_cache(env, max_virtual_size=8 * 1024**2)
    with pytest.raises(ImageRejected) as caught:
        await cache.ensure(ImageSpec("big", env.bucket, "big.qcow2", None, "qcow2"))
    assert caught.value.reason == "virtual_size"
    assert list((env.cache_dir / "objects").iterdir()) == []


async def test_rejected_versions_are_remembered_up_to_a_bound_the_oldest_forgotten_first(
        env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(warmer_module, "REJECTED_KEPT", 2)
    cache = await open_cache(env, max_virtual_size=8 * 1024**2)
    images = [ImageSpec(f"big{n}", env.bucket, f"big{n}.qcow2", None, "qcow2") for n in range(3)]
    for n in range(3):
        qcow2 = make_qcow2(tmp_path / f"big{n}.qcow2", size="16M", seed=n)
        env.upload_with_sidecar(f"big{n}.qcow2", qcow2)

    async def refused(image: ImageSpec) -> float:
        """Rejections counted while refusing ``image`` (0: refused from memory)."""
        before = metric_now(REJECTED, reason="virtual_size")
        with pytest.raises(ImageRejected):
            await cache.ensure(image)
        return metric_now(REJECTED, reason="virtual_size") - before

    assert [await refused(image) for image in images] == [1, 1, 1]
    assert await refused(images[2]) == 0  # remembered: not downloaded again
    assert await refused(images[0]) == 1  # forgotten: fetched and refused once more
    assert list((env.cache_dir / "objects").iterdir()) == []


def test_cache_commands_warm_list_verify_and_prune(env: Env, tmp_path: Path) -> None:
    env.write_policy({"keep": {"bucket": env.bucket, "key": "keep.qcow2", "format": "qcow2"},
                      "drop": {"bucket": env.bucket, "key": "drop.qcow2", "format": "qcow2"}})
    keep = env.upload_with_sidecar("keep.qcow2", make_qcow2(tmp_path / "k.qcow2", seed=1))
    old_drop = env.upload_with_sidecar("drop.qcow2", make_qcow2(tmp_path / "d1.qcow2", seed=2))
    assert cli(env, "cache", "warm", "keep").returncode == 0
    assert cli(env, "cache", "warm", "drop").returncode == 0
    new_drop = env.upload_with_sidecar("drop.qcow2", make_qcow2(tmp_path / "d2.qcow2", seed=3))
    warm = cli(env, "cache", "warm", "drop")
    assert warm.returncode == 0 and new_drop in warm.stdout

    listed = json.loads(cli(env, "cache", "list", "--json").stdout)
    assert {row["digest"]: row["pinned"] for row in listed} == {
        keep: True, old_drop: False, new_drop: True}

    unknown = cli(env, "cache", "warm", "nope")
    assert unknown.returncode == 1 and "nope" in unknown.stderr

    assert cli(env, "cache", "verify").returncode == 0
    victim = env.cache_dir / "objects" / f"{keep}.qcow2"
    with open(victim, "r+b") as fh:
        fh.seek(100)
        fh.write(b"corruption")
    before = tree(env.cache_dir)
    verify = cli(env, "cache", "verify")
    # Reported, not removed: verify is read-only, prune --corrupt is the remedy.
    assert verify.returncode == 1 and f"{keep}: content hashes to" in verify.stdout
    assert "prune --corrupt" in verify.stdout
    assert tree(env.cache_dir) == before

    prune = cli(env, "cache", "prune")
    assert prune.returncode == 0 and f"removed {old_drop}" in prune.stdout
    assert victim.exists()
    prune = cli(env, "cache", "prune", "--corrupt")
    assert prune.returncode == 0 and f"removed {keep}: content hashes to" in prune.stdout
    assert not victim.exists() and not victim.with_suffix(".json").exists()
    assert cli(env, "cache", "verify").returncode == 0
    remaining = {row["digest"] for row in json.loads(cli(env, "cache", "list", "--json").stdout)}
    assert remaining == {new_drop}


async def cli_async(env: Env, *args: str) -> subprocess.CompletedProcess[str]:
    """``cli`` without blocking the loop a daemon under test runs in."""
    proc = await asyncio.create_subprocess_exec(
        *CLI, *args, "--config", str(env.config_path), env=CLI_ENV,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return subprocess.CompletedProcess(args, proc.returncode, out.decode(), err.decode())


async def test_read_only_commands_spare_a_running_and_a_kept_aside_download(
        env: Env, tmp_path: Path, proxy_to: Callable[..., Proxy]) -> None:
    proxy = proxy_to(address_of(env.s3["LVW_S3_ENDPOINT"]))
    proxy.hold_response_after(f"GET /{env.bucket}/held.qcow2 ".encode(), MiB)
    env.write_config(s3={"endpoint": f"http://127.0.0.1:{proxy.port}"})
    env.write_policy({name: {"bucket": env.bucket, "key": f"{name}.qcow2", "format": "qcow2"}
                      for name in ("held", "stale")})
    stale = make_qcow2(tmp_path / "stale.qcow2", seed=1)
    held = make_qcow2(tmp_path / "held.qcow2", size="64M", fill_mib=16, seed=2)
    tmp, kept = env.cache_dir / "tmp", env.cache_dir / "held"

    async with running_daemon(env.config_path) as daemon:
        try:
            # A download whose sidecar is stale: kept aside until a newer sidecar matches.
            rejected = await metric_async(daemon, REJECTED, reason="checksum_mismatch")
            env.upload_file("stale.qcow2", stale)
            env.upload("stale.qcow2.sha256", b"0" * 64 + b"\n")
            await publish(env.exchange, minio_event(env.bucket, "stale.qcow2"))
            await metric_grows(daemon, REJECTED, rejected, 1, reason="checksum_mismatch")
            # A download in progress, held by the proxy after its first MiB.
            held_digest = env.upload_with_sidecar("held.qcow2", held)
            await publish(env.exchange, minio_event(env.bucket, "held.qcow2"))
            await wait_for(lambda: proxy.held.is_set() and len(list(tmp.glob("*.part"))) == 1
                           and (kept / "stale.part").exists() and (kept / "stale.json").exists(),
                           what="the running download's .part file and the kept-aside one")
            in_progress = tree(env.cache_dir)

            status = await cli_async(env, "status", "--json")
            listed = await cli_async(env, "cache", "list", "--json")
            verify = await cli_async(env, "cache", "verify")
            assert tree(env.cache_dir) == in_progress
            assert status.returncode == 0, status.stderr
            assert set(json.loads(status.stdout)) == {"domains", "cache"}
            assert listed.returncode == 0, listed.stderr
            assert [(row["image"], row["state"], row["digest"], row["size"])
                    for row in json.loads(listed.stdout)] == [
                ("stale", "held", sha256_file(stale), stale.stat().st_size)]
            assert json.loads(status.stdout)["cache"] == json.loads(listed.stdout)
            assert verify.returncode == 0, verify.stderr
            # Clean-up outside the daemon spares files whose owner holds their lock.
            prune = await cli_async(env, "cache", "prune")
            assert prune.returncode == 0, prune.stderr
            assert {p.name for p in tmp.iterdir()} == {
                Path(p).name for p in in_progress if p.startswith("tmp/")}
            assert {p.name for p in kept.iterdir()} == {"stale.part", "stale.json"}
            assert "held download of stale" in prune.stdout and "kept" in prune.stdout
        finally:
            proxy.release()
        await wait_for(lambda: held_digest in daemon.entries(), what="the held image cached")

        before = await metric_async(daemon, DOWNLOADS, result="ok")
        env.upload("stale.qcow2.sha256", f"{sha256_file(stale)}\n".encode())
        await publish(env.exchange, minio_event(env.bucket, "stale.qcow2.sha256"))
        await wait_for(lambda: sha256_file(stale) in daemon.entries(),
                       what="the kept-aside download cached")
        # the kept-aside file was used, not fetched again
        assert await metric_async(daemon, DOWNLOADS, result="ok") == before
        # Its record is rewritten (through tmp/) once the data is synced, just after.
        await wait_for(lambda: not list(tmp.iterdir()),
                       what=lambda: f"an empty tmp/; has {sorted(p.name for p in tmp.iterdir())}")
        assert not list(kept.iterdir())
    queue = load_config(env.config_path).amqp.queue_name()
    assert await ready_count(f"{queue}.dead") == 0


async def test_read_only_commands_change_nothing_in_a_cache_with_leftovers(
        env: Env, tmp_path: Path) -> None:
    env.write_policy({"img": {"bucket": env.bucket, "key": "img.qcow2", "format": "qcow2"}})
    digest = env.upload_with_sidecar("img.qcow2", make_qcow2(tmp_path / "img.qcow2"))
    await (await open_cache(env)).ensure(ImageSpec("img", env.bucket, "img.qcow2", None, "qcow2"))
    (env.cache_dir / "tmp" / "crashed.part").write_bytes(b"half a download")
    (env.cache_dir / "tmp" / "crashed.json").write_text("{")
    (env.cache_dir / "objects" / f"{'e' * 64}.qcow2").write_bytes(b"never committed")
    (env.cache_dir / "objects" / f"{'f' * 64}.json").write_text("{")  # logs a warning
    before = tree(env.cache_dir)

    listed = await cli_async(env, "cache", "list", "--json")
    status = await cli_async(env, "status", "--json")
    verify = await cli_async(env, "cache", "verify")
    assert tree(env.cache_dir) == before
    assert listed.returncode == 0, listed.stderr
    assert [row["digest"] for row in json.loads(listed.stdout)] == [digest]
    assert "unreadable cache file ignored" in listed.stderr  # logs go to stderr
    assert status.returncode == 0, status.stderr
    assert [row["digest"] for row in json.loads(status.stdout)["cache"]] == [digest]
    assert verify.returncode == 0 and f"{digest}: ok" in verify.stdout


async def test_read_only_commands_report_an_empty_cache_without_creating_it(env: Env) -> None:
    assert not env.cache_dir.exists()
    listed = await cli_async(env, "cache", "list", "--json")
    status = await cli_async(env, "status", "--json")
    verify = await cli_async(env, "cache", "verify")
    assert not env.cache_dir.exists()
    assert listed.returncode == 0 and json.loads(listed.stdout) == []
    assert status.returncode == 0 and json.loads(status.stdout)["cache"] == []
    assert verify.returncode == 0 and "0 entries verified" in verify.stdout


async def test_prune_and_start_up_remove_stale_leftovers_but_not_a_locked_download(
        env: Env) -> None:
    cache = await open_cache(env)
    stale = env.cache_dir / "tmp" / "crashed.part"
    stale.write_bytes(b"half a download")
    orphan = env.cache_dir / "objects" / f"{'e' * 64}.qcow2"
    orphan.write_bytes(b"never committed")
    live = env.cache_dir / "tmp" / "running.part"
    fd = os.open(live, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as the owner of a running download holds it
        prune = await cli_async(env, "cache", "prune")
        assert not stale.exists() and not orphan.exists() and live.exists()
        assert prune.returncode == 0 and "2 leftover files removed" in prune.stdout
        stale.write_bytes(b"another crash")
        assert await cache.recover() == 1  # the daemon's start-up, as another process would
        assert not stale.exists() and live.exists()
    finally:
        os.close(fd)
    assert await cache.recover() == 1
    assert list((env.cache_dir / "tmp").iterdir()) == []
