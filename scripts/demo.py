"""The full cycle, for real, on local services: what ``scripts/demo.sh`` runs.

Upload image v1 -> pre-warmed; a domain on a libvirt volume is tagged, gets v1 and
boots (its console prints v1); upload v2 -> pre-warmed; tag + power off -> rewritten
-> boots, console prints v2. Every step is timed. The demo plays MinIO's part by
publishing the bucket notification itself, in MinIO's exact format, since no MinIO
server runs here; everything else is the real daemon talking to real services.

Every name (domain, pool, bucket, exchange, queue, directory, HTTP port) is this run's
own, so the demo can run beside tests, other demos and real workloads on the same
services. At the end, also after a failure or SIGTERM, it removes exactly what it
created, newest first, and stops only the daemon it started; services it found running
stay as they were.
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
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import aio_pika
import libvirt
import yaml
from minio import Minio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.bootimage import domain_xml, write_qcow2_image  # noqa: E402
from testsupport.daemon import DaemonProcess  # noqa: E402
from testsupport.polling import wait_for_sync  # noqa: E402

RUN = uuid.uuid4().hex[:8]
BASE = Path(os.environ.get("LVW_DEMO_DIR", "/var/tmp/libvirt-volume-watcher-demo"))
DEMO = BASE / RUN
KEPT_LOG = BASE.parent / f"{BASE.name}-{RUN}.log"  # the daemon's log, left after cleanup
NAME = f"lvw-demo-{RUN}"  # the domain and its pool
BUCKET = f"lvw-demo-{RUN}"
KEY = "demo/boot-image.qcow2"
EXCHANGE = f"lvw-demo-minio-events-{RUN}"
QUEUE = f"lvw-demo-watcher-{RUN}"
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
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
    try:
        return wait_for_sync(predicate, timeout, interval=0.2, what=what)
    except AssertionError as timed_out:
        raise SystemExit(f"demo: {timed_out}; see {KEPT_LOG}") from None


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


class Undo:
    """What this run created, each with the step that removes it; run newest first."""

    def __init__(self) -> None:
        self._steps: list[tuple[str, Callable[[], object]]] = []

    def push(self, what: str, step: Callable[[], object]) -> None:
        self._steps.append((what, step))

    def run(self) -> None:
        while self._steps:
            what, step = self._steps.pop()
            try:
                step()
            except Exception as exc:  # keep going: the rest is still ours to remove
                print(f"demo: could not remove {what}: {exc}", file=sys.stderr)


def remove_bucket() -> None:
    client = s3()
    for obj in client.list_objects(BUCKET, recursive=True):
        client.remove_object(BUCKET, obj.object_name)
    client.remove_bucket(BUCKET)


def remove_amqp() -> None:
    """The exchange and queues of this run's names, declared by its daemon."""
    async def drop() -> None:
        connection = await aio_pika.connect(AMQP_URL)
        async with connection:
            channel = await connection.channel()
            for queue in (QUEUE, f"{QUEUE}.dead"):
                await channel.queue_delete(queue)
            for exchange in (EXCHANGE, f"{QUEUE}.dlx"):
                await channel.exchange_delete(exchange)

    asyncio.run(drop())


def remove_domain(conn: libvirt.virConnect) -> None:
    dom = conn.lookupByName(NAME)
    if dom.isActive():  # started by the watcher for this run
        dom.destroy()
    dom.undefine()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


HTTP = f"127.0.0.1:{free_port()}"


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


def define_domain(conn: libvirt.virConnect, undo: Undo) -> None:
    pool_dir = DEMO / "pool"
    pool_dir.mkdir(mode=0o755)
    pool = conn.storagePoolDefineXML(
        f"<pool type='dir'><name>{NAME}</name><target><path>{pool_dir}</path></target></pool>")
    undo.push(f"libvirt pool {NAME}", pool.undefine)
    pool.create()
    undo.push(f"libvirt pool {NAME} (stop)", pool.destroy)
    volume = pool.createXML("<volume><name>root.img</name><capacity unit='MiB'>1</capacity>"
                            "<target><format type='raw'/></target></volume>")
    undo.push(f"volume {NAME}/root.img", volume.delete)
    conn.defineXML(domain_xml(NAME, f"{NAME}/root.img", DEMO / "console.log",
                              disk_type="volume"))
    undo.push(f"domain {NAME}", lambda: remove_domain(conn))


def cli(*args: str) -> None:
    subprocess.run([str(ROOT / ".venv" / "bin" / "libvirt-volume-watcher"), *args], check=True)


def _terminate(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through the cleanup


def main() -> int:
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # errors are raised anyway
    conn = libvirt.open(URI)
    undo = Undo()
    try:
        return run(conn, undo)
    finally:
        if os.environ.get("LVW_DEMO_KEEP"):
            print(f"LVW_DEMO_KEEP is set: domain and pool {NAME}, bucket {BUCKET}, exchange "
                  f"{EXCHANGE}, queue {QUEUE} and {DEMO} are kept")
        else:
            undo.run()
            with contextlib.suppress(OSError):
                BASE.rmdir()  # only when no other run uses it
            print("cleaned up what this run created"
                  + (f"; the daemon's log is kept in {KEPT_LOG}" if KEPT_LOG.exists() else ""))


def run(conn: libvirt.virConnect, undo: Undo) -> int:
    BASE.mkdir(mode=0o755, exist_ok=True)
    BASE.chmod(0o755)  # QEMU runs as libvirt-qemu and must reach the console log
    DEMO.mkdir(mode=0o755)
    undo.push(str(DEMO), lambda: shutil.rmtree(DEMO))
    config = write_config()
    s3().make_bucket(BUCKET)
    undo.push(f"bucket {BUCKET}", remove_bucket)

    done = step("starting the watcher daemon")
    # The daemon declares the exchange and the queues under this run's names.
    undo.push(f"exchange {EXCHANGE} and queues {QUEUE}*", remove_amqp)
    daemon = DaemonProcess(config, log=DEMO / "watcher.log",
                           command=[str(ROOT / ".venv" / "bin" / "libvirt-volume-watcher")])
    daemon.start()
    try:
        wait(lambda: _ready() or not daemon.running, 60, "the daemon to be ready")
        if not daemon.running:
            raise SystemExit(f"demo: the daemon exited with {daemon.stop()}; see {KEPT_LOG}")
        done(f"ready (pid {daemon.pid}), /readyz says 200")

        done = step("uploading image v1 and its .sha256 sidecar; MinIO-style notification")
        v1 = upload("v1")
        publish_notification(KEY)
        wait(lambda: cached(v1), 60, "v1 in the cache")
        done(f"pre-warmed and verified: sha256 {v1[:16]}...")

        done = step(f"defining domain {NAME} on an empty volume of libvirt pool {NAME}")
        define_domain(conn, undo)
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
                  "volume_watcher_cache_bytes ", "volume_watcher_written_bytes_total")
        for line in metrics.splitlines():
            if line.startswith(wanted):
                print("  " + line)
        print(f"\nThe full cycle took {time.monotonic() - _t0:.1f}s. Metrics: http://{HTTP}/metrics"
              f" (while the daemon runs), logs: {KEPT_LOG}")
        if os.environ.get("LVW_DEMO_KEEP"):
            print("LVW_DEMO_KEEP is set: the daemon keeps running; stop it with "
                  f"kill {daemon.pid}")
            return 0
    finally:
        if not os.environ.get("LVW_DEMO_KEEP"):
            try:
                daemon.stop()  # first: nothing may still be writing what is removed next
            finally:
                shutil.copy(DEMO / "watcher.log", KEPT_LOG)
    return 0


def _ready() -> bool:
    try:
        return bool(urllib.request.urlopen(f"http://{HTTP}/readyz", timeout=2).status == 200)
    except OSError:
        return False


if __name__ == "__main__":
    raise SystemExit(main())
