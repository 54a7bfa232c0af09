"""Fixtures shared by the daemon-level integration tests."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.harness import Env
from testsupport.services import delete_amqp


@pytest.fixture
def env(services_env: dict[str, str], s3_bucket: str, unique_name: str,
        tmp_path: Path) -> Iterator[Env]:
    """One test's world (bucket, exchange, queue, directories) with a config written."""
    world = Env(root=tmp_path, bucket=s3_bucket, exchange=f"minio-events-{unique_name}",
                queue=f"lvw-test-{unique_name}", s3=services_env)
    world.write_config()
    yield world
    asyncio.run(delete_amqp(world.exchange, world.queue))
