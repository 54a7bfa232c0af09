"""The real services' test data: daemon configs, images, and bucket notifications.

What tests and benchmarks need to set a scene on the shared RabbitMQ and S3 server: a
config file for one run, a small qcow2, a notification exactly as MinIO publishes it,
and the queue and exchange housekeeping each run does under its own names.
"""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import urllib.parse
from pathlib import Path
from typing import Any

import aio_pika
import yaml

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"


def write_daemon_config(
    path: Path, *, s3_endpoint: str, s3_access_key: str, s3_secret_key: str, exchange: str,
    queue: str, cache_dir: Path, max_size: str, policies_dir: Path, overrides: dict[str, Any],
) -> Path:
    """The daemon's config for one test or benchmark; ``overrides`` replace or extend sections."""
    config: dict[str, Any] = {
        "libvirt": {"uri": "qemu:///system"},
        "s3": {"endpoint": s3_endpoint, "access_key": s3_access_key,
               "secret_key": s3_secret_key, "region": "us-east-1"},
        "amqp": {"url": AMQP_URL, "exchange": exchange, "exchange_type": "fanout",
                 "routing_key": "", "queue": queue},
        "cache": {"dir": str(cache_dir), "max_size": max_size},
        "policies": {"dir": str(policies_dir)},
        # Durable state beside the cache, never the host's /var/lib/libvirt-volume-watcher.
        "state": {"dir": str(cache_dir.parent / "state")},
        "http": {"listen": "127.0.0.1:0"},
        "reconcile_interval": 3600,
    }
    for section, values in overrides.items():
        if isinstance(values, dict):
            config.setdefault(section, {}).update(values)
        else:
            config[section] = values
    policies_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def minio_event(bucket: str, key: str, *, size: int = 0, etag: str = "",
                event: str = "s3:ObjectCreated:Put") -> bytes:
    """A notification body exactly as MinIO publishes it (keys URL-encoded in Records)."""
    return json.dumps({
        "EventName": event,
        "Key": f"{bucket}/{key}",
        "Records": [{
            "eventVersion": "2.0", "eventSource": "minio:s3", "awsRegion": "",
            "eventTime": "2026-11-25T08:00:00.000Z", "eventName": event,
            "userIdentity": {"principalId": "minioadmin"},
            "s3": {"s3SchemaVersion": "1.0", "configurationId": "Config",
                   "bucket": {"name": bucket, "arn": f"arn:aws:s3:::{bucket}"},
                   "object": {"key": urllib.parse.quote_plus(key), "size": size,
                              "eTag": etag, "sequencer": "1"}},
        }],
    }).encode()


async def publish(exchange: str, body: bytes, *, headers: dict[str, Any] | None = None) -> None:
    """Publish persistently, as MinIO does with a durable AMQP target."""
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        ex = await channel.declare_exchange(exchange, aio_pika.ExchangeType.FANOUT, durable=True)
        await ex.publish(aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                                          headers=headers or {}), routing_key="")


async def publish_many(exchange: str, bodies: list[bytes], *, url: str = AMQP_URL) -> None:
    """Publish persistently over one connection to an exchange that already exists."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        ex = await channel.get_exchange(exchange)
        for body in bodies:
            await ex.publish(aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                             routing_key="")


async def ready_count(queue: str, *, url: str = AMQP_URL) -> int:
    """Messages waiting in ``queue`` (not counting ones delivered but unacked)."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        count = declared.declaration_result.message_count
        assert count is not None
        return count


def make_qcow2(path: Path, size: str = "16M", *, fill_mib: int = 2, seed: int = 1,
               extra: list[str] | None = None) -> Path:
    """A small qcow2 with ``fill_mib`` MiB of pseudo-random data at its start."""
    raw = path.with_suffix(".raw")
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(raw), size], check=True)
    if fill_mib:
        block = hashlib.sha256(str(seed).encode()).digest() * (1 << 15)  # 1 MiB
        with open(raw, "r+b") as fh:
            for _ in range(fill_mib):
                fh.write(block)
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", *(extra or []),
                    str(raw), str(path)], check=True)
    raw.unlink()
    return path


async def delete_amqp(exchange: str, queue: str, *, url: str = AMQP_URL) -> None:
    """Remove a test's exchange and queue, and the dead-letter pair the consumer made."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        for name in (queue, f"{queue}.dead"):
            await channel.queue_delete(name, if_unused=False, if_empty=False)
        for name in (exchange, f"{queue}.dlx"):
            await channel.exchange_delete(name)


async def queue_messages(queue: str) -> list[bytes]:
    """Drain and return the bodies waiting in ``queue``."""
    connection = await aio_pika.connect(AMQP_URL)
    bodies = []
    async with connection:
        channel = await connection.channel()
        q = await channel.declare_queue(queue, passive=True)
        while (message := await q.get(fail=False, no_ack=True)) is not None:
            bodies.append(message.body)
    return bodies
