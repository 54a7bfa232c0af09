"""The daemon under steady load for a long time: nothing lost, nothing grows.

One real daemon process (real libvirtd, RabbitMQ and S3) runs for ``LVW_SOAK_MINUTES``
minutes while a publisher in its own process sends a steady stream of bucket
notifications (``LVW_SOAK_RATE`` per second, for objects no policy names, as a busy
bucket does) and, every ``LVW_SOAK_CYCLE`` seconds, one cycle of real work runs:

1. a new version of the policy's image is uploaded with its sidecar and announced; the
   cache must hold it (the seconds from notification to entry are kept);
2. two of the domains are tagged; both must end ``provisioned`` with that version;
3. an API job writes that version onto a pool volume (two names, reused in turn); it
   must end ``completed``;
4. every other cycle ``cache prune`` runs beside the daemon, and a SIGHUP reloads the
   policies (the reload counter must move).

Every 5 s a sampler reads the daemon's RSS, open fds and threads from ``/proc`` and its
``cache_bytes`` gauge, and the cache directory's bytes on disk. At the end: every
notification published was received and none was dead-lettered or left in the queue;
the last quarter's mean RSS and ``cache_bytes`` are at most 1.02x the second quarter's,
and its fds and threads at most one more than the second quarter's most (a worker pool
reaching its bound late is not growth; a leak adds one every cycle); the cache
directory never held more than
``cache.max_size`` plus one image. The figures go to ``LVW_SOAK_REPORT`` (JSON; default
``soak-report.json`` in the test's temp dir) and are printed.

Not part of the default run: it is skipped unless ``LVW_SOAK_MINUTES`` is set, e.g.
``LVW_SOAK_MINUTES=60 .venv/bin/pytest -m soak -s tests/soak``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.bootimage import domain_xml
from tests.integration.harness import Env
from tests.integration.test_reprovision import (
    hook_installed,  # noqa: F401 - fixture
    virsh_sync,
)
from testsupport.daemon import DaemonProcess
from testsupport.metrics import samples_sum
from testsupport.polling import wait_for_sync
from testsupport.services import (
    delete_amqp,
    free_port,
    make_qcow2,
    minio_event,
    publish,
    ready_count,
)
from watcher.core.domain import NAMESPACE, DomainState, parse_state

MINUTES = float(os.environ.get("LVW_SOAK_MINUTES", "0"))
RATE = float(os.environ.get("LVW_SOAK_RATE", "200"))
CYCLE = float(os.environ.get("LVW_SOAK_CYCLE", "120"))
pytestmark = [pytest.mark.soak, pytest.mark.libvirt,
              pytest.mark.skipif(MINUTES <= 0, reason="long mode: set LVW_SOAK_MINUTES")]

CLI = [sys.executable, "-m", "watcher"]
MiB = 1024 * 1024
DOMAINS = 4
IMAGE_KEY = "soak/base.qcow2"
IMAGE_FILL_MIB = 3
"""Pseudo-random MiB per version, so the cache's bytes and eviction are real."""
MAX_SIZE = 16 * MiB
TOKEN = "soak-token-0123456789abcdef"
SAMPLE_EVERY = 5.0
PUBLISH_CHUNK = 30.0
"""Seconds of notifications per publisher process."""
GROWTH_LIMIT = 1.02


@dataclass
class Sample:
    at: float
    rss_kib: int
    fds: int
    threads: int
    cache_bytes: float
    cache_dir_bytes: int


@dataclass
class Figures:
    """What the run measured; written as JSON and printed."""

    minutes: float
    rate: float
    cycle_seconds: float
    published: int = 0
    received: int = 0
    dead_lettered: int = 0
    left_in_queue: int = 0
    versions: int = 0
    warm_seconds: list[float] = field(default_factory=list)
    rebuilds: int = 0
    rebuilds_provisioned: int = 0
    rebuild_seconds: list[float] = field(default_factory=list)
    api_jobs: int = 0
    api_jobs_completed: int = 0
    prunes: int = 0
    reloads: int = 0
    samples: list[Sample] = field(default_factory=list)
    scrape_failures: list[str] = field(default_factory=list)

    def quarter(self, n: int) -> list[Sample]:
        """Samples of quarter ``n`` (1-4) of the run."""
        span = self.minutes * 60
        return [s for s in self.samples if (n - 1) * span / 4 <= s.at < n * span / 4
                or (n == 4 and s.at >= span)]

    def growth(self) -> dict[str, float]:
        second, last = self.quarter(2), self.quarter(4)
        assert second and last, f"too few samples: {len(self.samples)}"
        return {
            "rss": statistics.mean(s.rss_kib for s in last) / statistics.mean(
                s.rss_kib for s in second),
            "cache_bytes": statistics.mean(s.cache_bytes for s in last) / max(
                1.0, statistics.mean(s.cache_bytes for s in second)),
        }

    def new_handles(self) -> dict[str, int]:
        """fds and threads the last quarter had beyond the second quarter's most."""
        second, last = self.quarter(2), self.quarter(4)
        return {"fds": max(s.fds for s in last) - max(s.fds for s in second),
                "threads": max(s.threads for s in last) - max(s.threads for s in second)}

    def summary(self) -> dict[str, Any]:
        second, last = self.quarter(2), self.quarter(4)
        return {
            "minutes": self.minutes, "rate": self.rate, "cycle_seconds": self.cycle_seconds,
            "published": self.published, "received": self.received,
            "dead_lettered": self.dead_lettered, "left_in_queue": self.left_in_queue,
            "versions": self.versions,
            "warm_seconds_max": max(self.warm_seconds, default=0.0),
            "warm_seconds_median": statistics.median(self.warm_seconds or [0.0]),
            "rebuilds": self.rebuilds, "rebuilds_provisioned": self.rebuilds_provisioned,
            "rebuild_seconds_max": max(self.rebuild_seconds, default=0.0),
            "api_jobs": self.api_jobs, "api_jobs_completed": self.api_jobs_completed,
            "prunes": self.prunes, "reloads": self.reloads,
            "scrape_failures": len(self.scrape_failures),
            "rss_mib_q2": statistics.mean(s.rss_kib for s in second) / 1024 if second else 0,
            "rss_mib_q4": statistics.mean(s.rss_kib for s in last) / 1024 if last else 0,
            "fds_q2_q4": [max((s.fds for s in second), default=0),
                          max((s.fds for s in last), default=0)],
            "threads_q2_q4": [max((s.threads for s in second), default=0),
                              max((s.threads for s in last), default=0)],
            "cache_dir_mib_max": max((s.cache_dir_bytes for s in self.samples), default=0) / MiB,
            "growth": self.growth() if second and last else {},
            "new_handles": self.new_handles() if second and last else {},
        }


@dataclass
class Scene:
    env: Env
    pool: str
    probe_port: int
    api_port: int
    domains: list[str]
    daemon: DaemonProcess | None = None

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.probe_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            return str(response.read().decode())

    def metric(self, name: str, **labels: str) -> float:
        return samples_sum(self.metrics(), name, **labels)

    def api(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.api_port}{path}", method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"null")


def virsh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return virsh_sync(*args, check=check)


def state_of(name: str) -> DomainState | None:
    text = virsh("metadata", name, "--uri", NAMESPACE, "--config", check=False).stdout
    return parse_state(text) if text.strip() else None


def directory_bytes(path: Path) -> int:
    """Bytes the files under ``path`` take on disk (allocated, as ``du`` counts)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(FileNotFoundError):  # removed while walking
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total


def process_sample(pid: int) -> tuple[int, int, int]:
    """(VmRSS KiB, open fds, threads) of ``pid``."""
    rss = threads = 0
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key == "VmRSS":
                rss = int(value.split()[0])
            elif key == "Threads":
                threads = int(value)
    return rss, len(os.listdir(f"/proc/{pid}/fd")), threads


@pytest.fixture
def scene(services_env: dict[str, str], s3_bucket: str, unique_name: str,
          world_readable_tmp: Path, hook_installed: None,  # noqa: F811
          ) -> Iterator[Scene]:
    root = world_readable_tmp
    env = Env(root=root, bucket=s3_bucket, exchange=f"minio-events-{unique_name}",
              queue=f"lvw-soak-{unique_name}", s3=services_env)
    pool, pool_dir = f"lvw-soak-{unique_name}", root / "pool"
    pool_dir.mkdir(mode=0o755)
    disks = root / "disks"
    disks.mkdir(mode=0o755)
    tokens = root / "tokens"
    tokens.write_text(TOKEN + "\n")
    tokens.chmod(0o600)
    scene = Scene(env, pool, free_port(), free_port(),
                  [f"lvw-soak-{unique_name}-{n}" for n in range(DOMAINS)])
    env.write_config(http={"listen": f"127.0.0.1:{scene.probe_port}"},
                     api={"listen": f"127.0.0.1:{scene.api_port}", "pool": pool,
                          "tokens_file": str(tokens)},
                     cache={"max_size": f"{MAX_SIZE // MiB}MiB"},
                     volumes={"allow": [str(disks.resolve()) + "/*"]})
    env.write_policy({"base": {"bucket": s3_bucket, "key": IMAGE_KEY, "format": "qcow2"}},
                     [{"match": f"lvw-soak-{unique_name}-*", "image": "base"}])
    virsh("pool-define-as", pool, "dir", "--target", str(pool_dir))
    virsh("pool-start", pool)
    try:
        for name in scene.domains:
            disk = disks / f"{name}.img"
            with open(disk, "wb") as fh:
                fh.truncate(16 * MiB)
            xml = root / f"{name}.xml"
            xml.write_text(domain_xml(name, str(disk), root / f"{name}.log"))
            virsh("define", str(xml))
        yield scene
    finally:
        if scene.daemon is not None and scene.daemon.running:
            scene.daemon.stop()
        for name in scene.domains:
            virsh("undefine", name, check=False)
        virsh("pool-destroy", pool, check=False)
        virsh("pool-undefine", pool, check=False)
        asyncio.run(delete_amqp(env.exchange, env.queue))


class Publisher(threading.Thread):
    """Notifications for objects no policy names, at a steady rate, in chunks of
    ``PUBLISH_CHUNK`` seconds, each chunk a ``bench.publisher`` process of its own."""

    def __init__(self, exchange: str, bucket: str, rate: float, until: float) -> None:
        super().__init__(daemon=True)
        self.exchange, self.bucket, self.rate, self.until = exchange, bucket, rate, until
        self.published = 0
        self.failures: list[str] = []

    def run(self) -> None:
        chunk = 0
        while time.monotonic() < self.until and not self.failures:
            count = int(self.rate * min(PUBLISH_CHUNK, max(1.0, self.until - time.monotonic())))
            done = subprocess.run(
                [sys.executable, "-m", "bench.publisher", self.exchange, self.bucket,
                 f"noise/{chunk:04d}-", str(count), str(self.rate)],
                capture_output=True, text=True, timeout=PUBLISH_CHUNK * 4)
            if done.returncode != 0:
                self.failures.append(done.stderr[-2000:])
                return
            self.published += count
            chunk += 1


class Sampler(threading.Thread):
    def __init__(self, scene: Scene, figures: Figures, started: float) -> None:
        super().__init__(daemon=True)
        self.scene, self.figures, self.started = scene, figures, started
        self.done = threading.Event()

    def run(self) -> None:
        assert self.scene.daemon is not None
        pid = self.scene.daemon.pid
        while not self.done.wait(SAMPLE_EVERY):
            rss, fds, threads = process_sample(pid)
            try:
                cache_bytes = self.scene.metric("volume_watcher_cache_bytes")
            except OSError as err:  # counted, and asserted on at the end
                self.figures.scrape_failures.append(str(err))
                continue
            self.figures.samples.append(Sample(
                time.monotonic() - self.started, rss, fds, threads, cache_bytes,
                directory_bytes(self.scene.env.cache_dir)))


def new_version(scene: Scene, cycle: int, figures: Figures) -> str:
    """Upload, announce and wait for version ``cycle`` of the image; its digest."""
    image = make_qcow2(scene.env.root / f"v{cycle}.qcow2", "8M", fill_mib=IMAGE_FILL_MIB,
                       seed=cycle)
    digest = scene.env.upload_with_sidecar(IMAGE_KEY, image)
    image.unlink()
    announced = time.monotonic()
    asyncio.run(publish(scene.env.exchange, minio_event(scene.env.bucket, IMAGE_KEY)))
    figures.published += 1
    entry = scene.env.cache_dir / "objects" / f"{digest}.json"
    assert scene.daemon is not None
    scene.daemon.wait(entry.exists, 120, f"version {cycle} to be cached")
    figures.warm_seconds.append(time.monotonic() - announced)
    figures.versions += 1
    return digest


def rebuild(scene: Scene, names: list[str], digest: str, figures: Figures) -> None:
    """Tag ``names`` and wait until each is provisioned with ``digest``."""
    tagged = time.monotonic()
    for name in names:
        virsh("metadata", name, "--uri", NAMESPACE, "--key", "vw", "--set", "<reprovision/>",
              "--config")
    figures.rebuilds += len(names)

    def provisioned() -> bool:
        states = {name: state_of(name) for name in names}
        failed = {n: s for n, s in states.items() if s is not None and s.kind == "failed"}
        assert not failed, f"rebuild failed: {failed}"
        return all(s is not None and s.kind == "provisioned" and s.sha256 == digest
                   for s in states.values())

    assert scene.daemon is not None
    scene.daemon.wait(provisioned, 180, f"{names} to be provisioned")
    figures.rebuild_seconds.append(time.monotonic() - tagged)
    figures.rebuilds_provisioned += len(names)


def api_job(scene: Scene, cycle: int, figures: Figures) -> None:
    endpoint = scene.env.s3["LVW_S3_ENDPOINT"]
    status, reply = scene.api("POST", "/api/v1/jobs", {
        "image_url": f"{endpoint}/{scene.env.bucket}/{IMAGE_KEY}",
        "volume_name": f"soak-{cycle % 2}", "volume_size_gb": 1, "image_type": "qcow2"})
    assert status == 202, reply
    figures.api_jobs += 1
    job_id = reply["job_id"]

    def ended() -> dict[str, Any] | None:
        code, body = scene.api("GET", f"/api/v1/status/{job_id}")
        assert code == 200, body
        return body if body["status"] in ("completed", "failed") else None

    assert scene.daemon is not None
    final = scene.daemon.wait(ended, 180, f"API job {job_id} to end")
    assert final["status"] == "completed", final
    figures.api_jobs_completed += 1


def prune_and_reload(scene: Scene, figures: Figures) -> None:
    pruned = subprocess.run([*CLI, "cache", "prune", "--config", str(scene.env.config_path)],
                            capture_output=True, text=True, timeout=120)
    assert pruned.returncode == 0, pruned.stderr
    figures.prunes += 1
    before = scene.metric("volume_watcher_policy_reloads_total", result="ok")
    assert scene.daemon is not None
    scene.daemon.signal(signal.SIGHUP)
    wait_for_sync(lambda: scene.metric("volume_watcher_policy_reloads_total", result="ok")
                  > before, timeout=30, what="the reload")
    figures.reloads += 1


def test_a_long_run_under_steady_load_loses_nothing_and_does_not_grow(
        scene: Scene, tmp_path: Path) -> None:
    figures = Figures(MINUTES, RATE, CYCLE)
    report = Path(os.environ.get("LVW_SOAK_REPORT", str(tmp_path / "soak-report.json")))
    scene.daemon = DaemonProcess(scene.env.config_path).start()
    scene.daemon.wait(lambda: scene.daemon is not None and scene.daemon.find(
        "connected to libvirt"), 60, "the daemon to connect to libvirt")
    received_before = scene.metric("volume_watcher_events_received_total", source="amqp")

    started = time.monotonic()
    until = started + MINUTES * 60
    publisher = Publisher(scene.env.exchange, scene.env.bucket, RATE, until)
    sampler = Sampler(scene, figures, started)
    publisher.start()
    sampler.start()
    try:
        cycle = 0
        while time.monotonic() < until:
            due = started + (cycle + 1) * CYCLE
            digest = new_version(scene, cycle, figures)
            pair = [scene.domains[(2 * cycle) % DOMAINS], scene.domains[(2 * cycle + 1) % DOMAINS]]
            rebuild(scene, pair, digest, figures)
            api_job(scene, cycle, figures)
            if cycle % 2 == 1:
                prune_and_reload(scene, figures)
            assert not publisher.failures, publisher.failures
            cycle += 1
            # Wait for the next cycle; the daemon is checked to be alive meanwhile.
            while time.monotonic() < min(due, until):
                assert scene.daemon.running, "the daemon exited"
                time.sleep(1)
        publisher.join(PUBLISH_CHUNK * 4)
        assert not publisher.is_alive() and not publisher.failures, publisher.failures
        figures.published += publisher.published

        def all_received() -> bool:
            received = scene.metric("volume_watcher_events_received_total", source="amqp")
            figures.received = int(received - received_before)
            return figures.received >= figures.published

        wait_for_sync(all_received, timeout=300, interval=1, what="every notification")
    finally:
        sampler.done.set()
        sampler.join(30)
        figures.dead_lettered = int(scene.metric("volume_watcher_events_dead_lettered_total"))
        figures.left_in_queue = asyncio.run(ready_count(scene.env.queue))
        report.write_text(json.dumps({"summary": figures.summary() if figures.samples else {},
                                      "figures": asdict(figures)}, indent=1))
        print("\nsoak figures:", json.dumps(figures.summary() if figures.samples else {},
                                            indent=1))

    assert figures.received == figures.published
    assert not figures.scrape_failures, figures.scrape_failures[:5]
    assert figures.dead_lettered == 0 and figures.left_in_queue == 0
    assert figures.rebuilds_provisioned == figures.rebuilds > 0
    assert figures.api_jobs_completed == figures.api_jobs > 0
    assert figures.versions == len(figures.warm_seconds) > 0
    largest = max(s.cache_dir_bytes for s in figures.samples)
    assert largest <= MAX_SIZE + IMAGE_FILL_MIB * MiB + MiB, largest  # one image in flight
    growth = figures.growth()
    assert all(value <= GROWTH_LIMIT for value in growth.values()), growth
    # A worker pool that reaches its bound once adds one thread; a leak adds one a cycle.
    assert all(value <= 1 for value in figures.new_handles().values()), figures.new_handles()
