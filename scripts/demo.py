"""The full cycle, for real, on local services: what ``scripts/demo.sh`` runs.

Upload image v1 -> pre-warmed; a domain on a libvirt volume is tagged, gets v1 and
boots (its console prints v1); upload v2 -> pre-warmed; tag + power off -> rewritten
-> boots, console prints v2. Every step is timed. The demo plays MinIO's part by
publishing the bucket notification itself, in MinIO's exact format, since no MinIO
server runs here; everything else is the real daemon talking to real services.
Re-running is safe: it removes what an earlier run left before starting, and cleans
up at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aio_pika
import libvirt
import yaml
from minio import Minio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.bootimage import domain_xml, write_qcow2_image  # noqa: E402

DEMO = Path(os.environ.get("LVW_DEMO_DIR", "/var/tmp/libvirt-volume-watcher-demo"))
NAME = "lvw-demo"
BUCKET = "lvw-demo-images"
KEY = "demo/boot-image.qcow2"
EXCHANGE = "lvw-demo-minio-events"
QUEUE = "lvw-demo-watcher"
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
HTTP = "127.0.0.1:9797"
URI = "qemu:///system"
NS = "urn:libvirt-volume-watcher:1"

_t0 = time.monotonic()


def step(text: str) -> Callable[[str], None]:
    started = time.monotonic()
    print(f"[{time.monotonic() - _t0:6.1f}s] {text} ...", flush=True)

    def done(result: str = "done") -> None:
        print(f"         -> {result} ({time.monotonic() - started:.1f}s)", flush=True)

    return done


def wait(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise SystemExit(f"demo: timed out after {timeout:.0f}s waiting for {what}; "
                     f"see {DEMO / 'watcher.log'}")


def s3() -> Minio:
    return Minio(os.environ["LVW_S3_ENDPOINT"].split("://", 1)[1], os.environ["LVW_S3_ACCESS_KEY"],
                 os.environ["LVW_S3_SECRET_KEY"], secure=False, region="us-east-1")


def publish_notification(key: str) -> None:
    """What MinIO sends for a PUT, with the object key URL-encoded in the record."""
    body = json.dumps({"EventName": "s3:ObjectCreated:Put", "Key": f"{BUCKET}/{key}",
                       "Records": [{"eventName": "s3:ObjectCreated:Put", "s3": {
                           "bucket": {"name": BUCKET},
                           "object": {"key": urllib.parse.quote_plus(key)}}}]}).encode()

    async def send() -> None:
        connection = await aio_pika.connect(AMQP_URL)
        async with connection:
            channel = await connection.channel()
            exchange = await channel.declare_exchange(EXCHANGE, aio_pika.ExchangeType.FANOUT,
                                                      durable=True)
            await exchange.publish(aio_pika.Message(
                body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT), routing_key="")

    asyncio.run(send())


def upload(version: str) -> str:
    image = write_qcow2_image(DEMO / f"image-{version}.qcow2",
                              f"libvirt-volume-watcher demo image {version}")
    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    client = s3()
    client.fput_object(BUCKET, KEY, str(image))
    sidecar = f"{digest}  {Path(KEY).name}\n".encode()
    client.put_object(BUCKET, KEY + ".sha256", io.BytesIO(sidecar), len(sidecar))
    return digest


def cached(digest: str) -> bool:
    return (DEMO / "cache" / "objects" / f"{digest}.json").exists()


def metadata_state(conn: libvirt.virConnect) -> str:
    dom = conn.lookupByName(NAME)
    try:
        return str(dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, NS,
                                libvirt.VIR_DOMAIN_AFFECT_CONFIG))
    except libvirt.libvirtError:
        return ""


def console() -> str:
    try:
        return (DEMO / "console.log").read_text(errors="replace")
    except FileNotFoundError:
        return ""


def cleanup(conn: libvirt.virConnect) -> None:
    """Remove what this demo creates; safe when nothing exists."""
    steps: list[Callable[[], object]] = [
        lambda: conn.lookupByName(NAME).destroy(),
        lambda: conn.lookupByName(NAME).undefine(),
        lambda: [v.delete() for v in conn.storagePoolLookupByName(NAME).listAllVolumes()],
        lambda: conn.storagePoolLookupByName(NAME).destroy(),
        lambda: conn.storagePoolLookupByName(NAME).undefine(),
    ]
    for undo in steps:  # each independently: any of them may have nothing to undo
        with contextlib.suppress(libvirt.libvirtError):
            undo()
    client = s3()
    if client.bucket_exists(BUCKET):
        for obj in client.list_objects(BUCKET, recursive=True):
            client.remove_object(BUCKET, obj.object_name)
        client.remove_bucket(BUCKET)

    async def drop_amqp() -> None:
        connection = await aio_pika.connect(AMQP_URL)
        async with connection:
            channel = await connection.channel()
            for queue in (QUEUE, f"{QUEUE}.dead"):
                await channel.queue_delete(queue)
            for exchange in (EXCHANGE, f"{QUEUE}.dlx"):
                await channel.exchange_delete(exchange)

    asyncio.run(drop_amqp())
    shutil.rmtree(DEMO, ignore_errors=True)


def write_config() -> Path:
    (DEMO / "policies").mkdir(parents=True)
    config = {
        "libvirt": {"uri": URI},
        "s3": {"endpoint": os.environ["LVW_S3_ENDPOINT"]},  # keys come from the environment
        "amqp": {"url": AMQP_URL, "exchange": EXCHANGE, "queue": QUEUE},
        "cache": {"dir": str(DEMO / "cache"), "max_size": "1GiB"},
        "policies": {"dir": str(DEMO / "policies")},
        "http": {"listen": HTTP},
        "reconcile_interval": 300,
        "volumes": {"allow": [str(DEMO / "pool" / "*")]},
    }
    (DEMO / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    policy = {
        "images": {"demo": {"bucket": BUCKET, "key": KEY, "format": "qcow2"}},
        "domains": [{"match": NAME, "image": "demo", "start": True}],
    }
    (DEMO / "policies" / "demo.yaml").write_text(yaml.safe_dump(policy, sort_keys=False))
    return DEMO / "config.yaml"


def define_domain(conn: libvirt.virConnect) -> None:
    pool_dir = DEMO / "pool"
    pool_dir.mkdir(mode=0o755)
    pool = conn.storagePoolDefineXML(
        f"<pool type='dir'><name>{NAME}</name><target><path>{pool_dir}</path></target></pool>")
    pool.create()
    pool.createXML("<volume><name>root.img</name><capacity unit='MiB'>1</capacity>"
                   "<target><format type='raw'/></target></volume>")
    conn.defineXML(domain_xml(NAME, f"{NAME}/root.img", DEMO / "console.log",
                              disk_type="volume"))


def cli(*args: str) -> None:
    subprocess.run([str(ROOT / ".venv" / "bin" / "libvirt-volume-watcher"), *args], check=True)


def main() -> int:
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # errors are raised anyway
    conn = libvirt.open(URI)
    cleanup(conn)
    DEMO.mkdir(parents=True, mode=0o755)
    DEMO.chmod(0o755)  # QEMU runs as libvirt-qemu and must reach the console log
    config = write_config()
    s3().make_bucket(BUCKET)

    done = step("starting the watcher daemon")
    log = open(DEMO / "watcher.log", "wb")  # noqa: SIM115 - lives as long as the daemon
    daemon = subprocess.Popen(
        [str(ROOT / ".venv" / "bin" / "libvirt-volume-watcher"), "run", "--config", str(config),
         "--log-format", "json"], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait(lambda: _ready(), 60, "the daemon to be ready")
        done(f"ready (pid {daemon.pid}), /readyz says 200")

        done = step("uploading image v1 and its .sha256 sidecar; MinIO-style notification")
        v1 = upload("v1")
        publish_notification(KEY)
        wait(lambda: cached(v1), 60, "v1 in the cache")
        done(f"pre-warmed and verified: sha256 {v1[:16]}...")

        done = step(f"defining domain {NAME} on an empty volume of libvirt pool {NAME}")
        define_domain(conn)
        done()

        done = step(f"tagging {NAME} for reprovisioning (it is shut off)")
        cli("reprovision", NAME, "--connect", URI)
        wait(lambda: "provisioned" in metadata_state(conn) and conn.lookupByName(NAME).isActive(),
             120, "v1 to be written and the domain started")
        done("written and started by the watcher")

        done = step("reading the VM's serial console")
        wait(lambda: "image v1" in console(), 60, "the v1 banner on the console")
        done(f"console says: {console().strip().splitlines()[-1]!r}")

        done = step("uploading image v2; MinIO-style notification")
        v2 = upload("v2")
        publish_notification(KEY)
        wait(lambda: cached(v2), 60, "v2 in the cache")
        done(f"pre-warmed and verified: sha256 {v2[:16]}...")

        done = step(f"tagging {NAME} while it runs (nothing happens until it stops)")
        cli("reprovision", NAME, "--connect", URI)
        time.sleep(1)
        assert conn.lookupByName(NAME).isActive(), "a running domain was touched"
        done("still running, request pending")

        done = step(f"powering {NAME} off")
        conn.lookupByName(NAME).destroy()
        wait(lambda: v2 in metadata_state(conn) and "provisioned" in metadata_state(conn)
             and conn.lookupByName(NAME).isActive(), 120, "v2 to be written and the domain started")
        done("rewritten with v2 and started again")

        done = step("reading the VM's serial console")
        wait(lambda: "image v2" in console(), 60, "the v2 banner on the console")
        done(f"console says: {console().strip().splitlines()[-1]!r}")

        print()
        cli("status", "--config", str(config))
        print()
        metrics = urllib.request.urlopen(f"http://{HTTP}/metrics", timeout=5).read().decode()
        wanted = ("volume_watcher_reprovisions_total", "volume_watcher_downloads_total",
                  "volume_watcher_cache_bytes ", "volume_watcher_bytes_written_total")
        for line in metrics.splitlines():
            if line.startswith(wanted):
                print("  " + line)
        print(f"\nThe full cycle took {time.monotonic() - _t0:.1f}s. Metrics: http://{HTTP}/metrics"
              f" (while the daemon runs), logs: {DEMO / 'watcher.log'}")
        if os.environ.get("LVW_DEMO_KEEP"):
            print("LVW_DEMO_KEEP is set: the daemon keeps running; stop it with "
                  f"kill {daemon.pid}")
            return 0
    finally:
        if not os.environ.get("LVW_DEMO_KEEP"):
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(60)
            except subprocess.TimeoutExpired:
                daemon.kill()
            log.close()
            cleanup_log = DEMO / "watcher.log"
            kept = Path("/var/tmp/libvirt-volume-watcher-demo.log")
            if cleanup_log.exists():
                shutil.copy(cleanup_log, kept)
            cleanup(conn)
            print(f"cleaned up; the daemon's log is kept in {kept}")
    return 0


def _ready() -> bool:
    try:
        return bool(urllib.request.urlopen(f"http://{HTTP}/readyz", timeout=2).status == 200)
    except OSError:
        return False


if __name__ == "__main__":
    raise SystemExit(main())
