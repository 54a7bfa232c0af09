"""One integration test's world: its bucket, exchange, queue, directories and config.

The helpers around it (configs, uploads, notifications, the daemon, polling) live in
``testsupport``, shared with the benchmarks and the demo.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from minio import Minio

from testsupport.services import sha256_file, write_daemon_config


@dataclass
class Env:
    """One test's world: its bucket, exchange, queue and directories."""

    root: Path
    bucket: str
    exchange: str
    queue: str
    s3: dict[str, str]

    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def cache_dir(self) -> Path:
        return self.root / "cache"

    @property
    def policies_dir(self) -> Path:
        return self.root / "policies"

    def minio(self) -> Minio:
        return Minio(self.s3["LVW_S3_ENDPOINT"].split("://", 1)[1], self.s3["LVW_S3_ACCESS_KEY"],
                     self.s3["LVW_S3_SECRET_KEY"], secure=False, region="us-east-1")

    def write_config(self, **overrides: Any) -> Path:
        return write_daemon_config(
            self.config_path, s3_endpoint=self.s3["LVW_S3_ENDPOINT"],
            s3_access_key=self.s3["LVW_S3_ACCESS_KEY"], s3_secret_key=self.s3["LVW_S3_SECRET_KEY"],
            exchange=self.exchange, queue=self.queue, cache_dir=self.cache_dir,
            max_size="10GiB", policies_dir=self.policies_dir, overrides=overrides)

    def write_policy(self, images: dict[str, dict[str, Any]],
                     domains: list[dict[str, Any]] | None = None,
                     name: str = "10-test.yaml") -> None:
        self.policies_dir.mkdir(parents=True, exist_ok=True)
        (self.policies_dir / name).write_text(
            yaml.safe_dump({"images": images, "domains": domains or []}))

    def upload(self, key: str, data: bytes) -> str:
        """Put an object; returns its ETag."""
        result = self.minio().put_object(self.bucket, key, io.BytesIO(data), len(data))
        return str(result.etag).strip('"')

    def upload_file(self, key: str, path: Path) -> str:
        result = self.minio().fput_object(self.bucket, key, str(path))
        return str(result.etag).strip('"')

    def upload_with_sidecar(self, key: str, path: Path) -> str:
        digest = sha256_file(path)
        self.upload_file(key, path)
        self.upload(key + ".sha256", f"{digest}  {Path(key).name}\n".encode())
        return digest
