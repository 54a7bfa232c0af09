"""The predecessor's own clients, replayed unchanged against the real daemon.

Each test does what one of the predecessor's documents or clients does, with the words
and checks those clients use: its deploy script's ``curl -s $URL/health | grep -q
healthy``, an Ansible-style loop polling until ``completed`` or ``failed`` (through a
cancel), four jobs submitted at once, a volume reused for a rebuild, a job for an image
that is not there, ``curl -d`` without a JSON content type, an ``image_url`` naming the
object store by the orchestrator's own host name, and mTLS with only a client
certificate. Every answer read is checked against the daemon's OpenAPI document by a
schema validator (``testsupport.openapi``).
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.bootimage import write_qcow2_image
from tests.integration.harness import Env
from tests.integration.test_api_http import Pki, pki  # noqa: F401 - fixture
from tests.integration.test_api_jobs import (
    TOKEN,
    ApiWorld,
    MiB,
    api,  # noqa: F401 - fixture
    upload_big_image,
    upload_image,
)
from tests.integration.test_reprovision import (
    hook_installed,  # noqa: F401 - fixture
    virsh_sync,
    wait_for_banner,
)
from testsupport.api import api_daemon
from testsupport.metrics import scrape
from testsupport.openapi import check_answer
from testsupport.services import delete_amqp, sha256_file

pytestmark = pytest.mark.libvirt
ENDED = ("completed", "failed")
"""What the predecessor's polling loops wait for (its Ansible ``until:``, its client)."""


@dataclass
class Client:
    """An HTTP client as the predecessor's automation drives it; every answer it reads is
    checked against the OpenAPI document."""

    base_url: str
    headers: dict[str, str]
    verify: str | bool = True
    cert: tuple[str, str] | None = None

    def send(self, method: str, path: str, body: Any = None, **kw: Any) -> tuple[int, Any]:
        response = requests.request(method, self.base_url + path, json=body, timeout=30,
                                    headers=self.headers, verify=self.verify, cert=self.cert,
                                    **kw)
        reply = response.json() if response.headers.get("Content-Type") == (
            "application/json") else response.content
        check_answer(method, path, response.status_code, dict(response.headers), reply)
        return response.status_code, reply

    def submit(self, image_url: str, volume: str, size_gb: int = 1, **extra: Any) -> str:
        status, reply = self.send("POST", "/api/v1/jobs", {
            "image_url": image_url, "volume_name": volume, "volume_size_gb": size_gb,
            "image_type": "qcow2", **extra})
        assert status == 202, reply
        return str(reply["job_id"])

    def status(self, job_id: str) -> dict[str, Any]:
        status, reply = self.send("GET", f"/api/v1/status/{job_id}")
        assert status == 200, reply
        assert _no_nulls(reply), reply  # a strict decoder of its Go types takes no null
        return dict(reply)

    def poll(self, job_id: str, timeout: float = 180, *,
             seen: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """Until ``completed`` or ``failed``, as the predecessor's loops poll."""
        deadline = time.monotonic() + timeout
        while True:
            reply = self.status(job_id)
            if seen is not None:
                seen.append(reply)
            if reply["status"] in ENDED:
                return reply
            assert time.monotonic() < deadline, f"the loop would spin: {reply}"
            time.sleep(0.1)


def _no_nulls(value: Any) -> bool:
    if isinstance(value, dict):
        return all(item is not None and _no_nulls(item) for item in value.values())
    if isinstance(value, list):
        return all(_no_nulls(item) for item in value)
    return True


def client_of(world: ApiWorld) -> Client:
    return Client(f"http://127.0.0.1:{world.port}", {"Authorization": f"Bearer {TOKEN}"})


def test_the_deploy_scripts_health_grep_passes_on_both_listeners(api: ApiWorld) -> None:  # noqa: F811 - fixture
    for url in (f"http://127.0.0.1:{api.port}/health", f"http://127.0.0.1:{api.port}/livez",
                f"http://127.0.0.1:{api.probe_port}/healthz"):
        grep = subprocess.run(["sh", "-c", f"curl -s {url} | grep -q healthy"], timeout=30)
        assert grep.returncode == 0, url
    status, health = client_of(api).send("GET", "/health")
    assert status == 200 and health["status"] == "healthy", health


def test_a_poll_until_completed_or_failed_ends_through_a_cancel(api: ApiWorld) -> None:  # noqa: F811 - fixture
    client = client_of(api)
    upload_big_image(api, "images/big.qcow2", 512 * MiB)
    job_id = client.submit(api.url("images/big.qcow2"), "cancelled-vol")
    seen: list[dict[str, Any]] = []
    cancelled = threading.Event()

    def operator_aborts() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if seen and seen[-1]["progress"]["stage"] in ("downloading", "converting"):
                status, reply = client.send("DELETE", f"/api/v1/cancel/{job_id}")
                assert (status, reply) == (200, {"status": "cancelled", "job_id": job_id})
                cancelled.set()
                return
            time.sleep(0.02)

    aborter = threading.Thread(target=operator_aborts)
    aborter.start()
    try:
        ended = client.poll(job_id, seen=seen)
    finally:
        aborter.join()
    assert cancelled.is_set()
    assert (ended["status"], ended["error"], ended["cancelled"]) == ("failed", "cancelled", True)
    assert ended["message"], ended  # what the volume was left holding
    stages = [reply["progress"]["stage"] for reply in seen]
    assert set(stages) <= {"initializing", "checking_cache", "downloading", "creating_volume",
                           "converting", "finalizing"}, stages
    # Cancelling a job that has ended: 400, in the error shape.
    status, reply = client.send("POST", f"/api/v1/jobs/{job_id}/cancel")
    assert (status, reply["code"]) == (400, 400), reply
    status, reply = client.send("DELETE", f"/api/v1/cancel/{uuid.uuid4()}")
    assert (status, reply["error"]) == (404, "job not found"), reply


def test_four_jobs_submitted_at_once_all_complete_with_their_own_ids(api: ApiWorld) -> None:  # noqa: F811 - fixture
    client = client_of(api)
    path = upload_image(api, "images/four.qcow2", "API-FOUR")
    volumes = [f"four-{n}" for n in range(4)]
    ids: dict[str, str] = {}
    downloads = scrape(api.probe_port, "volume_watcher_downloads_total", result="ok")

    def submit(volume: str) -> None:
        ids[volume] = client.submit(api.url("images/four.qcow2"), volume,
                                    correlation_id=f"deploy/{volume}")

    threads = [threading.Thread(target=submit, args=(volume,)) for volume in volumes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(ids.values())) == 4, ids
    for volume, job_id in ids.items():
        done = client.poll(job_id)
        assert done["status"] == "completed", done
        assert (done["progress"]["stage"], done["progress"]["percent"]) == ("finalizing", 100)
        assert done["correlation_id"] == f"deploy/{volume}"
        compare = subprocess.run(["qemu-img", "compare", "-q", "-f", "qcow2", "-F", "raw",
                                  str(path), done["volume_path"]], timeout=120)
        assert compare.returncode == 0, volume
    # One download served them all.
    assert scrape(api.probe_port, "volume_watcher_downloads_total", result="ok") == downloads + 1


def test_a_volume_is_reused_for_a_rebuild_and_the_vm_boots_the_new_image(
        api: ApiWorld, unique_name: str) -> None:  # noqa: F811 - fixture
    client = client_of(api)
    upload_image(api, "images/old.qcow2", "API-REUSE-OLD")
    upload_image(api, "images/new.qcow2", "API-REUSE-NEW")
    first = client.poll(client.submit(api.url("images/old.qcow2"), "reused"))
    assert first["status"] == "completed", first
    name = f"lvw-{unique_name}"
    asyncio.run(wait_for_banner(api.boot(name, first["volume_path"]), "API-REUSE-OLD"))
    virsh_sync("destroy", name)  # the predecessor's step 5: shut the VM down, then the job
    second = client.poll(client.submit(api.url("images/new.qcow2"), "reused", 2))
    assert second["status"] == "completed", second
    assert second["volume_path"] == first["volume_path"]
    assert Path(second["volume_path"]).stat().st_size == 2 * 1024**3  # grown, not recreated
    asyncio.run(wait_for_banner(api.boot(name, second["volume_path"]), "API-REUSE-NEW"))


def test_a_job_for_a_missing_image_ends_failed_with_an_error(api: ApiWorld) -> None:  # noqa: F811 - fixture
    client = client_of(api)
    before = {"initializing", "checking_cache"}
    seen: list[dict[str, Any]] = []
    job_id = client.submit(api.url("images/not-uploaded.qcow2"), "missing")
    ended = client.poll(job_id, seen=seen)
    assert ended["status"] == "failed" and ended["error"], ended
    assert "cancelled" not in ended
    assert {reply["progress"]["stage"] for reply in seen} <= before, seen
    assert not (api.pool_dir / "missing").exists()


def test_curl_d_and_the_orchestrators_host_name_work_and_that_host_is_never_contacted(
        api: ApiWorld) -> None:  # noqa: F811 - fixture
    """``curl -d`` sends a form content type; the orchestrator names MinIO by its own
    host (here a listener that counts connections): the object still comes from the
    daemon's S3, and nothing connects to the named host."""
    connections: list[object] = []
    stranger = socket.socket()
    stranger.bind(("127.0.0.1", 0))
    stranger.listen()
    stranger.settimeout(0.2)
    stop = threading.Event()

    def count() -> None:
        with stranger:
            while not stop.is_set():
                try:
                    connections.append(stranger.accept())
                except TimeoutError:
                    continue

    counter = threading.Thread(target=count)
    counter.start()
    path = upload_image(api, "images/named.qcow2", "API-NAMED-HOST")
    named = f"http://127.0.0.1:{stranger.getsockname()[1]}/{api.env.bucket}/images/named.qcow2"
    try:
        body = json.dumps({"image_url": named, "volume_name": "named", "volume_size_gb": 1})
        out = subprocess.run(
            ["curl", "-s", "-w", "\n%{http_code}", "-X", "POST",
             f"http://127.0.0.1:{api.port}/api/v1/jobs",
             "-H", f"Authorization: Bearer {TOKEN}", "-d", body],
            capture_output=True, text=True, timeout=30, check=True)
        reply_text, _, code = out.stdout.rpartition("\n")
        assert code == "202", out.stdout
        job_id = json.loads(reply_text)["job_id"]
        client = client_of(api)
        done = client.poll(job_id)
        assert done["status"] == "completed", done
        fetched = client.poll(client.submit(named, "named-again"))
        assert fetched["status"] == "completed" and fetched["cache_hit"] is True, fetched
    finally:
        stop.set()
        counter.join()
    assert connections == []
    assert sha256_file(path) in done["image_path"]
    noted = [r for r in api.log_records() if r.get("named_host") is not None]
    assert len(noted) == 1, noted  # once per host, at info
    assert noted[0]["level"] == "info"


@pytest.fixture
def tls_world(services_env: dict[str, str], s3_bucket: str, unique_name: str,
              world_readable_tmp: Path, pki: Pki,  # noqa: F811
              hook_installed: None) -> Iterator[tuple[ApiWorld, Pki]]:  # noqa: F811
    env = Env(root=world_readable_tmp, bucket=s3_bucket,
              exchange=f"minio-events-{unique_name}", queue=f"lvw-test-{unique_name}",
              s3=services_env)
    tls = {"tls_cert": str(pki.server_cert), "tls_key": str(pki.server_key),
           "client_ca": str(pki.ca)}
    try:
        with api_daemon(world_readable_tmp, f"lvw-{unique_name}", env.write_config, token="",
                        tls=tls) as served:
            yield ApiWorld(env, served.pool, served.pool_dir, served.port, served.daemon,
                           served.probe_port), pki
    finally:
        asyncio.run(delete_amqp(env.exchange, env.queue))


def test_mtls_with_only_a_client_certificate_runs_a_job(
        tls_world: tuple[ApiWorld, Pki]) -> None:
    world, certs = tls_world
    base = f"https://127.0.0.1:{world.port}"
    client = Client(base, {}, verify=str(certs.ca),
                    cert=(str(certs.client_cert), str(certs.client_key)))
    path = write_qcow2_image(world.env.root / "tls.qcow2", "API-MTLS")
    world.env.upload_with_sidecar("images/tls.qcow2", path)
    done = client.poll(client.submit(f"s3://{world.env.bucket}/images/tls.qcow2", "tls-vol"))
    assert done["status"] == "completed", done
    # Without the certificate (and with no tokens configured) nothing gets in.
    anonymous = Client(base, {}, verify=str(certs.ca))
    status, reply = anonymous.send("GET", "/api/v1/cache/images")
    assert (status, reply["error"]) == (401, "unauthorized"), reply
    status, reply = anonymous.send("GET", "/health")
    assert status == 200 and reply["status"] == "healthy"
