"""The job API against its OpenAPI document, by property-based testing on a live daemon.

Schemathesis generates requests for every operation of ``watcher/http/openapi.json`` (valid
and invalid ones, boundary values included) and sends them to a real daemon process with a
libvirt dir pool; every answer must be documented (status code, content type, body,
headers), none may be a 500, and the daemon must still be alive and healthy afterwards.
Each operation runs with the right token, with none and with a wrong one (401 both).
"""

from __future__ import annotations

import asyncio
import re
import shutil
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from minio import Minio
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tests.integration.harness import Env
from testsupport.api import ApiDaemon, api_daemon
from testsupport.services import delete_amqp

pytestmark = pytest.mark.libvirt
ApiCase = schemathesis.Case[Any]  # the operation type is generic over four parameters
OPENAPI = Path(__file__).resolve().parents[2] / "watcher" / "http" / "openapi.json"
SCHEMA = schemathesis.openapi.from_path(OPENAPI)
TOKEN = "schema-test-token-" + "c" * 24
JOB_ROUTES = {"createJob", "provision", "fetchImage"}
ONE_JOB_ROUTES = {"getJob", "getStatus", "cancelJob", "cancel"}
ACCEPTED: list[str] = []
"""Job ids the job routes answered 202 with (they run first, in the document's order)."""
JOB_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
SEEN: Counter[tuple[str, int]] = Counter()
"""(operationId, status) of every answer with the right token, to show the run reached
past validation: jobs accepted, volumes uploaded."""

# Bounded and repeatable: the same cases on every run, a few minutes at most in all.
BOUNDED = settings(max_examples=50, deadline=None, derandomize=True, database=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


@pytest.fixture(scope="module")
def live(services_env: dict[str, str]) -> Iterator[tuple[ApiDaemon, str]]:
    """One daemon for the whole module (its own bucket, queue and pool) and its bucket."""
    suffix = uuid.uuid4().hex[:10]
    root = Path("/var/tmp/lvw-tests") / f"schema-{suffix}"
    root.mkdir(parents=True, mode=0o755)
    bucket = f"t-schema-{suffix}"
    minio = Minio(services_env["LVW_S3_ENDPOINT"].split("://", 1)[1],
                  services_env["LVW_S3_ACCESS_KEY"], services_env["LVW_S3_SECRET_KEY"],
                  secure=False, region="us-east-1")
    minio.make_bucket(bucket)
    env = Env(root=root, bucket=bucket, exchange=f"minio-events-schema-{suffix}",
              queue=f"lvw-test-schema-{suffix}", s3=services_env)
    try:
        with api_daemon(root, f"lvw-schema-{suffix}", env.write_config, token=TOKEN) as api:
            yield api, bucket
    finally:
        for obj in minio.list_objects(bucket, recursive=True):
            minio.remove_object(bucket, obj.object_name)
        minio.remove_bucket(bucket)
        asyncio.run(delete_amqp(env.exchange, env.queue))
        shutil.rmtree(root, ignore_errors=True)


def operation_id(case: ApiCase) -> str:
    return str(case.operation.definition.raw.get("operationId"))


def confine(case: ApiCase, api: ApiDaemon, bucket: str) -> None:
    """Keep a generated request inside this test's own pool and bucket.

    libvirtd and the S3 server are shared: a generated ``X-Pool-Name`` could name anybody's
    pool, and upload-content writes into it, so the header is always this test's pool.
    Likewise a generated ``s3://`` URL is pointed at this test's bucket (its objects do not
    exist, so such jobs fail), so no job ever reads another bucket. http(s) URLs stay as
    generated: no generator hits the S3 endpoint's host and port, so they are refused.
    """
    if operation_id(case) == "uploadContent":
        case.headers["X-Pool-Name"] = api.pool
        # Content-Length frames the body: the client sends the body's real length whatever
        # was generated, so the case says so too and the checks judge what was sent.
        sent = case.as_transport_kwargs(base_url=api.base_url).get("data") or b""
        case.headers["Content-Length"] = str(len(sent))
    if (operation_id(case) in JOB_ROUTES
            and isinstance(case.body, dict) and isinstance(case.body.get("image_url"), str)):
        url = str(case.body["image_url"])
        scheme, sep, rest = url.partition("://")
        if sep and scheme.lower() == "s3":
            _, _, key = rest.partition("/")
            case.body["image_url"] = f"s3://{bucket}/{key}"


def aim_at_real_jobs(case: ApiCase) -> None:
    """Point half the well-formed job ids at jobs that exist, so the ``Job`` body and
    cancelling (200, or 400 once a job has ended) are checked too, not only 404s."""
    job_id = (case.path_parameters or {}).get("job_id")
    if (operation_id(case) in ONE_JOB_ROUTES and ACCEPTED and isinstance(job_id, str)
            and JOB_ID.fullmatch(job_id) and int(job_id[-1], 16) % 2 == 0):
        assert case.path_parameters is not None
        case.path_parameters["job_id"] = ACCEPTED[int(job_id[:8], 16) % len(ACCEPTED)]


def send(case: ApiCase, api: ApiDaemon, bucket: str,
         credentials: dict[str, str]) -> schemathesis.Response:
    confine(case, api, bucket)
    for name in ("Authorization", "X-API-Token"):  # only the credentials chosen below
        case.headers.pop(name, None)
    return case.call_and_validate(base_url=api.base_url, headers=credentials, timeout=30,
                                  excluded_checks=[positive_data_acceptance])


@SCHEMA.parametrize()
@BOUNDED
def test_every_operation_answers_as_documented_with_a_token(
        case: ApiCase, live: tuple[ApiDaemon, str]) -> None:
    api, bucket = live
    aim_at_real_jobs(case)
    response = send(case, api, bucket, api.auth_header)
    SEEN[operation_id(case), response.status_code] += 1
    if operation_id(case) in JOB_ROUTES and response.status_code == 202:
        ACCEPTED.append(response.json()["job_id"])


@SCHEMA.parametrize()
@pytest.mark.parametrize("credentials", [{}, {"Authorization": "Bearer wrong"},
                                         {"X-API-Token": "wrong"}],
                         ids=["none", "wrong-bearer", "wrong-x-api-token"])
@settings(BOUNDED, max_examples=5)
def test_every_operation_refuses_missing_or_wrong_credentials_as_documented(
        case: ApiCase, live: tuple[ApiDaemon, str],
        credentials: dict[str, str]) -> None:
    api, bucket = live
    response = send(case, api, bucket, credentials)
    if case.path.startswith(("/api/", "/volumes/")):
        assert response.status_code == 401, response.text
        assert response.headers.get("www-authenticate") == ["Bearer"], response.headers


def test_a_longer_upload_grows_a_volume_smaller_than_one_block(
        live: tuple[ApiDaemon, str]) -> None:
    # Found by the generated runs: a 1-byte volume has a 4 KiB allocation, and libvirt
    # refused to "grow" it to 67 bytes (below its allocation) with a 409.
    api, _ = live
    seed = bytes(range(67))
    for body in (b"x", seed):
        reply = requests.put(f"{api.base_url}/volumes/upload-content", data=body, timeout=30,
                             headers={**api.auth_header, "X-Volume-Name": "tiny-seed",
                                      "X-Pool-Name": api.pool})
        assert reply.status_code == 200, reply.text
    assert (api.pool_dir / "tiny-seed").read_bytes()[:len(seed)] == seed


def test_the_daemon_survived_and_serves_the_document_it_was_tested_against(
        live: tuple[ApiDaemon, str]) -> None:
    api, _ = live
    assert api.daemon.running
    assert requests.get(f"{api.base_url}/healthz", timeout=10).json()["status"] == "healthy"
    if SEEN:  # the generated runs came first: some requests got past every check
        assert SEEN["createJob", 202] and SEEN["fetchImage", 202], SEEN
        assert SEEN["uploadContent", 200], SEEN
        assert SEEN["getJob", 200] and SEEN["getStatus", 200], SEEN
        assert SEEN["cancelJob", 400] + SEEN["cancelJob", 200] > 0, SEEN
    metrics = requests.get(f"{api.base_url}/metrics", timeout=10).text
    unexpected = [line for line in metrics.splitlines()
                  if line.startswith("volume_watcher_unexpected_errors_total")
                  and not line.endswith(" 0.0")]
    assert unexpected == [], unexpected
    served = requests.get(f"{api.base_url}/api/v1/openapi.json", headers=api.auth_header,
                          timeout=10)
    assert served.status_code == 200
    assert served.content == OPENAPI.read_bytes()


