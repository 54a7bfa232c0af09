"""The HTTP job API end to end: the daemon process, real S3, libvirtd, QEMU and HTTP.

A client written for the predecessor posts a job, polls it until it completes, and boots
a VM on the volume: the VM must print the image's banner. Around that: the aliases, the
refusals (a foreign image host, bad fields, a volume in use, a checksum mismatch), the
cache routes, cancel mid-write, a kill -9 in the middle of a job, and upload-content.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.bootimage import domain_xml, write_qcow2_image
from tests.integration.harness import Env
from tests.integration.test_reprovision import (
    hook_installed,  # noqa: F401 - fixture
    virsh_sync,
    wait_for_banner,
)
from testsupport.api import api_daemon, ready
from testsupport.daemon import DaemonProcess
from testsupport.openapi import check_answer
from testsupport.services import delete_amqp, sha256_file

pytestmark = pytest.mark.libvirt
TOKEN = "api-test-token-" + "b" * 24
MiB = 1024 * 1024
GiB = 1024 * MiB
Reply = tuple[int, Any]


@dataclass
class ApiWorld:
    env: Env
    pool: str
    pool_dir: Path
    port: int
    daemon: DaemonProcess
    probe_port: int
    domains: list[str] = field(default_factory=list)

    def wait_ready(self) -> None:
        """Until ``/readyz`` says 200: libvirt connected, AMQP consuming, policies loaded."""
        self.daemon.wait(lambda: ready(self.probe_port), 60, "the daemon to be ready")

    def call(self, method: str, path: str, body: Any = None, *, token: str | None = TOKEN,
             headers: dict[str, str] | None = None, raw: bytes | None = None) -> Reply:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        sent = dict(headers or {})
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        if data is not None and raw is None:
            sent["Content-Type"] = "application/json"
        try:
            conn.request(method, path, body=data, headers=sent)
            response = conn.getresponse()
            payload = response.read()
        finally:
            conn.close()
        try:
            return response.status, json.loads(payload)
        except ValueError:
            return response.status, payload

    def log_records(self) -> list[dict[str, Any]]:
        assert self.daemon.log is not None
        records = []
        for line in self.daemon.log.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line[line.find("{"):])
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
        return records

    def url(self, key: str) -> str:
        return f"{self.env.s3['LVW_S3_ENDPOINT']}/{self.env.bucket}/{key}"

    def post_job(self, key: str, volume: str, size_gb: int = 1, *,
                 route: str = "/api/v1/jobs", **extra: Any) -> str:
        status, body = self.call("POST", route, {"image_url": self.url(key),
                                                 "volume_name": volume,
                                                 "volume_size_gb": size_gb, **extra})
        assert status == 202, body
        return str(body["job_id"])

    def job(self, job_id: str, route: str = "/api/v1/jobs/") -> dict[str, Any]:
        status, body = self.call("GET", route + job_id)
        assert status == 200, body
        return dict(body)

    def wait_job(self, job_id: str, timeout: float = 120, *,
                 until: tuple[str, ...] = ("completed", "failed"),
                 route: str = "/api/v1/jobs/") -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            body = self.job(job_id, route)
            if body["status"] in until:
                return body
            assert time.monotonic() < deadline, f"job {job_id} still {body}"
            time.sleep(0.1)

    def boot(self, name: str, volume_path: str) -> Path:
        log = self.env.root / f"{name}.log"
        log.unlink(missing_ok=True)
        xml = self.env.root / f"{name}.xml"
        xml.write_text(domain_xml(name, volume_path, log))
        if name not in self.domains:
            virsh_sync("define", str(xml))
            self.domains.append(name)
        virsh_sync("start", name)
        return log


@pytest.fixture
def api(services_env: dict[str, str], s3_bucket: str, unique_name: str,
        world_readable_tmp: Path, hook_installed: None) -> Iterator[ApiWorld]:  # noqa: F811
    env = Env(root=world_readable_tmp, bucket=s3_bucket,
              exchange=f"minio-events-{unique_name}", queue=f"lvw-test-{unique_name}",
              s3=services_env)
    try:
        with api_daemon(world_readable_tmp, f"lvw-{unique_name}", env.write_config,
                        token=TOKEN) as served:
            world = ApiWorld(env, served.pool, served.pool_dir, served.port, served.daemon,
                             served.probe_port)
            try:
                yield world
            finally:
                for name in world.domains:
                    virsh_sync("destroy", name, check=False)
                    virsh_sync("undefine", name, check=False)
    finally:
        asyncio.run(delete_amqp(env.exchange, env.queue))


def upload_image(api: ApiWorld, key: str, banner: str, size: int = 4 * MiB) -> Path:
    path = write_qcow2_image(api.env.root / f"{banner}.qcow2", banner, size)
    api.env.upload_with_sidecar(key, path)
    return path


def upload_big_image(api: ApiWorld, key: str, size: int) -> Path:
    """An incompressible qcow2 of ``size`` bytes, so writing it takes a while."""
    raw = api.env.root / "big.raw"
    with open(raw, "wb") as fh:
        for _ in range(size // (8 * MiB)):
            fh.write(os.urandom(8 * MiB))
    image = api.env.root / "big.qcow2"
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw),
                    str(image)], check=True)
    raw.unlink()
    api.env.upload_with_sidecar(key, image)
    return image


def test_a_job_creates_the_volume_and_a_vm_boots_it_then_a_newer_image_replaces_it(
        api: ApiWorld, unique_name: str) -> None:
    upload_image(api, "images/v1.qcow2", "API-BANNER-ONE")
    upload_image(api, "images/v2.qcow2", "API-BANNER-TWO")
    volume = "web1"
    assert not (api.pool_dir / volume).exists()

    job_id = api.post_job("images/v1.qcow2", volume, correlation_id="tf-run-17")
    done = api.wait_job(job_id)
    assert done["status"] == "completed", done
    assert done["progress"]["stage"] == "finalizing" and done["progress"]["percent"] == 100
    assert done["correlation_id"] == "tf-run-17" and done["cache_hit"] is False
    assert done["volume_path"] == str(api.pool_dir / volume)
    assert os.stat(api.pool_dir / volume).st_size == 1 * GiB
    name = f"lvw-{unique_name}"
    asyncio.run(wait_for_banner(api.boot(name, done["volume_path"]), "API-BANNER-ONE"))
    virsh_sync("destroy", name)

    # The predecessor's routes: provision, then status.
    second = api.post_job("images/v2.qcow2", volume, route="/api/v1/provision")
    done = api.wait_job(second, route="/api/v1/status/")
    assert done["status"] == "completed", done
    asyncio.run(wait_for_banner(api.boot(name, done["volume_path"]), "API-BANNER-TWO"))
    lines = [entry for entry in api.log_records() if entry.get("job_id") == job_id]
    assert len(lines) >= 3, lines  # accepted, started, finished at least
    assert all(entry.get("correlation_id") == "tf-run-17" for entry in lines), lines


def test_a_volume_used_by_a_running_domain_is_left_untouched(
        api: ApiWorld, unique_name: str) -> None:
    upload_image(api, "images/v1.qcow2", "API-RUNNING-ONE")
    first = api.wait_job(api.post_job("images/v1.qcow2", "busy"))
    assert first["status"] == "completed", first
    name = f"lvw-{unique_name}"
    asyncio.run(wait_for_banner(api.boot(name, first["volume_path"]), "API-RUNNING-ONE"))
    before = sha256_file(Path(first["volume_path"]))

    upload_image(api, "images/v2.qcow2", "API-RUNNING-TWO")
    refused = api.wait_job(api.post_job("images/v2.qcow2", "busy"))
    assert refused["status"] == "failed"
    assert f"in use by domain {name} (running)" in refused["error"]
    assert "was not changed" in refused["error"]
    assert sha256_file(Path(first["volume_path"])) == before


def test_a_checksum_mismatch_fails_the_job_and_writes_nothing(api: ApiWorld) -> None:
    path = write_qcow2_image(api.env.root / "bad.qcow2", "API-BAD")
    api.env.upload_file("images/bad.qcow2", path)
    api.env.upload("images/bad.qcow2.sha256", ("0" * 64 + "  bad.qcow2\n").encode())
    failed = api.wait_job(api.post_job("images/bad.qcow2", "never"))
    assert failed["status"] == "failed"
    assert "sidecar says" in failed["error"]
    assert not (api.pool_dir / "never").exists()

    # The refused download is held for a corrected sidecar: listed apart from the images.
    conn = http.client.HTTPConnection("127.0.0.1", api.port, timeout=30)
    try:
        conn.request("GET", "/api/v1/cache/images", headers={"Authorization": f"Bearer {TOKEN}"})
        answer = conn.getresponse()
        status, listed = answer.status, json.loads(answer.read())
    finally:
        conn.close()
    check_answer("GET", "/api/v1/cache/images", status, dict(answer.getheaders()), listed)
    assert status == 200 and listed["images"] == [] and listed["count"] == 0, listed
    [held] = listed["held"]
    assert held["checksum"] == sha256_file(path) and held["size"] == path.stat().st_size
    assert held["source"] == f"s3://{api.env.bucket}/images/bad.qcow2", held
    assert held["image"].startswith("api-") and held["expires_at"] > held["held_at"]


def test_bad_requests_are_refused_in_the_predecessors_error_shape(api: ApiWorld) -> None:
    for body in (
        {"image_url": "s3://b/x.qcow2", "volume_name": "../etc", "volume_size_gb": 1},
        {"image_url": "s3://bucket/x.qcow2", "volume_name": "v", "volume_size_gb": 0},
        {"image_url": "s3://bucket/x.qcow2", "volume_name": "v", "volume_size_gb": "1"},
        {"image_url": "s3://bucket/x.qcow2", "volume_name": "v", "volume_size_gb": 1,
         "image_type": "vmdk"},
        {"volume_name": "v", "volume_size_gb": 1},
        ["not", "an", "object"],
    ):
        status, reply = api.call("POST", "/api/v1/jobs", body)
        assert status == 400, (body, reply)
        assert reply == {"error": "invalid request", "message": reply["message"],
                         "code": 400}, reply
    status, reply = api.call("POST", "/api/v1/jobs", raw=b"{not json",
                             headers={"Content-Type": "application/json"})
    assert status == 400 and reply["error"] == "invalid request"
    status, reply = api.call("POST", "/api/v1/jobs", raw=b"x" * (2 * MiB))
    assert status == 413 and reply["code"] == 413, reply
    status, reply = api.call("GET", "/api/v1/jobs/00000000-0000-4000-8000-000000000000")
    assert status == 404 and reply["error"] == "job not found"
    assert api.call("GET", "/api/v1/jobs/../../etc/passwd")[0] == 404
    assert api.call("GET", "/api/v1/jobs/x", token=None)[0] == 401
    assert api.call("GET", "/api/v1/jobs/x", token="wrong")[0] == 401
    assert api.call("GET", "/api/v1/cache/images", token=None)[0] == 401
    assert api.call("PUT", "/volumes/upload-content", token="wrong", raw=b"x")[0] == 401
    assert api.daemon.running


def test_cache_routes_list_fetch_and_delete(api: ApiWorld) -> None:
    path = upload_image(api, "images/cached.qcow2", "API-CACHED")
    digest = sha256_file(path)
    status, reply = api.call("POST", "/api/v1/cache/fetch",
                             {"image_url": f"s3://{api.env.bucket}/images/cached.qcow2"})
    assert status == 202, reply
    fetched = api.wait_job(reply["job_id"])
    assert fetched["status"] == "completed" and fetched["image_path"], fetched

    status, listed = api.call("GET", "/api/v1/cache/images?offset=0&limit=10")
    assert status == 200 and listed["count"] == 1 and listed["limit"] == 10
    [entry] = listed["images"]
    assert entry["checksum"] == digest and entry["source"].endswith("images/cached.qcow2")
    assert entry["size"] == path.stat().st_size and Path(entry["path"]).exists()

    # A provision from the cached image is a cache hit.
    hit = api.wait_job(api.post_job("images/cached.qcow2", "fromcache"))
    assert hit["status"] == "completed" and hit["cache_hit"] is True, hit

    # While a policy's current image is this entry, it stays.
    api.env.write_policy({"pinned": {"bucket": api.env.bucket, "key": "images/cached.qcow2",
                                     "format": "qcow2"}})
    api.daemon.signal(signal.SIGHUP)
    api.daemon.wait(lambda: (api.env.cache_dir / "refs" / "pinned.json").exists(), 60,
                    "the policy image to be current")
    status, reply = api.call("DELETE", f"/api/v1/cache/images/{digest}")
    assert status == 409 and "pinned" in reply["message"], reply
    api.env.write_policy({})
    api.daemon.signal(signal.SIGHUP)
    deleted = api.daemon.wait(
        lambda: (reply := api.call("DELETE", f"/api/v1/cache/images/{digest}"))[0] != 409
        and reply, 60, "the policy to be gone")
    assert deleted == (200, {"status": "deleted", "key": digest})
    assert not Path(entry["path"]).exists()
    assert api.call("GET", "/api/v1/cache/images")[1]["count"] == 0
    assert api.call("DELETE", "/api/v1/cache/images/NOTHEX")[0] == 400
    assert api.call("DELETE", "/api/v1/cache/images/" + "0" * 64)[0] == 404


def test_cancel_stops_the_write_and_says_what_the_volume_holds(
        api: ApiWorld, unique_name: str) -> None:
    upload_big_image(api, "images/big.qcow2", 768 * MiB)
    job_id = api.post_job("images/big.qcow2", "cancelme")
    writing = api.wait_job(job_id, until=("completed", "failed", "running"))
    deadline = time.monotonic() + 120
    while writing["progress"]["stage"] != "converting" or writing["progress"]["percent"] <= 0:
        assert writing["status"] == "running", writing
        assert time.monotonic() < deadline, writing
        time.sleep(0.05)
        writing = api.job(job_id)
    # The start interlock holds while the job writes: a domain on the volume cannot start.
    name = f"lvw-{unique_name}"
    xml = api.env.root / f"{name}.xml"
    xml.write_text(domain_xml(name, str(api.pool_dir / "cancelme"), api.env.root / "c.log"))
    virsh_sync("define", str(xml))
    api.domains.append(name)
    refused = virsh_sync("start", name, check=False)
    assert refused.returncode != 0 and f"for job {job_id}" in refused.stderr, refused.stderr
    status, reply = api.call("POST", f"/api/v1/jobs/{job_id}/cancel")
    assert (status, reply) == (200, {"status": "cancelled", "job_id": job_id})
    ended = api.wait_job(job_id, 30)
    assert (ended["status"], ended["error"], ended["cancelled"]) == ("failed", "cancelled",
                                                                     True), ended
    assert "partial image" in ended["message"]
    assert api.daemon.wait(lambda: not _qemu_img_running(), 10, "qemu-img to be gone")
    status, reply = api.call("DELETE", f"/api/v1/cancel/{job_id}")
    assert status == 400, reply


def _qemu_img_running() -> bool:
    out = subprocess.run(["pgrep", "-f", "qemu-img convert"], capture_output=True)
    return out.returncode == 0


def test_a_job_killed_mid_write_completes_under_the_same_id_after_a_restart(
        api: ApiWorld, unique_name: str) -> None:
    image = upload_big_image(api, "images/big.qcow2", 768 * MiB)
    job_id = api.post_job("images/big.qcow2", "resumed")
    deadline = time.monotonic() + 120
    while api.job(job_id)["progress"]["stage"] != "converting":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    api.daemon.kill()
    api.daemon.start()
    api.wait_ready()
    done = api.wait_job(job_id, 240)
    assert done["status"] == "completed", done
    compare = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(image),
                              done["volume_path"]], capture_output=True, text=True)
    assert compare.returncode == 0, compare.stdout + compare.stderr


def test_upload_content_creates_the_volume_and_refuses_one_in_use(
        api: ApiWorld, unique_name: str) -> None:
    seed = os.urandom(300 * 1024)
    status, reply = api.call("PUT", "/volumes/upload-content", raw=seed,
                             headers={"X-Volume-Name": "seed1", "X-Pool-Name": api.pool})
    assert (status, reply) == (200, {"status": "uploaded", "pool": api.pool,
                                     "volume": "seed1", "bytes": len(seed)}), reply
    assert (api.pool_dir / "seed1").read_bytes()[:len(seed)] == seed
    status, reply = api.call("PUT", "/volumes/upload-content", raw=seed,
                             headers={"X-Volume-Name": "seed1", "X-Pool-Name": "no-such-pool"})
    assert status == 404, reply
    status, reply = api.call("PUT", "/volumes/upload-content", raw=seed,
                             headers={"X-Volume-Name": "../x", "X-Pool-Name": api.pool})
    assert status == 400, reply

    upload_image(api, "images/v1.qcow2", "API-UPLOAD-BUSY")
    done = api.wait_job(api.post_job("images/v1.qcow2", "root1"))
    name = f"lvw-{unique_name}"
    asyncio.run(wait_for_banner(api.boot(name, done["volume_path"]), "API-UPLOAD-BUSY"))
    before = sha256_file(Path(done["volume_path"]))
    status, reply = api.call("PUT", "/volumes/upload-content", raw=seed,
                             headers={"X-Volume-Name": "root1", "X-Pool-Name": api.pool})
    assert status == 409 and "in use by domain" in reply["message"], reply
    assert sha256_file(Path(done["volume_path"])) == before
