"""Pre-warming: how much a verified cache entry costs over a plain download.

The watcher hashes while downloading, fsyncs, inspects the header and asks ``qemu-img
info`` before an image may be used; this measures what that safety costs against the
plainest possible client, ``minio``'s ``fget_object`` of the same object from the same
server. The variants take turns in a shuffled order each round, each from a cold page cache:

- plain: ``Minio.fget_object`` into a file, and the same followed by an fsync;
- one thread: ``get_object`` streamed into a file in 1 MiB chunks, hashed in the same
  thread, then fsync: the straightforward verified download, and what ``S3Store.download``
  did before it handed writing, hashing and writeback to a second thread (``filesink``);
- unsynced download: ``S3Store.download(durable=False)``, what a pre-warm runs: the
  receiving thread writes, a second one hashes, nothing is flushed;
- cache: ``Cache.ensure`` on a fresh cache, as a job calls it (stat, sidecar,
  download + SHA-256 with writeback, fsync, inspection, atomic rename);
- daemon: the daemon (without libvirt) running; the clock starts when a MinIO-shaped
  notification is published and stops when the verified entry's record exists (polled
  every 20 ms: at most 20 ms late, under 1% of a 1 GiB pre-warm; polling every 5 ms, the
  bench's own wake-ups competed with the download's threads for the interpreter and slowed
  it). The entry appears unsynced (``durable: false``) and is fsynced right
  after. Every run uses a fresh cache. The download's own share is read from the daemon's
  ``download_duration_seconds`` histogram (its sum before and after the run).

Every variant of a round downloads the same object: a new key per round (a server-side
copy of the image, made before the round), so that the daemon, started while that key's
checksum sidecar is missing, has nothing to fetch until the sidecar is uploaded and the
notification published. The cache variant computes the digest instead of reading the
sidecar, which may not exist yet when it runs.

CPU seconds (user + system, of this process and its threads) are noted for the variants
that run nothing else in the process.

Inspection alone (``inspect_image_file`` on the cached file) is timed after each cache run.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import shutil
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import aio_pika
from minio.commonconfig import CopySource

from bench.common import (
    AMQP_URL,
    MIB,
    Options,
    Stopwatch,
    Table,
    drop_caches,
    median,
    spread,
    verdict,
)
from bench.world import World, world
from bench.writer import prepare_images
from testsupport.daemon import running_daemon
from testsupport.polling import wait_for
from testsupport.services import minio_event
from watcher import telemetry
from watcher.adapters.filesink import fsync_path
from watcher.adapters.qemu_img import inspect_image_file
from watcher.adapters.s3 import S3Store
from watcher.cache import Cache
from watcher.core.policy import ImageSpec

SOURCE_KEY = "images/source.qcow2"


def _one_thread(here: World, key: str, dest: Path) -> float:
    with Stopwatch() as sw:
        response = here.minio().get_object(here.bucket, key)
        digest = hashlib.sha256()
        try:
            with open(dest, "wb") as out:
                for chunk in response.stream(MIB):
                    out.write(chunk)
                    digest.update(chunk)
                out.flush()
                os.fsync(out.fileno())
        finally:
            response.close()
            response.release_conn()
    dest.unlink()
    return sw.seconds


def _unsynced(here: World, key: str, dest: Path) -> float:
    s3 = S3Store(here.s3_settings())
    with Stopwatch() as sw:
        s3.download(here.bucket, key, dest, durable=False)
    dest.unlink()
    return sw.seconds


def _plain(here: World, key: str, dest: Path, *, durable: bool = False) -> float:
    with Stopwatch() as sw:
        here.minio().fget_object(here.bucket, key, str(dest))
        if durable:
            fsync_path(dest)
    dest.unlink()
    return sw.seconds


async def _cache(here: World, key: str, cache_dir: Path) -> tuple[float, float]:
    cache = Cache(cache_dir, S3Store(here.s3_settings()), max_size=100 * 1024**3)
    await cache.load(create=True)
    spec = ImageSpec(name="bench", bucket=here.bucket, key=key, prefix=None,
                     format="qcow2", checksum_required=False)
    with Stopwatch() as sw:
        entry = await cache.ensure(spec)
    with Stopwatch() as inspection:
        await inspect_image_file(entry.path, "qcow2")
    shutil.rmtree(cache_dir)
    return sw.seconds, inspection.seconds


def _downloads_seconds() -> float:
    """The daemon's own ``download_duration_seconds`` histogram sum (this process)."""
    value = telemetry.REGISTRY.get_sample_value(
        "volume_watcher_download_duration_seconds_sum")
    return value or 0.0


async def _daemon(here: World, run: int, key: str, digest: str) -> tuple[float, float]:
    cache_dir = here.root / f"daemon-cache-{run}"
    here.write_policy({"bench": {"key": key}})
    here.write_config(cache_dir)
    async with running_daemon(here.config_path) as running:
        daemon = running.daemon
        await asyncio.sleep(1.0)  # the start-up reconcile waits for the sidecar and finishes
        await asyncio.to_thread(here.upload, key + ".sha256",
                                f"{digest}  {Path(key).name}\n".encode())
        drop_caches()
        body = minio_event(here.bucket, key)
        connection = await aio_pika.connect(AMQP_URL)
        async with connection:
            channel = await connection.channel()
            exchange = await channel.get_exchange(here.exchange)
            transfers_before = _downloads_seconds()
            started = time.perf_counter()
            await exchange.publish(aio_pika.Message(
                body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT), routing_key="")
        await wait_for(lambda: daemon.cache.get(digest) is not None, timeout=600, interval=0.02,
                       what="the cache entry")
        seconds = time.perf_counter() - started
        transfer = _downloads_seconds() - transfers_before
    shutil.rmtree(cache_dir, ignore_errors=True)  # the world's removal takes any rest
    return seconds, transfer


def _daemon_run(here: World, run: int, key: str, digest: str, daemon: list[float],
                transfers: list[float]) -> None:
    seconds, transfer = asyncio.run(_daemon(here, run, key, digest))
    daemon.append(seconds)
    transfers.append(transfer)


def _cache_run(here: World, key: str, cached: list[float], inspection: list[float]) -> None:
    seconds, inspecting = asyncio.run(_cache(here, key, here.root / "cache"))
    cached.append(seconds)
    inspection.append(inspecting)


def _timed(into: list[float], measure: Callable[..., float], *args: Any, **kwargs: Any) -> None:
    into.append(measure(*args, **kwargs))


def bench(options: Options) -> list[Table]:
    images = prepare_images(options, options.image_size)
    image = next(i for i in images if i.label.startswith("(c)")).qcow2
    size = image.stat().st_size
    plain: list[float] = []
    durable: list[float] = []
    one_thread: list[float] = []
    cached: list[float] = []
    inspection: list[float] = []
    daemon: list[float] = []
    unsynced: list[float] = []
    transfers: list[float] = []
    cpu: dict[str, list[float]] = {}
    with world(options.scratch, "prewarm") as here:
        print(f"  uploading {size / MIB:.0f} MiB", flush=True)
        digest = here.upload_with_sidecar(SOURCE_KEY, image)
        for run in range(options.runs):
            key = f"images/run-{run}.qcow2"  # this round's object, for every variant
            here.minio().copy_object(here.bucket, key, CopySource(here.bucket, SOURCE_KEY))
            variants: list[tuple[str, Callable[[], None]]] = [
                ("plain", partial(_timed, plain, _plain, here, key, here.root / "plain.qcow2")),
                ("plain+fsync", partial(_timed, durable, _plain, here, key,
                                        here.root / "plain.qcow2", durable=True)),
                ("one thread", partial(_timed, one_thread, _one_thread, here, key,
                                       here.root / "one.qcow2")),
                ("unsynced", partial(_timed, unsynced, _unsynced, here, key,
                                     here.root / "u.qcow2")),
                ("cache", partial(_cache_run, here, key, cached, inspection)),
                ("daemon", partial(_daemon_run, here, run, key, digest, daemon, transfers)),
            ]
            random.Random(run).shuffle(variants)
            for name, measure in variants:
                drop_caches()
                before = os.times()
                measure()
                after = os.times()
                cpu.setdefault(name, []).append(
                    after.user - before.user + after.system - before.system)
            print(f"  run {run + 1}: plain {plain[-1]:.2f} s, one thread {one_thread[-1]:.2f} s, "
                  f"unsynced {unsynced[-1]:.2f} s, cache {cached[-1]:.2f} s, "
                  f"daemon {daemon[-1]:.2f} s", flush=True)
    t_plain = median(plain)
    table = Table(
        f"Pre-warming a {size / MIB:.0f} MiB qcow2 (median of {options.runs}, min-max s)",
        ["variant", "seconds", "MB/s", "/ plain download", "/ plain, same round", "CPU s",
         "target", "verdict"])
    table.add("plain `fget_object`", f"{t_plain:.2f} [{spread(plain)}]",
              f"{size / t_plain / 1e6:.0f}", "1.00", "1.00", f"{median(cpu['plain']):.2f}",
              "", "")
    for name, key, times, target in (
        ("plain `fget_object` + fsync (durable, like the cache)", "plain+fsync", durable, None),
        ("one thread: `get_object`, SHA-256 and write in turn, fsync", "one thread",
         one_thread, None),
        ("`S3Store.download(durable=False)`: hashed, not flushed", "unsynced", unsynced, None),
        ("`Cache.ensure` (download, hash, fsync, inspect)", "cache", cached, None),
        ("daemon: publish -> verified entry (unsynced until just after)", "", daemon, 1.05),
        ("  of which its download (the daemon's `download_duration_seconds`)", "",
         transfers, None),
    ):
        t = median(times)
        paired = median([mine / theirs for mine, theirs in zip(times, plain, strict=True)])
        table.add(name, f"{t:.2f} [{spread(times)}]", f"{size / t / 1e6:.0f}",
                  f"{t / t_plain:.2f}", f"{paired:.2f}",
                  f"{median(cpu[key]):.2f}" if key else "",
                  f"<= {target}x plain" if target else "",
                  verdict(max(t / t_plain, paired) <= target) if target else "")
    t_inspect = median(inspection)
    table.add("inspection alone (header check + `qemu-img info`)",
              f"{t_inspect:.3f} [{spread(inspection)}]", "",
              f"{t_inspect / t_plain:.3f}", "", "", "", "")
    table.notes += [
        "page cache dropped before every variant, so S3 serves from disk each time; variants "
        "run in a shuffled order each round, all on the same object (a copy made for the "
        "round)",
        "daemon: in this process, `Daemon(config, with_libvirt=False).run(handle_signals=False)`"
        ", logging JSON at info level to a file",
        "/ plain, same round: the median of each round's ratio to that round's plain "
        "download, so a drift of the machine's speed between rounds cancels out; the verdict "
        "needs both ratios within the target",
        "CPU s: user + system time of this process (all threads) during the variant; the S3 "
        "server's own CPU is not counted",
    ]
    return [table]
