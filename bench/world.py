"""A benchmark's own corner of the shared services: a bucket, an exchange, a queue, files.

Other work uses the same S3 server and broker at the same time, so every name is unique
and everything is removed afterwards, also when the benchmark fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import shutil
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from minio import Minio
from minio.commonconfig import CopySource
from minio.deleteobjects import DeleteObject

from bench.common import S3_ACCESS_KEY, S3_ENDPOINT, S3_SECRET_KEY

# The tests' config writer, checksums and AMQP clean-up serve the benchmarks too.
from testsupport.services import delete_amqp, sha256_file, write_daemon_config
from watcher.settings import S3Settings


@dataclass
class World:
    root: Path
    bucket: str
    exchange: str
    queue: str

    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def policies_dir(self) -> Path:
        return self.root / "policies"

    def s3_settings(self) -> S3Settings:
        return S3Settings(endpoint=S3_ENDPOINT, access_key=S3_ACCESS_KEY,
                          secret_key=S3_SECRET_KEY, region="us-east-1")

    def minio(self) -> Minio:
        return Minio(S3_ENDPOINT.split("://", 1)[1], S3_ACCESS_KEY, S3_SECRET_KEY,
                     secure=False, region="us-east-1")

    def write_config(self, cache_dir: Path, **overrides: Any) -> Path:
        return write_daemon_config(
            self.config_path, s3_endpoint=S3_ENDPOINT, s3_access_key=S3_ACCESS_KEY,
            s3_secret_key=S3_SECRET_KEY, exchange=self.exchange, queue=self.queue,
            cache_dir=cache_dir, max_size="100GiB", policies_dir=self.policies_dir,
            overrides=overrides)

    def write_policy(self, images: dict[str, dict[str, Any]]) -> None:
        self.policies_dir.mkdir(parents=True, exist_ok=True)
        for old in self.policies_dir.glob("*.yaml"):
            old.unlink()
        (self.policies_dir / "10-bench.yaml").write_text(yaml.safe_dump({
            "images": {name: {"bucket": self.bucket, "format": "qcow2", **spec}
                       for name, spec in images.items()},
            "domains": []}))

    def upload(self, key: str, data: bytes) -> None:
        self.minio().put_object(self.bucket, key, io.BytesIO(data), len(data))

    def upload_with_sidecar(self, key: str, path: Path) -> str:
        digest = sha256_file(path)
        self.minio().fput_object(self.bucket, key, str(path))
        self.upload(key + ".sha256", f"{digest}  {Path(key).name}\n".encode())
        return digest

    def copy_with_sidecar(self, source_key: str, key: str, digest: str) -> None:
        """A new key holding the same bytes, by server-side copy (no upload)."""
        self.minio().copy_object(self.bucket, key, CopySource(self.bucket, source_key))
        self.upload(key + ".sha256", f"{digest}  {Path(key).name}\n".encode())

    def upload_many(self, items: list[tuple[str, bytes]], threads: int = 8) -> None:
        client = self.minio()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda kv: client.put_object(
                self.bucket, kv[0], io.BytesIO(kv[1]), len(kv[1])), items))


@contextlib.contextmanager
def world(scratch: Path, name: str) -> Iterator[World]:
    """A fresh bucket, exchange and queue named after ``name``; all removed afterwards."""
    suffix = uuid.uuid4().hex[:8]
    here = World(root=scratch / f"{name}-{suffix}", bucket=f"lvw-bench-{name}-{suffix}",
                 exchange=f"lvw-bench-{name}-{suffix}", queue=f"lvw-bench-{name}-{suffix}")
    here.root.mkdir(parents=True)
    client = here.minio()
    client.make_bucket(here.bucket)
    try:
        yield here
    finally:
        errors = client.remove_objects(here.bucket, (
            DeleteObject(o.object_name) for o in
            client.list_objects(here.bucket, recursive=True)))
        for error in errors:
            print(f"  could not delete {error}")
        with contextlib.suppress(Exception):
            client.remove_bucket(here.bucket)
        asyncio.run(delete_amqp(here.exchange, here.queue))
        shutil.rmtree(here.root, ignore_errors=True)
