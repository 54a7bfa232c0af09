"""Daemon settings: grouped, frozen, every field documented with its unit and default.

The YAML contract is in the README. Loading and validation (with file:line errors, and
secrets from the environment or files) live in ``load_config`` below.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_CONFIG_PATH = Path("/etc/libvirt-volume-watcher/config.yaml")


@dataclass(frozen=True)
class LibvirtSettings:
    uri: str = "qemu:///system"
    """Connection URI of the local hypervisor."""


@dataclass(frozen=True)
class S3Settings:
    endpoint: str = "http://127.0.0.1:9000"
    """Base URL of the MinIO/S3 server; ``https://`` enables TLS."""
    access_key: str = field(default="", repr=False)
    secret_key: str = field(default="", repr=False)
    region: str = "us-east-1"

    @property
    def host(self) -> str:
        """``host:port`` as the minio client wants it."""
        return self.endpoint.split("://", 1)[-1].rstrip("/")

    @property
    def secure(self) -> bool:
        return self.endpoint.startswith("https://")


@dataclass(frozen=True)
class AmqpSettings:
    url: str = field(default="amqp://guest:guest@127.0.0.1:5672/", repr=False)
    exchange: str = "minio-events"
    """Exchange MinIO publishes bucket notifications to."""
    exchange_type: str = "fanout"
    routing_key: str = ""
    queue: str = ""
    """Durable queue of this host; "" = ``libvirt-volume-watcher.<hostname>``."""
    prefetch: int = 16
    """Messages in flight at once; each is acked only after it was handled."""

    def queue_name(self, hostname: str | None = None) -> str:
        return self.queue or f"libvirt-volume-watcher.{hostname or socket.gethostname()}"


@dataclass(frozen=True)
class CacheSettings:
    dir: Path = Path("/var/lib/libvirt-volume-watcher/cache")
    max_size: int = 100 * 1024**3
    """Bytes; past this, least-recently-used entries no policy pins are evicted."""
    max_concurrent_downloads: int = 2


@dataclass(frozen=True)
class PoliciesSettings:
    dir: Path = Path("/etc/libvirt-volume-watcher/policies")


@dataclass(frozen=True)
class HttpSettings:
    listen: str = "127.0.0.1:9700"
    """``host:port`` for /metrics, /healthz and /readyz; "" disables the server."""


@dataclass(frozen=True)
class VolumesSettings:
    allow: tuple[str, ...] = ()
    """Path globs a root disk may resolve to; empty = volumes of libvirt 'logical' pools only."""
    lvm_vgs: tuple[str, ...] = ()
    """Volume groups whose LVs are allowed in addition to ``allow``."""


@dataclass(frozen=True)
class ReprovisionSettings:
    max_concurrent: int = 2
    """Volume writes running at once."""


@dataclass(frozen=True)
class TracingSettings:
    otlp_endpoint: str = ""
    """OTLP/HTTP endpoint for spans; "" = no export."""


@dataclass(frozen=True)
class Config:
    libvirt: LibvirtSettings = field(default_factory=LibvirtSettings)
    s3: S3Settings = field(default_factory=S3Settings)
    amqp: AmqpSettings = field(default_factory=AmqpSettings)
    cache: CacheSettings = field(default_factory=CacheSettings)
    policies: PoliciesSettings = field(default_factory=PoliciesSettings)
    http: HttpSettings = field(default_factory=HttpSettings)
    reconcile_interval: float = 300.0
    """Seconds between full sweeps of bucket and domains; bounds the cost of a missed event."""
    volumes: VolumesSettings = field(default_factory=VolumesSettings)
    reprovision: ReprovisionSettings = field(default_factory=ReprovisionSettings)
    tracing: TracingSettings = field(default_factory=TracingSettings)
    source: Path | None = None
    """The file this config was read from."""
