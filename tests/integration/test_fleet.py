"""A fleet on one machine: twelve watcher processes, one bucket, one broker.

Every host is a real ``python -m watcher run`` with its own config, host name, cache and
durable queue, reaching RabbitMQ and S3 through its own ``testsupport.proxy.Proxy`` so that
one host's link can be cut and restored while the others keep theirs. The S3 proxies count each
host's GETs of an image and time its downloads. The hosts use libvirt's in-process test
driver: pre-warming needs no hypervisor, and the shared libvirtd stays out of it.

Also here: a quorum queue dead-letters a message whose consumer is killed each time it
handles it, after ``amqp.delivery_limit`` deliveries.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import pytest
import yaml
from minio import Minio

from testsupport.polling import wait_for
from testsupport.proxy import Download, Proxy, peak_concurrency
from testsupport.services import AMQP_URL, make_qcow2, minio_event, publish, sha256_file
from watcher.core.fleet import spread_delay

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
HOSTS = 12
SPREAD = 10.0
SHORT_INTERVAL = 5.0
"""The reconcile interval of the last host: it is stale 15 s after it stops."""


@dataclass
class Host:
    """One watcher process of the fleet and its two proxied links."""

    name: str
    root: Path
    amqp: Proxy
    s3: Proxy
    config: dict[str, Any]
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def queue(self) -> str:
        return f"libvirt-volume-watcher.{self.name}"

    @property
    def log_path(self) -> Path:
        return self.root / f"watcher-{self.starts}.log"

    def start(self) -> None:
        self.starts += 1
        (self.root / "config.yaml").write_text(yaml.safe_dump(self.config))
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "watcher", "run", "-c", str(self.root / "config.yaml"),
                 "--log-format", "json"],
                stdout=subprocess.DEVNULL, stderr=log, cwd=REPO,
                env={**os.environ, "PYTHONPATH": str(REPO)})

    async def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            await asyncio.to_thread(self.process.wait, 30)

    def cached(self, image: str) -> str | None:
        """The digest of ``image``'s current version in this host's cache."""
        ref = self.root / "cache" / "refs" / f"{image}.json"
        try:
            return str(json.loads(ref.read_text())["digest"])
        except (OSError, ValueError, KeyError):
            return None

    def rss_mib(self) -> float:
        assert self.process is not None
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


@dataclass
class Fleet:
    hosts: list[Host]
    bucket: str
    exchange: str
    s3_env: dict[str, str]
    root: Path
    objects: dict[str, int] = field(default_factory=dict)

    def minio(self) -> Minio:
        return Minio(self.s3_env["LVW_S3_ENDPOINT"].split("://", 1)[1],
                     self.s3_env["LVW_S3_ACCESS_KEY"], self.s3_env["LVW_S3_SECRET_KEY"],
                     secure=False, region="us-east-1")

    async def upload_image(self, key: str, seed: int) -> tuple[str, str]:
        """Upload an 8 MiB qcow2 and its sidecar; returns (digest, ETag of the image)."""
        path = await asyncio.to_thread(make_qcow2, self.root / f"{seed}.qcow2", "32M",
                                       fill_mib=8, seed=seed)
        digest = sha256_file(path)
        client = self.minio()
        result = await asyncio.to_thread(client.fput_object, self.bucket, key, str(path))
        sidecar = f"{digest}  {Path(key).name}\n".encode()
        await asyncio.to_thread(self._put, client, key + ".sha256", sidecar)
        size = path.stat().st_size
        for host in self.hosts:
            host.s3.watched[f"/{self.bucket}/{key}"] = size
        return digest, str(result.etag).strip('"')

    def _put(self, client: Minio, key: str, data: bytes) -> None:
        import io

        client.put_object(self.bucket, key, io.BytesIO(data), len(data))

    async def notify(self, key: str) -> None:
        await publish(self.exchange, minio_event(self.bucket, key))
        await publish(self.exchange, minio_event(self.bucket, key + ".sha256"))

    def gets(self, key: str) -> list[int]:
        return [h.s3.gets(f"/{self.bucket}/{key}") for h in self.hosts]

    def downloads(self, key: str) -> list[Download]:
        return [d for h in self.hosts for d in h.s3.downloads if d.path == f"/{self.bucket}/{key}"]

    async def fleet_status(self, *, as_json: bool = True) -> Any:
        config = self.root / "cli.yaml"
        config.write_text(yaml.safe_dump({
            "s3": {"endpoint": self.s3_env["LVW_S3_ENDPOINT"],
                   "access_key": self.s3_env["LVW_S3_ACCESS_KEY"],
                   "secret_key": self.s3_env["LVW_S3_SECRET_KEY"]},
            "fleet": {"status_bucket": self.bucket}}))
        argv = [sys.executable, "-m", "watcher", "fleet", "status", "-c", str(config)]
        result = await asyncio.to_thread(
            subprocess.run, [*argv, "--json"] if as_json else argv, capture_output=True,
            text=True, timeout=60, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout) if as_json else result.stdout


async def queue_consumers(queue: str) -> int:
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        try:
            declared = await channel.declare_queue(queue, passive=True)
        except aio_pika.exceptions.ChannelClosed:
            return 0
        return int(declared.declaration_result.consumer_count or 0)


async def delete_host_queues(queues: list[str], exchange: str) -> None:
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        for queue in queues:
            for name in (queue, f"{queue}.dead"):
                await channel.queue_delete(name, if_unused=False, if_empty=False)
            await channel.exchange_delete(f"{queue}.dlx")
        await channel.exchange_delete(exchange)


@asynccontextmanager
async def fleet_of(count: int, *, root: Path, bucket: str, exchange: str, uid: str,
                   s3_env: dict[str, str], policies: dict[str, Any]) -> AsyncIterator[Fleet]:
    s3_port = int(s3_env["LVW_S3_ENDPOINT"].rsplit(":", 1)[1])
    (root / "policies").mkdir(parents=True)
    (root / "policies" / "10-fleet.yaml").write_text(yaml.safe_dump(policies))
    hosts = []
    for index in range(1, count + 1):
        name = f"{uid}-hv-{index:02d}"
        amqp = Proxy(("127.0.0.1", 5672))
        s3 = Proxy(("127.0.0.1", s3_port), record_http=True)
        host_root = root / name
        host_root.mkdir()
        config = {
            "libvirt": {"uri": "test:///default"},
            "s3": {"endpoint": f"http://127.0.0.1:{s3.port}",
                   "access_key": s3_env["LVW_S3_ACCESS_KEY"],
                   "secret_key": s3_env["LVW_S3_SECRET_KEY"]},
            "amqp": {"url": f"amqp://guest:guest@127.0.0.1:{amqp.port}/",
                     "exchange": exchange},
            "cache": {"dir": str(host_root / "cache")},
            "policies": {"dir": str(root / "policies")},
            "http": {"listen": ""},
            "host": {"name": name},
            "fleet": {"status_bucket": bucket},
            "prewarm": {"spread": SPREAD},
            "reconcile_interval": SHORT_INTERVAL if index == count else 3600,
        }
        hosts.append(Host(name, host_root, amqp, s3, config))
    fleet = Fleet(hosts, bucket, exchange, s3_env, root)
    try:
        yield fleet
    finally:
        for host in hosts:
            with suppress(Exception):
                await host.stop(signal.SIGKILL)
            host.amqp.close()
            host.s3.close()
        await delete_host_queues([h.queue for h in hosts], exchange)


async def wait_consuming(host: Host) -> None:
    await wait_for(lambda: queue_consumers(host.queue), 60, 0.2, f"{host.name} consuming")


async def delete_queue(queue: str) -> None:
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(queue, if_unused=False, if_empty=False)


def allowed_peak(delays: list[float], window: float) -> int:
    """The most hosts whose spread delays fall within one ``window`` of seconds."""
    return max(sum(1 for d in delays if start <= d <= start + window) for start in delays)


async def test_a_fleet_of_twelve_hosts_handles_every_event_once(
        services_env: dict[str, str], s3_bucket: str, unique_name: str, tmp_path: Path) -> None:
    began = time.monotonic()
    bucket, exchange = s3_bucket, f"fleet-{unique_name}"
    keys = {name: f"images/{name}.qcow2" for name in ("base", "extra", "scoped", "late")}
    images: dict[str, Any] = {name: {"bucket": bucket, "key": key, "format": "qcow2"}
                              for name, key in keys.items()}
    images["scoped"]["hosts"] = ["*-hv-0[1-4]"]
    async with fleet_of(HOSTS, root=tmp_path, bucket=bucket, exchange=exchange, uid=unique_name,
                        s3_env=services_env, policies={"images": images}) as fleet:
        hosts = fleet.hosts
        for host in hosts:
            host.start()
        for host in hosts:
            await wait_consuming(host)
        started = time.monotonic() - began

        # One upload, one notification: every host caches it with exactly one download,
        # each after its own spread delay, so the downloads do not pile up.
        base_digest, base_etag = await fleet.upload_image(keys["base"], seed=1)
        published = time.monotonic()
        await fleet.notify(keys["base"])
        await wait_for(lambda: all(h.cached("base") == base_digest for h in hosts), timeout=60,
                       what="every host caching base")
        assert fleet.gets(keys["base"]) == [1] * HOSTS
        version = f"{bucket}/{keys['base']}@{base_etag}"
        delays = [spread_delay(h.name, version, SPREAD) for h in hosts]
        downloads = fleet.downloads(keys["base"])
        for host, delay in zip(hosts, delays, strict=True):
            [download] = host.s3.downloads
            assert download.started - published >= delay - 0.05, (host.name, delay)
        longest = max((d.ended or time.monotonic()) - d.started for d in downloads)
        peak = peak_concurrency(downloads)
        # Slack for each host's own latency (delivery, HEAD, sidecar) on a loaded machine.
        bound = allowed_peak(delays, longest + 3.0)
        first = min(d.started for d in downloads)
        last = max(d.started for d in downloads)
        assert peak <= bound < HOSTS, (peak, bound, delays)
        # Spread over the window as the delays are, not in one burst.
        assert last - first >= max(delays) - min(delays) - 1.0, (first, last, delays)

        # Cut one host off, then: an image only hosts 01-04 take, and one every host takes.
        cut = hosts[4]
        cut.amqp.down()
        cut.s3.down()
        scoped_digest, _ = await fleet.upload_image(keys["scoped"], seed=2)
        await fleet.notify(keys["scoped"])
        extra_digest, _ = await fleet.upload_image(keys["extra"], seed=3)
        await fleet.notify(keys["extra"])
        others = [h for h in hosts if h is not cut]
        await wait_for(lambda: all(h.cached("extra") == extra_digest for h in others),
                       timeout=60, what="the connected hosts caching extra")
        await wait_for(lambda: all(h.cached("scoped") == scoped_digest for h in hosts[:4]),
                       timeout=60, what="hosts 01-04 caching scoped")
        assert cut.cached("extra") is None
        cut.amqp.up()
        cut.s3.up()
        await wait_for(lambda: cut.cached("extra") == extra_digest, timeout=60,
                       what="the cut-off host catching up from its durable queue")
        assert fleet.gets(keys["extra"]) == [1] * HOSTS
        # Every host triaged the scoped event before the extra one it has handled.
        assert fleet.gets(keys["scoped"]) == [1] * 4 + [0] * (HOSTS - 4)

        # fleet status: every host, every image it holds, nobody stale. A host writes its
        # status object a moment after it caches (at most once a second): poll for it.
        def expected_of(index: int) -> dict[str, str]:
            expected = {"base": base_digest, "extra": extra_digest}
            if index < 4:
                expected["scoped"] = scoped_digest
            return expected

        seen: list[dict[str, Any]] = [{}]

        async def status_complete() -> bool:
            seen[0] = status = await fleet.fleet_status()
            rows = {row["host"]: row for row in status["hosts"]}
            return sorted(rows) == [h.name for h in hosts] and all(
                (rows[h.name]["images"], rows[h.name]["stale"]) == (expected_of(i), False)
                for i, h in enumerate(hosts))

        await wait_for(status_complete, timeout=30, interval=0.5,
                       what=lambda: f"every host's status complete; last {seen[0]}")
        assert set(seen[0]["images"]) == {"base", "extra", "scoped"}
        rss = {h.name: round(h.rss_mib(), 1) for h in hosts}

        # A host down while its queue is deleted gets the next image through reconcile.
        last_host = hosts[-1]
        await last_host.stop()
        await delete_queue(last_host.queue)
        late_digest, _ = await fleet.upload_image(keys["late"], seed=4)
        await fleet.notify(keys["late"])
        await wait_for(lambda: all(h.cached("late") == late_digest for h in hosts[:-1]),
                       timeout=60, what="the running hosts caching late")
        assert last_host.cached("late") is None
        last_host.start()
        await wait_for(lambda: last_host.cached("late") == late_digest, timeout=60,
                       what="the restarted host caching late through reconcile")
        assert fleet.gets(keys["late"]) == [1] * HOSTS

        # Stopped for three of its reconcile intervals, a host is marked stale.
        await last_host.stop()

        async def last_is_stale() -> bool:
            rows = {r["host"]: r for r in (await fleet.fleet_status())["hosts"]}
            return bool(rows[last_host.name]["stale"])

        await wait_for(last_is_stale, 3 * SHORT_INTERVAL + 30, 0.2, "the stopped host to be stale")
        table = await fleet.fleet_status(as_json=False)
        lines = table.splitlines()
        assert len(lines) == HOSTS + 1
        assert [line.split()[1] for line in lines[1:]] == ["ok"] * (HOSTS - 1) + ["STALE"]
        # Stale is measured from the host's last status write, which came up to one interval
        # (plus its reconcile) before the stop: so the age, not the time since the stop, is
        # what must exceed three intervals.
        rows = {r["host"]: r for r in (await fleet.fleet_status())["hosts"]}
        assert rows[last_host.name]["age_seconds"] > 3 * SHORT_INTERVAL

    elapsed = time.monotonic() - began
    print(f"\nfleet: {HOSTS} hosts up in {started:.1f}s; base downloads: peak {peak} at once "
          f"(spread {SPREAD:.0f}s allows {bound}), longest {longest:.2f}s, starts over "
          f"{last - first:.1f}s; GETs per host: base {fleet.gets(keys['base'])}; "
          f"RSS MiB: {sorted(rss.values())}; total {elapsed:.0f}s\n{table}")
    assert max(rss.values()) < 300


async def test_a_quorum_queue_dead_letters_a_message_whose_consumer_keeps_crashing(
        services_env: dict[str, str], s3_bucket: str, unique_name: str, tmp_path: Path) -> None:
    limit = 2
    exchange = f"quorum-{unique_name}"
    key = "images/poison.qcow2"
    policies = {"images": {"poison": {"bucket": s3_bucket, "key": key, "format": "qcow2"}}}
    async with fleet_of(1, root=tmp_path, bucket=s3_bucket, exchange=exchange, uid=unique_name,
                        s3_env=services_env, policies=policies) as fleet:
        [host] = fleet.hosts
        _digest, etag = await fleet.upload_image(key, seed=5)
        # A host name whose spread delay is long: each delivery is killed while it waits.
        version = f"{s3_bucket}/{key}@{etag}"
        host.name = next(f"{unique_name}-q{i}" for i in range(1000)
                         if spread_delay(f"{unique_name}-q{i}", version, 3600) > 600)
        host.config["host"]["name"] = host.name
        host.config["prewarm"]["spread"] = 3600
        host.config["amqp"].update({"queue_type": "quorum", "delivery_limit": limit})

        async def counts_are(expected: tuple[int, int]) -> bool:
            """(ready in the queue, in the dead-letter queue) is ``expected``."""
            found = (await message_count(host.queue), await message_count(f"{host.queue}.dead"))
            return found == expected

        for delivery in range(1, limit + 2):
            host.start()
            await wait_consuming(host)
            if delivery == 1:
                await publish(exchange, minio_event(s3_bucket, key))
            # Delivered and unsettled: the warm waits out its spread; kill it meanwhile.
            await wait_for(lambda: counts_are((0, 0)), 30, 0.2, f"delivery {delivery}")
            # The broker hands the message over before the host has triaged it.
            await wait_for(lambda: "waiting before the download" in host.log_text(), 30, 0.2,
                           f"delivery {delivery} waiting out its spread")
            await host.stop(signal.SIGKILL)
            if delivery <= limit:
                await wait_for(lambda: counts_are((1, 0)), 30, 0.2,
                               "the message back in its queue")
        await wait_for(lambda: counts_are((0, 1)), 30, 0.2, "the message dead-lettered")
        assert await queue_type(host.queue) == "quorum"


async def message_count(queue: str) -> int:
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        return int(declared.declaration_result.message_count or 0)


async def queue_type(queue: str) -> str:
    """The queue's type, from the broker: re-declaring it as classic must be refused."""
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        try:
            await channel.declare_queue(queue, durable=True,
                                        arguments={"x-queue-type": "classic"})
        except aio_pika.exceptions.ChannelPreconditionFailed:
            return "quorum"
        return "classic"
