"""Daemon settings: grouped, frozen, every field documented with its unit and default.

The YAML contract is in the README. ``load_config`` reads and validates the file and
reports every mistake as ``file:line: message`` (unknown keys included), so an operator
fixes a config in one round. Relative paths are relative to the config file.

Secrets (the S3 keys and the AMQP URL, which holds a password) are taken, first match wins:

1. from the environment: ``LVW_S3_ACCESS_KEY``, ``LVW_S3_SECRET_KEY``, ``LVW_AMQP_URL``;
2. from the config file: ``s3.access_key`` or ``s3.access_key_file`` (a file holding the
   secret), likewise ``s3.secret_key[_file]`` and ``amqp.url[_file]``;
3. from systemd credentials (``LoadCredential=``): the files ``s3-access-key``,
   ``s3-secret-key`` and ``amqp-url`` in ``$CREDENTIALS_DIRECTORY``.

Secret values never appear in ``repr()`` or in error messages; problems name the source.

``load_policy_dir`` reads the policy directory for start-up and SIGHUP, and ``check_all``
backs the ``check`` command.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from watcher.core.errors import ConfigError, Problem
from watcher.core.fleet import HOST_NAME_RULE, is_host_name
from watcher.core.inspect import DEFAULT_MAX_VIRTUAL_SIZE
from watcher.core.policy import PolicySet
from watcher.core.policy_load import parse_policies
from watcher.core.units import parse_size
from watcher.core.yamlsource import FieldReader, LineMap, describe, field_path, parse_yaml

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
    """Secret. From ``access_key``/``access_key_file``, $LVW_S3_ACCESS_KEY or the
    ``s3-access-key`` systemd credential; never logged."""
    secret_key: str = field(default="", repr=False)
    """Secret. From ``secret_key``/``secret_key_file``, $LVW_S3_SECRET_KEY or the
    ``s3-secret-key`` systemd credential; never logged."""
    region: str = "us-east-1"
    """Region used to sign requests; MinIO accepts any, us-east-1 is its default."""

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
    """Secret (it holds the password). From ``url``/``url_file``, $LVW_AMQP_URL or the
    ``amqp-url`` systemd credential; never logged."""
    exchange: str = "minio-events"
    """Exchange MinIO publishes bucket notifications to."""
    exchange_type: str = "fanout"
    """direct, fanout, topic or headers: the type MinIO declared the exchange with."""
    routing_key: str = ""
    """Binding key of this host's queue; MinIO publishes with its configured routing key."""
    queue: str = ""
    """Durable queue of this host; "" = ``libvirt-volume-watcher.<host.name>``."""
    prefetch: int = 256
    """Unacked messages the broker may send ahead; each is acked only after it was handled.

    Large enough that the broker keeps streaming while acks travel back in batches (most
    notifications name keys no policy knows and take microseconds each); downloads are
    bounded separately by ``cache.max_concurrent_downloads``.
    """

    # Fleet: see the fleet block below.
    queue_type: str = "classic"
    """classic, or quorum: replicated, with ``delivery_limit`` dead-lettering poison."""
    delivery_limit: int = 5
    """Quorum queues only: deliveries of one message before it is dead-lettered."""

    def queue_name(self, hostname: str | None = None) -> str:
        return self.queue or f"libvirt-volume-watcher.{hostname or socket.gethostname()}"


@dataclass(frozen=True)
class CacheSettings:
    dir: Path = Path("/var/lib/libvirt-volume-watcher/cache")
    max_size: int = 100 * 1024**3
    """Bytes; past this, least-recently-used entries no policy pins are evicted."""
    max_virtual_size: int = DEFAULT_MAX_VIRTUAL_SIZE
    """Bytes; an image whose virtual size is larger is refused (reason ``virtual_size``).
    A small file can claim petabytes; 4 TiB is far above any base image."""
    max_concurrent_downloads: int = 2
    """Images downloaded at once; bounds bandwidth and temp space during a burst of uploads."""


@dataclass(frozen=True)
class PoliciesSettings:
    dir: Path = Path("/etc/libvirt-volume-watcher/policies")
    """Directory of ``*.yaml``/``*.yml`` policy files, read in name order on start and SIGHUP."""


@dataclass(frozen=True)
class HttpSettings:
    listen: str = "127.0.0.1:9700"
    """``host:port`` (``[v6addr]:port`` for IPv6) for /metrics, /healthz and /readyz;
    port 0 picks a free port; "" disables the server."""


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


# --- fleet: many hosts on one bucket and one broker ----------------------------------------


@dataclass(frozen=True)
class HostSettings:
    name: str = ""
    """This host's name in the fleet: its queue, its status object, ``hosts:`` globs and
    the trace resource; "" = the machine's hostname."""

    @property
    def resolved(self) -> str:
        return self.name or socket.gethostname()


@dataclass(frozen=True)
class FleetSettings:
    status_bucket: str = ""
    """Bucket for ``.libvirt-volume-watcher/hosts/<host>.json``; "" = no status written."""


@dataclass(frozen=True)
class PrewarmSettings:
    spread: float = 0.0
    """Seconds; a host waits a fixed per-host delay in [0, spread) before downloading a new
    version, so a fleet's downloads of one upload do not hit S3 in the same second."""


QUEUE_TYPES = ("classic", "quorum")
FLEET_SECTION_KEYS: Mapping[str, tuple[str, ...]] = {
    "host": ("name",),
    "fleet": ("status_bucket",),
    "prewarm": ("spread",),
}


# --- the whole config ------------------------------------------------------------------------


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
    host: HostSettings = field(default_factory=HostSettings)
    fleet: FleetSettings = field(default_factory=FleetSettings)
    prewarm: PrewarmSettings = field(default_factory=PrewarmSettings)
    source: Path | None = None
    """The file this config was read from."""


# --- loading -------------------------------------------------------------------------------

EXCHANGE_TYPES = ("direct", "fanout", "topic", "headers")
SECTION_KEYS: Mapping[str, tuple[str, ...]] = {
    "libvirt": ("uri",),
    "s3": ("endpoint", "access_key", "access_key_file", "secret_key", "secret_key_file",
           "region"),
    "amqp": ("url", "url_file", "exchange", "exchange_type", "routing_key", "queue", "prefetch",
             "queue_type", "delivery_limit"),
    "cache": ("dir", "max_size", "max_virtual_size", "max_concurrent_downloads"),
    "policies": ("dir",),
    "http": ("listen",),
    "volumes": ("allow", "lvm_vgs"),
    "reprovision": ("max_concurrent",),
    "tracing": ("otlp_endpoint",),
    **FLEET_SECTION_KEYS,
}
TOP_LEVEL_KEYS = (*SECTION_KEYS, "reconcile_interval")
POLICY_SUFFIXES = (".yaml", ".yml")
ENVIRONMENT = "environment"
"""The ``file`` of a Problem about an environment variable."""

_VG_NAME = re.compile(r"^[A-Za-z0-9+_.][A-Za-z0-9+_.-]{0,126}$")
_BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


@dataclass(frozen=True)
class _SecretSpec:
    """One secret setting and the names it goes by in each source."""

    section: str
    key: str
    env: str
    credential: str
    empty_ok: bool


_SECRETS = {
    ("s3", "access_key"): _SecretSpec("s3", "access_key", "LVW_S3_ACCESS_KEY", "s3-access-key",
                                      empty_ok=True),
    ("s3", "secret_key"): _SecretSpec("s3", "secret_key", "LVW_S3_SECRET_KEY", "s3-secret-key",
                                      empty_ok=True),
    ("amqp", "url"): _SecretSpec("amqp", "url", "LVW_AMQP_URL", "amqp-url", empty_ok=False),
}


@dataclass(frozen=True)
class _Origin:
    """Where a secret came from, to point at it without showing it."""

    file: str
    line: int
    label: str


def load_config(path: Path, environ: Mapping[str, str] | None = None) -> Config:
    """Read and validate the daemon config; raise ``ConfigError`` with every problem.

    ``environ`` defaults to the process environment; it supplies secret overrides and
    ``$CREDENTIALS_DIRECTORY``.
    """
    reader = _ConfigReader(path, os.environ if environ is None else environ)
    config = reader.read()
    if reader.problems or config is None:
        raise ConfigError(reader.sorted_problems())
    return config


def load_policy_dir(directory: Path) -> PolicySet:
    """Read every ``*.yaml``/``*.yml`` file of ``directory`` in name order into one PolicySet.

    Hidden files (editor locks and backups) are skipped. Raises ``ConfigError`` with every
    problem of every file; a missing directory is a problem too.
    """
    if not directory.is_dir():
        reason = "does not exist" if not directory.exists() else "is not a directory"
        raise ConfigError([Problem(str(directory), 0, f"policy directory {reason}")])
    try:
        candidates = sorted(directory.iterdir(), key=lambda p: p.name)
    except OSError as exc:
        raise ConfigError([Problem(str(directory), 0, f"cannot list policy directory: "
                                                      f"{exc.strerror or exc}")]) from exc
    files = [p for p in candidates
             if p.suffix in POLICY_SUFFIXES and not p.name.startswith(".") and not p.is_dir()]
    sources: list[tuple[str, str]] = []
    problems: list[Problem] = []
    for file in files:
        try:
            sources.append((str(file), file.read_text(encoding="utf-8")))
        except UnicodeDecodeError:
            problems.append(Problem(str(file), 0, "not UTF-8 text"))
        except OSError as exc:
            problems.append(Problem(str(file), 0, f"cannot read: {exc.strerror or exc}"))
    try:
        policies = parse_policies(sources)
    except ConfigError as exc:
        problems.extend(exc.problems)
    if problems:
        order = {str(file): index for index, file in enumerate(files)}
        raise ConfigError(sorted(problems, key=lambda p: order.get(p.file, -1)))
    return policies


def check_all(config_path: Path, environ: Mapping[str, str] | None = None) -> list[Problem]:
    """Every problem of the config file, then of the policy directory it names.

    The policies are checked even when other parts of the config are wrong, as long as
    the config names a usable ``policies.dir``.
    """
    reader = _ConfigReader(config_path, os.environ if environ is None else environ)
    config = reader.read()
    problems = reader.sorted_problems()
    if config is not None and reader.policies_dir_ok:
        try:
            load_policy_dir(config.policies.dir)
        except ConfigError as exc:
            problems.extend(exc.problems)
    return problems


class _ConfigReader:
    """One pass over a config file: builds a Config from the valid parts, notes the rest."""

    def __init__(self, path: Path, environ: Mapping[str, str]) -> None:
        self.path = path
        self.base = path.absolute().parent
        self.environ = environ
        self.fields = FieldReader(str(path))
        self.policies_dir_ok = False

    @property
    def problems(self) -> list[Problem]:
        return self.fields.problems

    def sorted_problems(self) -> list[Problem]:
        """Problems of the config file by line, then those of other sources as found."""
        own = str(self.path)
        return sorted(self.problems, key=lambda p: (p.file != own, p.line if p.file == own else 0))

    def read(self) -> Config | None:
        """The config built from every valid setting (defaults elsewhere), or None when the
        file could not be read or is not a mapping at all."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            self.fields.report(0, "config file not found")
            return None
        except UnicodeDecodeError:
            self.fields.report(0, "config file is not UTF-8 text")
            return None
        except OSError as exc:
            self.fields.report(0, f"cannot read config file: {exc.strerror or exc}")
            return None
        document = parse_yaml(text, str(self.path))
        self.problems.extend(document.problems)
        top = document.value
        if top is None:
            if document.problems:
                return None
            top = LineMap(1)  # an empty file: every default
        if not isinstance(top, LineMap):
            self.fields.report(document.line, f"the config must be a mapping of sections, "
                                              f"got {describe(top)}")
            return None
        self.fields.check_keys(top, TOP_LEVEL_KEYS, "")
        sections: dict[str, LineMap] = {}
        for name, allowed in SECTION_KEYS.items():
            section = self.fields.section(top, name, "")
            if section is not None:
                self.fields.check_keys(section, allowed, name)
                sections[name] = section
        before = len(self.problems)
        policies = self._policies(sections.get("policies", LineMap(0)))
        self.policies_dir_ok = "policies" in sections and len(self.problems) == before
        for name in SECTION_KEYS:
            sections.setdefault(name, LineMap(top.key_line(name)))
        interval = self.fields.positive_number(top, "reconcile_interval", "")
        return Config(
            libvirt=self._libvirt(sections["libvirt"]),
            s3=self._s3(sections["s3"]),
            amqp=self._amqp(sections["amqp"]),
            cache=self._cache(sections["cache"]),
            policies=policies,
            http=self._http(sections["http"]),
            reconcile_interval=300.0 if interval is None else interval,
            volumes=self._volumes(sections["volumes"]),
            reprovision=self._reprovision(sections["reprovision"]),
            tracing=self._tracing(sections["tracing"]),
            host=self._host(sections["host"]),
            fleet=self._fleet(sections["fleet"]),
            prewarm=self._prewarm(sections["prewarm"]),
            source=self.path.absolute(),
        )

    # --- sections: each returns its settings with the valid values, defaults for the rest

    def _libvirt(self, m: LineMap) -> LibvirtSettings:
        values: dict[str, Any] = {}
        if (uri := self.fields.string(m, "uri", "libvirt")) is not None:
            values["uri"] = uri
        return LibvirtSettings(**values)

    def _s3(self, m: LineMap) -> S3Settings:
        values: dict[str, Any] = {}
        endpoint = self._url(m, "endpoint", "s3", ("http", "https"))
        if endpoint is not None:
            values["endpoint"] = endpoint
        if (region := self.fields.string(m, "region", "s3")) is not None:
            values["region"] = region
        for key in ("access_key", "secret_key"):
            found = self._secret(m, _SECRETS[("s3", key)])
            if found is not None:
                values[key] = found[0]
        return S3Settings(**values)

    def _amqp(self, m: LineMap) -> AmqpSettings:
        values: dict[str, Any] = {}
        found = self._secret(m, _SECRETS[("amqp", "url")])
        if found is not None:
            url, origin = found
            if _url_scheme(url) in ("amqp", "amqps"):
                values["url"] = url
            else:
                self.problems.append(Problem(origin.file, origin.line, (
                    f"{origin.label}: expected an amqp:// or amqps:// URL "
                    "(the value is a secret and is not shown)")))
        if (exchange := self.fields.string(m, "exchange", "amqp")) is not None:
            values["exchange"] = exchange
        exchange_type = self.fields.choice(m, "exchange_type", "amqp", EXCHANGE_TYPES)
        if exchange_type is not None:
            values["exchange_type"] = exchange_type
        for key in ("routing_key", "queue"):
            if (text := self.fields.string(m, key, "amqp", empty_ok=True)) is not None:
                values[key] = text
        if (prefetch := self.fields.positive_int(m, "prefetch", "amqp")) is not None:
            values["prefetch"] = prefetch
        values.update(self._amqp_fleet(m))
        return AmqpSettings(**values)

    def _cache(self, m: LineMap) -> CacheSettings:
        values: dict[str, Any] = {}
        if (directory := self._path(m, "dir", "cache")) is not None:
            values["dir"] = directory
        for key in ("max_size", "max_virtual_size"):
            if key not in m:
                continue
            try:
                size = parse_size(m[key])
            except ValueError as exc:
                self.fields.report(m.value_line(key), f"cache.{key}: {exc}")
            else:
                if size > 0:
                    values[key] = size
                else:
                    self.fields.report(m.value_line(key), f"cache.{key}: must be larger than 0")
        downloads = self.fields.positive_int(m, "max_concurrent_downloads", "cache")
        if downloads is not None:
            values["max_concurrent_downloads"] = downloads
        return CacheSettings(**values)

    def _policies(self, m: LineMap) -> PoliciesSettings:
        directory = self._path(m, "dir", "policies")
        return PoliciesSettings() if directory is None else PoliciesSettings(dir=directory)

    def _http(self, m: LineMap) -> HttpSettings:
        listen = self.fields.string(m, "listen", "http", empty_ok=True)
        if listen is None:
            return HttpSettings()
        if not _is_listen_address(listen):
            self.fields.report(m.value_line("listen"), "http.listen: expected host:port "
                               f"(or \"\" to disable the server), got {describe(listen)}")
            return HttpSettings()
        return HttpSettings(listen=listen)

    def _volumes(self, m: LineMap) -> VolumesSettings:
        allow: list[str] = []
        for glob, line in self.fields.string_list(m, "allow", "volumes") or []:
            if glob.startswith("/"):
                allow.append(glob)
            else:
                self.fields.report(line, "volumes.allow: expected an absolute path glob "
                                         f"such as /dev/vg0/*, got {describe(glob)}")
        vgs: list[str] = []
        for name, line in self.fields.string_list(m, "lvm_vgs", "volumes") or []:
            if _VG_NAME.match(name) and name not in (".", ".."):
                vgs.append(name)
            else:
                self.fields.report(line, "volumes.lvm_vgs: expected a volume group name "
                                         f"(letters, digits, + _ . -), got {describe(name)}")
        return VolumesSettings(allow=tuple(allow), lvm_vgs=tuple(vgs))

    def _reprovision(self, m: LineMap) -> ReprovisionSettings:
        limit = self.fields.positive_int(m, "max_concurrent", "reprovision")
        return ReprovisionSettings() if limit is None else ReprovisionSettings(max_concurrent=limit)

    def _tracing(self, m: LineMap) -> TracingSettings:
        if m.get("otlp_endpoint") == "":
            return TracingSettings(otlp_endpoint="")
        endpoint = self._url(m, "otlp_endpoint", "tracing", ("http", "https"))
        return TracingSettings() if endpoint is None else TracingSettings(otlp_endpoint=endpoint)

    # --- fleet sections

    def _host(self, m: LineMap) -> HostSettings:
        name = self.fields.string(m, "name", "host", empty_ok=True)
        if name is None or name == "":
            return HostSettings()
        if not is_host_name(name):
            self.fields.report(m.value_line("name"), f"host.name: expected {HOST_NAME_RULE} "
                                                     f"(it names a queue and an S3 key), "
                                                     f"got {describe(name)}")
            return HostSettings()
        return HostSettings(name=name)

    def _fleet(self, m: LineMap) -> FleetSettings:
        bucket = self.fields.string(m, "status_bucket", "fleet", empty_ok=True)
        if bucket and not _BUCKET_NAME.fullmatch(bucket):
            self.fields.report(m.value_line("status_bucket"), "fleet.status_bucket: expected an "
                               f"S3 bucket name (3-63 of a-z 0-9 . -), got {describe(bucket)}")
            return FleetSettings()
        return FleetSettings(status_bucket=bucket or "")

    def _prewarm(self, m: LineMap) -> PrewarmSettings:
        value = m.get("spread")
        if value == 0 and not isinstance(value, bool):
            return PrewarmSettings()  # 0, the default, is off
        spread = self.fields.positive_number(m, "spread", "prewarm")
        return PrewarmSettings() if spread is None else PrewarmSettings(spread=spread)

    def _amqp_fleet(self, m: LineMap) -> dict[str, Any]:
        values: dict[str, Any] = {}
        if (queue_type := self.fields.choice(m, "queue_type", "amqp", QUEUE_TYPES)) is not None:
            values["queue_type"] = queue_type
        limit = self.fields.positive_int(m, "delivery_limit", "amqp")
        if limit is not None:
            values["delivery_limit"] = limit
        return values

    # --- value kinds

    def _path(self, m: LineMap, key: str, where: str) -> Path | None:
        text = self.fields.string(m, key, where)
        return None if text is None else self.base / text  # absolute paths stay as they are

    def _url(self, m: LineMap, key: str, where: str, schemes: tuple[str, ...]) -> str | None:
        text = self.fields.string(m, key, where)
        if text is None:
            return None
        if _url_scheme(text) not in schemes or not urlsplit(text).netloc:
            wanted = " or ".join(f"{scheme}://" for scheme in schemes)
            self.fields.report(m.value_line(key), f"{field_path(where, key)}: expected a URL "
                                                  f"starting with {wanted}, got {describe(text)}")
            return None
        return text

    def _secret(self, m: LineMap, spec: _SecretSpec) -> tuple[str, _Origin] | None:
        """The secret from the first source that sets it, or None to keep the default."""
        where, key, file_key = spec.section, spec.key, f"{spec.key}_file"
        inline = self.fields.string(m, key, where, secret=True, empty_ok=spec.empty_ok)
        file_name = self.fields.string(m, file_key, where)
        if key in m and file_key in m:
            self.fields.report(m.key_line(file_key),
                               f"{where}: set either {key!r} or {file_key!r}, not both")
        from_env = self.environ.get(spec.env, "")
        if from_env:
            return from_env, _Origin(ENVIRONMENT, 0, spec.env)
        if inline is not None:
            return inline, _Origin(self.fields.file, m.value_line(key), field_path(where, key))
        if file_name is not None:
            origin = _Origin(self.fields.file, m.value_line(file_key), field_path(where, file_key))
            value = self._read_secret_file(self.base / file_name, origin)
            return None if value is None else (value, origin)
        credentials = self.environ.get("CREDENTIALS_DIRECTORY", "")
        if credentials:
            path = Path(credentials) / spec.credential
            # The unit's SetCredential= fallback is an empty credential: treat it as unset.
            if path.exists() and path.read_bytes().strip():
                origin = _Origin(str(path), 0, f"credential {spec.credential}")
                value = self._read_secret_file(path, origin)
                return None if value is None else (value, origin)
        return None

    def _read_secret_file(self, path: Path, origin: _Origin) -> str | None:
        """The secret held in ``path`` without surrounding whitespace; None after a problem."""
        try:
            value = path.read_text(encoding="utf-8").strip()
        except UnicodeDecodeError:
            reason = "is not UTF-8 text"
        except OSError as exc:
            reason = f"cannot be read: {exc.strerror or exc}"
        else:
            if value:
                return value
            reason = "is empty"
        self.problems.append(Problem(origin.file, origin.line,
                                     f"{origin.label}: the secret file {path} {reason}"))
        return None


def _url_scheme(url: str) -> str:
    try:
        return urlsplit(url).scheme.lower()
    except ValueError:
        return ""


def _is_listen_address(listen: str) -> bool:
    """``host:port`` or ``[v6addr]:port`` with a port 0-65535; "" disables the server."""
    if listen == "":
        return True
    host, colon, port = listen.rpartition(":")
    if not colon or not host or not (port.isascii() and port.isdigit()) or int(port) > 65535:
        return False
    if host.startswith("["):
        return host.endswith("]") and len(host) > 2
    return ":" not in host and not any(c.isspace() for c in host)
