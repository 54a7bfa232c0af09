"""An API job joins its caller's trace: the request's span and the job's share a trace id.

The daemon runs in this loop with an in-memory span exporter; the request carries a W3C
``traceparent`` header as a client's tracing library would send it.
"""

from __future__ import annotations

import asyncio
import http.client
import json
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.bootimage import write_qcow2_image
from tests.integration.harness import Env
from testsupport.daemon import running_daemon
from testsupport.polling import wait_for
from testsupport.services import free_port

pytestmark = pytest.mark.libvirt
TOKEN = "trace-test-token-" + "c" * 24
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"


def _call(port: int, method: str, path: str, body: Any = None,
          headers: dict[str, str] | None = None) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=None if body is None else json.dumps(body),
                     headers={"Authorization": f"Bearer {TOKEN}",
                              "Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


async def test_a_fetch_job_joins_the_callers_trace(
        spans: tuple[TracerProvider, InMemorySpanExporter], env: Env, tmp_path: Path) -> None:
    _provider, exporter = spans
    tokens = tmp_path / "tokens"
    tokens.write_text(TOKEN + "\n")
    port = free_port()
    env.write_config(api={"listen": f"127.0.0.1:{port}", "tokens_file": str(tokens),
                          "pool": "lvw-unused-pool"},
                     state={"dir": str(tmp_path / "state")})
    env.upload_with_sidecar("images/traced.qcow2",
                            write_qcow2_image(tmp_path / "traced.qcow2", "TRACED"))

    async with running_daemon(env.config_path, with_libvirt=True):
        status, body = await asyncio.to_thread(
            _call, port, "POST", "/api/v1/cache/fetch",
            {"image_url": f"s3://{env.bucket}/images/traced.qcow2"},
            {"traceparent": f"00-{TRACE_ID}-b7ad6b7169203331-01"})
        assert status == 202, body
        job_path = f"/api/v1/jobs/{body['job_id']}"

        async def completed() -> bool:
            status, job = await asyncio.to_thread(_call, port, "GET", job_path)
            assert status == 200 and job["status"] in ("pending", "running", "completed"), job
            return bool(job["status"] == "completed")

        await wait_for(completed, timeout=60, what="the fetch job")

    in_trace = {span.name for span in exporter.get_finished_spans()
                if format(span.context.trace_id, "032x") == TRACE_ID}
    assert {"POST /api/v1/cache/fetch", "api job fetch", "warm", "download"} <= in_trace, in_trace
