"""The image cache against real S3 and qemu-img, and its command line."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.harness import Env, make_qcow2, sha256_file
from watcher import telemetry
from watcher.adapters.s3 import S3Store
from watcher.cache import ImageCache
from watcher.config import load_config, load_policy_dir
from watcher.core.errors import ImageRejected
from watcher.core.policy import ImageSpec

pytestmark = pytest.mark.integration
CLI = [sys.executable, "-m", "watcher"]


def open_cache(env: Env) -> ImageCache:
    config = load_config(env.config_path)
    policies = load_policy_dir(config.policies.dir)
    cache = ImageCache(config.cache.dir, S3Store(config.s3), max_size=config.cache.max_size,
                       pinned=lambda: policies)
    cache.open()
    return cache


def downloads() -> float:
    return float(telemetry.downloads.labels(result="ok")._value.get())


async def test_the_same_bytes_under_two_keys_are_stored_once(env: Env, tmp_path: Path) -> None:
    image = make_qcow2(tmp_path / "same.qcow2")
    digest = env.upload_with_sidecar("a/one.qcow2", image)
    env.upload_with_sidecar("b/two.qcow2", image)
    cache = open_cache(env)
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
    cache = open_cache(env)
    spec = ImageSpec("img", env.bucket, "img.qcow2", None, "qcow2")
    before = downloads()
    entries = await asyncio.gather(*(cache.ensure(spec) for _ in range(5)))
    assert len({e.digest for e in entries}) == 1
    assert downloads() - before == 1


async def test_an_optional_checksum_image_is_cached_under_its_computed_digest(
        env: Env, tmp_path: Path) -> None:
    image = make_qcow2(tmp_path / "nosidecar.qcow2")
    env.upload_file("plain.qcow2", image)
    cache = open_cache(env)
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
    cache = open_cache(env)
    entry = await cache.ensure(ImageSpec("debian", env.bucket, None, "debian/12/", "qcow2"))
    assert entry.digest == newest and entry.key == "debian/12/2026-11.qcow2"


def cli(env: Env, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args, "--config", str(env.config_path)], capture_output=True,
                          text=True, timeout=120)


async def test_an_image_above_max_virtual_size_is_refused_and_not_cached(
        env: Env, tmp_path: Path) -> None:
    env.upload_with_sidecar("big.qcow2", make_qcow2(tmp_path / "big.qcow2", size="16M"))
    config = load_config(env.config_path)
    cache = ImageCache(config.cache.dir, S3Store(config.s3), max_size=config.cache.max_size,
                       max_virtual_size=8 * 1024**2)
    cache.open()
    with pytest.raises(ImageRejected) as caught:
        await cache.ensure(ImageSpec("big", env.bucket, "big.qcow2", None, "qcow2"))
    assert caught.value.reason == "virtual_size"
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
    verify = cli(env, "cache", "verify")
    assert verify.returncode == 1 and f"{keep}: content hashes to" in verify.stdout
    assert not victim.exists()

    prune = cli(env, "cache", "prune")
    assert prune.returncode == 0 and f"removed {old_drop}" in prune.stdout
    remaining = {row["digest"] for row in json.loads(cli(env, "cache", "list", "--json").stdout)}
    assert remaining == {new_drop}
