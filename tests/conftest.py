"""Shared fixtures: the real local services integration tests talk to.

``scripts/services.sh`` starts libvirtd, RabbitMQ and the S3 server when they are not
running; integration fixtures call it once per session and hand out isolated names
(a bucket, an exchange) per test so tests never see each other's data.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.util._once import Once

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def services_env() -> dict[str, str]:
    """Start (if needed) libvirtd, RabbitMQ and S3; return the S3 endpoint and credentials."""
    out = subprocess.run(
        [str(ROOT / "scripts" / "services.sh"), "--env"],
        check=True, capture_output=True, text=True, timeout=300,
    ).stdout
    env = dict(word.split("=", 1) for word in shlex.split(out))  # VAR=value lines, shell-quoted
    env.setdefault("LVW_AMQP_URL", os.environ.get("LVW_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"))
    return env


@pytest.fixture
def s3_bucket(services_env: dict[str, str]) -> Iterator[str]:
    """A fresh, empty bucket for one test, removed with its objects afterwards."""
    from minio import Minio

    endpoint = services_env["LVW_S3_ENDPOINT"].split("://", 1)[1]
    client = Minio(endpoint, services_env["LVW_S3_ACCESS_KEY"], services_env["LVW_S3_SECRET_KEY"],
                   secure=False, region="us-east-1")
    name = f"t-{uuid.uuid4().hex[:12]}"
    client.make_bucket(name)
    yield name
    for obj in client.list_objects(name, recursive=True):
        client.remove_object(name, obj.object_name)
    client.remove_bucket(name)


@pytest.fixture
def unique_name() -> str:
    """A short unique suffix for exchanges, queues and domains created by one test."""
    return uuid.uuid4().hex[:10]


@pytest.fixture
def world_readable_tmp() -> Iterator[Path]:
    """A temp dir QEMU (running as libvirt-qemu) can traverse; pytest's tmp_path is 0700."""
    base = Path("/var/tmp/lvw-tests")
    base.mkdir(mode=0o755, exist_ok=True)
    base.chmod(0o755)
    path = base / uuid.uuid4().hex[:12]
    path.mkdir(mode=0o755)
    path.chmod(0o755)
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)


def reset_global_tracer_provider() -> None:
    # OpenTelemetry lets a process set its provider once; tests need a fresh one each.
    trace._TRACER_PROVIDER_SET_ONCE = Once()
    trace._TRACER_PROVIDER = None


@pytest.fixture
def spans() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    """The daemon's tracing set up with an in-memory exporter, reset afterwards."""
    from watcher.runtime.observability import configure_tracing
    from watcher.settings import TracingSettings

    reset_global_tracer_provider()
    exporter = InMemorySpanExporter()
    provider = configure_tracing(TracingSettings(), exporter=exporter)
    yield provider, exporter
    provider.shutdown()
    reset_global_tracer_provider()
