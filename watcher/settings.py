"""Daemon settings: grouped, frozen, every field documented with its unit and why its default.

Why it exists: the adapters, jobs and runtime take their knobs from here, so every tunable
has one home and one explanation, and reading a file (``watcher.config``) is kept apart from
what the values mean. One dataclass per system; ``Config`` groups them.

Two kinds, kept apart so that an operator's file and the code's knobs are never confused:

- ``Config`` and its sections mirror the config file key for key (the README lists them).
  Each key is one ``setting()`` field holding its default, kind, unit and doc; the one
  reader of ``watcher.config`` takes the allowed keys, defaults and checks from these
  fields. Adding a key is adding such a field to its section (``section()`` adds a section),
  plus its line in systemd/config.yaml and the docs' tables.
- The ``*Tuning`` classes hold the knobs that are not in the file (timeouts, backoffs,
  batching delays). Their defaults are tuned here for every host: an adapter takes one as
  a constructor argument defaulting to the instance below (``LIBVIRT_TUNING``...), so a
  test can pass other values.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from watcher.core.address import parse_listen
from watcher.core.backoff import Backoff
from watcher.core.fleet import HOST_NAME_RULE, is_host_name
from watcher.core.inspect import DEFAULT_MAX_VIRTUAL_SIZE

KINDS = ("text", "choice", "count", "seconds", "size", "path", "file", "url", "list", "secret")
"""How a key is written and checked; ``watcher.config`` has one reader per kind."""


def setting(default: Any, kind: str = "text", *, doc: str, unit: str = "",
            **options: Any) -> Any:
    """One key of the config file: its default, kind, unit and why the default.

    ``options`` refine the kind: ``empty_ok`` (text, url, secret), ``choices``, ``schemes``
    (url, secret), ``zero_off`` (seconds: 0 turns it off), ``valid`` with ``expected`` (a
    check of a non-empty text or of each list item), ``env`` and ``credential`` (secret).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind of setting {kind!r}")
    return field(default=default, repr=kind != "secret",
                 metadata={"kind": kind, "unit": unit, "doc": doc, **options})


def section(cls: type[Any]) -> Any:
    """A section of the config file: a mapping read into ``cls``."""
    return field(default_factory=cls, metadata={"kind": "section", "cls": cls})


def _host_port(text: str) -> bool:
    try:
        parse_listen(text)
    except ValueError:
        return False
    return True


_LISTEN: dict[str, Any] = {"valid": _host_port, "empty_ok": True,
                           "expected": 'host:port (or "" to disable the server)'}
_VG_NAME = re.compile(r"^[A-Za-z0-9+_.][A-Za-z0-9+_.-]{0,126}$")
_BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


@dataclass(frozen=True)
class LibvirtSettings:
    uri: str = setting("qemu:///system", doc="Connection URI of the local hypervisor.")


@dataclass(frozen=True)
class S3Settings:
    endpoint: str = setting(
        "http://127.0.0.1:9000", "url", schemes=("http", "https"),
        no_credentials="s3.access_key and s3.secret_key",
        doc="Base URL of the MinIO/S3 server; ``https://`` enables TLS.")
    region: str = setting("us-east-1", doc=(
        "Region used to sign requests; MinIO accepts any, us-east-1 is its default."))
    access_key: str = setting(
        "", "secret", env="LVW_S3_ACCESS_KEY", credential="s3-access-key", empty_ok=True,
        doc="From ``access_key``/``access_key_file``, $LVW_S3_ACCESS_KEY or the "
            "``s3-access-key`` systemd credential; never logged.")
    secret_key: str = setting(
        "", "secret", env="LVW_S3_SECRET_KEY", credential="s3-secret-key", empty_ok=True,
        doc="From ``secret_key``/``secret_key_file``, $LVW_S3_SECRET_KEY or the "
            "``s3-secret-key`` systemd credential; never logged.")

    @property
    def host(self) -> str:
        """``host:port`` as the minio client wants it."""
        return self.endpoint.split("://", 1)[-1].rstrip("/")

    @property
    def secure(self) -> bool:
        return self.endpoint.startswith("https://")


@dataclass(frozen=True)
class AmqpSettings:
    url: str = setting(
        "amqp://guest:guest@127.0.0.1:5672/", "secret", env="LVW_AMQP_URL",
        credential="amqp-url", schemes=("amqp", "amqps"),
        doc="It holds the password. From ``url``/``url_file``, $LVW_AMQP_URL or the "
            "``amqp-url`` systemd credential; never logged.")
    exchange: str = setting("minio-events", doc="Exchange MinIO publishes bucket notifications to.")
    exchange_type: str = setting(
        "fanout", "choice", choices=("direct", "fanout", "topic", "headers"),
        doc="The type MinIO declared the exchange with.")
    routing_key: str = setting("", empty_ok=True, doc=(
        "Binding key of this host's queue; MinIO publishes with its configured routing key."))
    queue: str = setting("", empty_ok=True, doc=(
        'Durable queue of this host; "" = ``libvirt-volume-watcher.<host.name>``.'))
    prefetch: int = setting(256, "count", unit="messages", doc=(
        "Unacked messages the broker may send ahead; each is acked only after it was handled. "
        "Large enough that the broker keeps streaming while acks travel back in batches (most "
        "notifications name keys no policy knows and take microseconds each); downloads are "
        "bounded separately by ``cache.max_concurrent_downloads``."))
    queue_type: str = setting("classic", "choice", choices=("classic", "quorum"), doc=(
        "Classic is what a single broker runs best; quorum replicates the queue across a "
        "broker cluster and dead-letters a message after ``delivery_limit`` deliveries, so a "
        "poison message cannot crash a consumer in a loop."))
    delivery_limit: int = setting(5, "count", unit="deliveries", doc=(
        "Quorum queues only: deliveries of one unsettled message before it is dead-lettered. "
        "Five rides out a few consumer restarts (each redelivers) without looping for long."))

    def queue_name(self, hostname: str | None = None) -> str:
        return self.queue or f"libvirt-volume-watcher.{hostname or socket.gethostname()}"


@dataclass(frozen=True)
class CacheSettings:
    dir: Path = setting(Path("/var/lib/libvirt-volume-watcher/cache"), "path",
                        doc="Directory of the content-addressed cache; it holds whole base images.")
    max_size: int = setting(100 * 1024**3, "size", unit="bytes", doc=(
        "Past this, least-recently-used entries no policy pins are evicted. 100 GiB holds a "
        "few versions each of a dozen typical base images."))
    max_virtual_size: int = setting(DEFAULT_MAX_VIRTUAL_SIZE, "size", unit="bytes", doc=(
        "An image whose virtual size is larger is refused (reason ``virtual_size``). A small "
        "file can claim petabytes; 4 TiB is far above any base image."))
    max_concurrent_downloads: int = setting(2, "count", unit="downloads", doc=(
        "Images downloaded at once; bounds bandwidth and temp space during a burst of uploads."))
    stale_sidecar_hold: float = setting(3600.0, "seconds", unit="seconds", zero_off=True, doc=(
        "How long a download refused for a checksum mismatch is held (in ``held/``, one per "
        "image, counted in ``max_size``) so that a corrected sidecar commits it without a "
        "second transfer; 0 = not held. An hour covers a pipeline that uploads the sidecar "
        "last."))


@dataclass(frozen=True)
class PoliciesSettings:
    dir: Path = setting(Path("/etc/libvirt-volume-watcher/policies"), "path", doc=(
        "Directory of ``*.yaml``/``*.yml`` policy files, read in name order on start/SIGHUP."))


@dataclass(frozen=True)
class HttpSettings:
    listen: str = setting("127.0.0.1:9700", **_LISTEN, doc=(
        "``host:port`` (``[v6addr]:port`` for IPv6, ``:port`` for every interface) for "
        '/metrics, /healthz and /readyz; port 0 picks a free port; "" disables the server. '
        "Loopback by default: metrics are for the local agent unless an operator opens them."))


@dataclass(frozen=True)
class ApiSettings:
    """The predecessor's HTTP job API, on its own listener (see README: HTTP API)."""

    listen: str = setting("", **_LISTEN, doc=(
        '``host:port`` of the API listener; "" (the default) = no API. Separate from '
        "``http.listen``, so probes and scrapes never share a port with clients' traffic."))
    tokens_file: Path | None = setting(None, "file", doc=(
        "File of API tokens, one per line (``#`` starts a comment); re-read on SIGHUP. "
        "Clients send ``Authorization: Bearer T`` or ``X-API-Token: T``."))
    tls_cert: Path | None = setting(None, "file", doc=(
        "PEM certificate (chain) of the API; with ``tls_key`` the API speaks HTTPS only."))
    tls_key: Path | None = setting(None, "file", doc="PEM private key of ``tls_cert``.")
    client_ca: Path | None = setting(None, "file", doc=(
        "PEM CA bundle; a client certificate it signed also authenticates (mTLS). Needs TLS."))
    pool: str = setting("", empty_ok=True, valid=lambda name: "/" not in name,
                        expected="a libvirt pool name (no '/')",
                        doc="libvirt storage pool of the API's volumes; required with listen.")


LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


@dataclass(frozen=True)
class LogSettings:
    level: str | None = setting(None, "choice", choices=LOG_LEVELS, doc=(
        "None = ``run --log-level`` (default info). Unlike the rest of the config, a SIGHUP "
        "applies a changed level to the running daemon."))


@dataclass(frozen=True)
class StateSettings:
    dir: Path = setting(Path("/var/lib/libvirt-volume-watcher"), "path", doc=(
        "Directory of durable state (the API's job database); the unit's StateDirectory."))


@dataclass(frozen=True)
class VolumesSettings:
    allow: tuple[str, ...] = setting(
        (), "list", valid=lambda glob: glob.startswith("/"),
        expected="an absolute path glob such as /dev/vg0/*",
        doc="Path globs a root disk may resolve to; empty = libvirt 'logical' pools only.")
    lvm_vgs: tuple[str, ...] = setting(
        (), "list", valid=lambda name: bool(_VG_NAME.match(name)) and name not in (".", ".."),
        expected="a volume group name (letters, digits, + _ . -)",
        doc="Volume groups whose LVs are allowed in addition to ``allow``.")


@dataclass(frozen=True)
class ReprovisionSettings:
    max_concurrent: int = setting(2, "count", unit="writes", doc=(
        "Volume writes running at once; two keep a disk busy without starving the others."))


@dataclass(frozen=True)
class TracingSettings:
    otlp_endpoint: str = setting("", "url", schemes=("http", "https"), empty_ok=True,
                                 doc='OTLP/HTTP endpoint for spans; "" = no export.')


@dataclass(frozen=True)
class HostSettings:
    name: str = setting(
        "", empty_ok=True, valid=is_host_name,
        expected=f"{HOST_NAME_RULE} (it names a queue and an S3 key)",
        doc="This host's name in the fleet: its queue, its status object, the ``hosts:`` "
            'globs of policies and the trace resource; "" = the machine\'s hostname, unique '
            "in most fleets.")

    @property
    def resolved(self) -> str:
        return self.name or socket.gethostname()


@dataclass(frozen=True)
class FleetSettings:
    status_bucket: str = setting(
        "", empty_ok=True, valid=lambda name: bool(_BUCKET_NAME.fullmatch(name)),
        expected="an S3 bucket name (3-63 of a-z 0-9 . -)",
        doc='Bucket for ``.libvirt-volume-watcher/hosts/<host>.json``; "" = none, since a '
            "single host needs no fleet view and may lack write rights on any bucket.")


@dataclass(frozen=True)
class PrewarmSettings:
    spread: float = setting(0.0, "seconds", unit="seconds", zero_off=True, doc=(
        "A host waits a fixed per-host delay in [0, spread) before downloading a new version, "
        "so a fleet's downloads of one upload do not hit S3 in the same second. 0 (off) suits "
        "a single host or a bucket that serves the whole fleet at once."))


@dataclass(frozen=True)
class Config:
    libvirt: LibvirtSettings = section(LibvirtSettings)
    s3: S3Settings = section(S3Settings)
    amqp: AmqpSettings = section(AmqpSettings)
    cache: CacheSettings = section(CacheSettings)
    policies: PoliciesSettings = section(PoliciesSettings)
    http: HttpSettings = section(HttpSettings)
    reconcile_interval: float = setting(300.0, "seconds", unit="seconds", doc=(
        "Between full sweeps of bucket and domains; bounds the cost of a missed event."))
    volumes: VolumesSettings = section(VolumesSettings)
    reprovision: ReprovisionSettings = section(ReprovisionSettings)
    tracing: TracingSettings = section(TracingSettings)
    host: HostSettings = section(HostSettings)
    fleet: FleetSettings = section(FleetSettings)
    prewarm: PrewarmSettings = section(PrewarmSettings)
    api: ApiSettings = section(ApiSettings)
    state: StateSettings = section(StateSettings)
    log: LogSettings = section(LogSettings)
    source: Path | None = None
    """The file this config was read from."""


# --- tuning: not in the config file ---------------------------------------------------------


@dataclass(frozen=True)
class LibvirtTuning:
    """How the libvirt event connection is kept and restored."""

    reconnect_backoff: Backoff = field(
        default_factory=partial(Backoff, base=0.5, cap=30.0, attempts=0))
    """Seconds between reconnect attempts, doubling from 0.5 up to 30, forever: a host whose
    libvirtd is down has nothing better to do, and 30 s bounds how late a restarted libvirtd
    is noticed."""
    keepalive_interval: int = 5
    """Seconds between keepalive probes on an idle connection."""
    keepalive_count: int = 3
    """Unanswered probes before the connection counts as dead: with a 5 s interval a dead
    libvirtd is noticed in about 20 s, long enough to ride out a busy one."""


@dataclass(frozen=True)
class S3Tuning:
    """Retries of the S3 client."""

    retry_backoff: Backoff = field(
        default_factory=partial(Backoff, base=0.5, cap=15.0, attempts=6))
    """Retries of one request that failed transiently: six tries over roughly half a minute,
    which rides out a restart of the S3 server; a longer outage is the next event's or the
    reconcile's to repair."""


@dataclass(frozen=True)
class AmqpTuning:
    """Timeouts and batching of the notification consumer."""

    connect_timeout: float = 10.0
    """Seconds the first connection may take before start() gives up: a broker on the LAN
    answers in milliseconds, and failing fast at start lets systemd restart the daemon."""
    operation_timeout: float = 10.0
    """Seconds for one declare, bind, consume or cancel round trip with the broker: far above
    a healthy broker's answer, short enough that a wedged one is noticed."""
    ack_delay: float = 0.002
    """Seconds a finished delivery waits for others to share its ack frame: long enough to
    batch a burst into one ``multiple`` ack, far too short to delay anything a person sees."""
    dead_letter_preview_bytes: int = 200
    """Bytes of a dead-lettered body quoted in its log line: enough to recognise the message,
    too few to flood the journal."""


@dataclass(frozen=True)
class ReprovisionTuning:
    """Retries of one reprovision job."""

    retry_backoff: Backoff = field(
        default_factory=partial(Backoff, base=2.0, cap=60.0, attempts=6))
    """Temporary failures (S3, the libvirt connection, a busy device) retried in one worker
    run, over about two minutes; after that the request stays in the domain's metadata and
    the next event or sweep tries again."""


@dataclass(frozen=True)
class FleetTuning:
    """How a host publishes its fleet status."""

    status_backoff: Backoff = field(
        default_factory=partial(Backoff, base=0.5, cap=1.0, attempts=2))
    """Two tries per status write: a status not written now is rewritten at the next change
    or reconcile, so retrying longer would only hold the writer up."""
    status_timeout: float = 10.0
    """Seconds for one status request: a few KiB, far below a download's 30 s."""
    min_write_interval: float = 1.0
    """Seconds between two status writes: changes in between share the next write, so a
    burst of warms costs one PUT per second per host at most."""


@dataclass(frozen=True)
class HttpTuning:
    """What one HTTP connection may cost, on either listener."""

    header_timeout: float = 2.0
    """Seconds from the accept (or the last response) to a complete request head, and for a
    TLS handshake; a probe or a client sends its head in one packet, a slow-loris does not."""
    write_timeout: float = 5.0
    """Seconds to write one response; a client that stops reading is cut off after them."""
    max_header_bytes: int = 8192
    """Bytes of a request head (431 past them); ample for tokens and request ids."""
    max_connections: int = 1024
    """Open connections per listener, further kept to a quarter of the descriptor limit so
    that both listeners together never take more than half the daemon's descriptors."""
    max_body_bytes: int = 1024**2
    """Bytes of an API request body (413 past them): a job request is a few hundred bytes."""
    stop_timeout: float = 1.0
    """Seconds a request in flight may still take once the daemon stops listening."""


@dataclass(frozen=True)
class RuntimeTuning:
    """The supervisor's own clock."""

    stop_deadline: float = 75.0
    """Seconds from SIGTERM to exit, every drain together: below the unit's
    ``TimeoutStopSec=90``, so systemd never has to kill a half-finished write."""


LIBVIRT_TUNING = LibvirtTuning()
S3_TUNING = S3Tuning()
AMQP_TUNING = AmqpTuning()
REPROVISION_TUNING = ReprovisionTuning()
FLEET_TUNING = FleetTuning()
HTTP_TUNING = HttpTuning()
RUNTIME_TUNING = RuntimeTuning()
