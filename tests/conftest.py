"""Shared fixtures: the real local services integration tests talk to, and a task-leak check.

``scripts/services.sh`` starts libvirtd, RabbitMQ and the S3 server when they are not
running; integration fixtures call it once per session and hand out isolated names
(a bucket, an exchange) per test so tests never see each other's data. Every async
test must end with no task of its own still pending.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import shlex
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.util._once import Once

from testsupport.proxy import Proxy

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
    # The daemon's tracer is a proxy that keeps the first real tracer it got: let it take
    # the next test's provider instead of the shut-down one.
    from watcher import telemetry

    telemetry.tracer._real_tracer = None  # type: ignore[attr-defined]


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


@pytest.fixture
def proxy_to() -> Iterator[Callable[..., Proxy]]:
    """``proxy_to(upstream, **options)``: a relay to a real service whose connections the
    test breaks (see ``testsupport.proxy``); every one is closed after the test."""
    proxies: list[Proxy] = []

    def make(*args: Any, **kwargs: Any) -> Proxy:
        proxy = Proxy(*args, **kwargs)
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        proxy.close()


LEAK_GRACE_STEPS = 20
"""Loop iterations a finishing task gets (to run its last callbacks) before it counts."""


@pytest.fixture(autouse=True)
async def _no_leaked_tasks(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    """Fail an async test that leaves tasks pending once it and its fixtures are done.

    Set up before (so torn down after) the test's other fixtures: a daemon a fixture
    stops is not a leak. Leaked tasks are cancelled so the next test starts clean.
    """
    yield
    if not inspect.iscoroutinefunction(request.function):
        return
    this = asyncio.current_task()
    leaked: list[asyncio.Task[Any]] = []
    for _ in range(LEAK_GRACE_STEPS):
        leaked = [t for t in asyncio.all_tasks() if t is not this and not t.done()]
        if not leaked:
            return
        await asyncio.sleep(0)
    described = [f"{t.get_name()}: {t.get_coro()!r}" for t in leaked]
    for task in leaked:
        task.cancel()
    await asyncio.gather(*leaked, return_exceptions=True)
    pytest.fail(f"{len(leaked)} asyncio task(s) still pending after the test: {described}")
