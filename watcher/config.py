"""Loading the daemon config: YAML in, a validated ``Config`` (``watcher.settings``) out.

Why it exists: an operator fixes a config in one round, so ``load_config`` reports every
mistake as ``file:line: message`` (unknown keys included) instead of stopping at the first.
Each section is built with explicit keyword arguments from the values that passed, so a
renamed setting is a type error here, not a silently ignored key. Relative paths are
relative to the config file.

Secrets (the S3 keys and the AMQP URL) have sources of their own: ``watcher.config_secrets``.

``load_policy_dir`` reads the policy directory for start-up and SIGHUP, and ``check_config``
backs the ``check`` command: problems, plus warnings that do not fail it (an inline secret
in a file that group or others can read).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

from watcher.config_secrets import (
    SecretReader,
    SecretSpec,
    exposed_secrets,
    has_credentials,
    url_scheme,
)
from watcher.core.address import parse_listen
from watcher.core.errors import ConfigError, Problem
from watcher.core.fleet import HOST_NAME_RULE, is_host_name
from watcher.core.policy import PolicySet
from watcher.core.policy_load import parse_policies
from watcher.core.units import parse_size
from watcher.core.yamlsource import FieldReader, LineMap, describe, field_path, parse_yaml
from watcher.settings import (
    LOG_LEVELS,
    AmqpSettings,
    ApiSettings,
    CacheSettings,
    Config,
    FleetSettings,
    HostSettings,
    HttpSettings,
    LibvirtSettings,
    LogSettings,
    PoliciesSettings,
    PrewarmSettings,
    ReprovisionSettings,
    S3Settings,
    StateSettings,
    TracingSettings,
    VolumesSettings,
)

T = TypeVar("T")

DEFAULT_CONFIG_PATH = Path("/etc/libvirt-volume-watcher/config.yaml")


# --- loading -------------------------------------------------------------------------------

EXCHANGE_TYPES = ("direct", "fanout", "topic", "headers")
QUEUE_TYPES = ("classic", "quorum")
SECTION_KEYS: Mapping[str, tuple[str, ...]] = {
    "libvirt": ("uri",),
    "s3": ("endpoint", "access_key", "access_key_file", "secret_key", "secret_key_file",
           "region"),
    "amqp": ("url", "url_file", "exchange", "exchange_type", "routing_key", "queue", "prefetch",
             "queue_type", "delivery_limit"),
    "cache": ("dir", "max_size", "max_virtual_size", "max_concurrent_downloads",
              "stale_sidecar_hold"),
    "policies": ("dir",),
    "http": ("listen",),
    "volumes": ("allow", "lvm_vgs"),
    "reprovision": ("max_concurrent",),
    "tracing": ("otlp_endpoint",),
    # fleet: many hosts on one bucket and one broker
    "host": ("name",),
    "fleet": ("status_bucket",),
    "prewarm": ("spread",),
    # the HTTP job API and its durable state
    "api": ("listen", "tokens_file", "tls_cert", "tls_key", "client_ca", "pool"),
    "state": ("dir",),
    "log": ("level",),
}
TOP_LEVEL_KEYS = (*SECTION_KEYS, "reconcile_interval")
POLICY_SUFFIXES = (".yaml", ".yml")

_VG_NAME = re.compile(r"^[A-Za-z0-9+_.][A-Za-z0-9+_.-]{0,126}$")
_BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


_SECRETS = {
    ("s3", "access_key"): SecretSpec("s3", "access_key", "LVW_S3_ACCESS_KEY", "s3-access-key",
                                     empty_ok=True),
    ("s3", "secret_key"): SecretSpec("s3", "secret_key", "LVW_S3_SECRET_KEY", "s3-secret-key",
                                     empty_ok=True),
    ("amqp", "url"): SecretSpec("amqp", "url", "LVW_AMQP_URL", "amqp-url", empty_ok=False,
                                schemes=("amqp", "amqps")),
}


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


@dataclass(frozen=True)
class CheckReport:
    """What ``check`` found: problems fail it, warnings are only shown."""

    problems: list[Problem]
    warnings: list[Problem]


def check_config(config_path: Path, environ: Mapping[str, str] | None = None) -> CheckReport:
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
    return CheckReport(problems, exposed_secrets(config_path, reader.secrets.inline))


def check_all(config_path: Path, environ: Mapping[str, str] | None = None) -> list[Problem]:
    """The problems of ``check_config``, without its warnings."""
    return check_config(config_path, environ).problems


class _ConfigReader:
    """One pass over a config file: builds a Config from the valid parts, notes the rest."""

    def __init__(self, path: Path, environ: Mapping[str, str]) -> None:
        self.path = path
        self.base = path.absolute().parent
        self.fields = FieldReader(str(path))
        self.secrets = SecretReader(self.fields, self.base, environ)
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
            api=self._api(sections["api"]),
            state=StateSettings(dir=_given(self._path(sections["state"], "dir", "state"),
                                           StateSettings().dir)),
            log=LogSettings(level=self.fields.choice(sections["log"], "level", "log",
                                                     LOG_LEVELS)),
            source=self.path.absolute(),
        )

    # --- sections: each is built from the valid values, with defaults for the rest

    def _libvirt(self, m: LineMap) -> LibvirtSettings:
        default = LibvirtSettings()
        uri = self.fields.string(m, "uri", "libvirt")
        return LibvirtSettings(uri=_given(uri, default.uri))

    def _s3(self, m: LineMap) -> S3Settings:
        default = S3Settings()
        endpoint = self._url(m, "endpoint", "s3", ("http", "https"))
        if endpoint is not None and has_credentials(endpoint):
            self.fields.report(m.value_line("endpoint"), (
                "s3.endpoint: credentials do not belong in the URL (the value is not shown); "
                "set s3.access_key and s3.secret_key, best through credential files"))
            endpoint = None
        region = self.fields.string(m, "region", "s3")
        access_key = self.secrets.read(m, _SECRETS[("s3", "access_key")])
        secret_key = self.secrets.read(m, _SECRETS[("s3", "secret_key")])
        return S3Settings(
            endpoint=_given(endpoint, default.endpoint),
            access_key=_given(access_key, default.access_key),
            secret_key=_given(secret_key, default.secret_key),
            region=_given(region, default.region),
        )

    def _amqp(self, m: LineMap) -> AmqpSettings:
        default = AmqpSettings()
        url = self.secrets.read(m, _SECRETS[("amqp", "url")])
        exchange = self.fields.string(m, "exchange", "amqp")
        exchange_type = self.fields.choice(m, "exchange_type", "amqp", EXCHANGE_TYPES)
        routing_key = self.fields.string(m, "routing_key", "amqp", empty_ok=True)
        queue = self.fields.string(m, "queue", "amqp", empty_ok=True)
        prefetch = self.fields.positive_int(m, "prefetch", "amqp")
        queue_type = self.fields.choice(m, "queue_type", "amqp", QUEUE_TYPES)
        delivery_limit = self.fields.positive_int(m, "delivery_limit", "amqp")
        return AmqpSettings(
            url=_given(url, default.url),
            exchange=_given(exchange, default.exchange),
            exchange_type=_given(exchange_type, default.exchange_type),
            routing_key=_given(routing_key, default.routing_key),
            queue=_given(queue, default.queue),
            prefetch=_given(prefetch, default.prefetch),
            queue_type=_given(queue_type, default.queue_type),
            delivery_limit=_given(delivery_limit, default.delivery_limit),
        )

    def _cache(self, m: LineMap) -> CacheSettings:
        default = CacheSettings()
        directory = self._path(m, "dir", "cache")
        max_size = self._size(m, "max_size", "cache")
        max_virtual_size = self._size(m, "max_virtual_size", "cache")
        downloads = self.fields.positive_int(m, "max_concurrent_downloads", "cache")
        hold = m.get("stale_sidecar_hold")
        if not (hold == 0 and not isinstance(hold, bool)):  # 0 is off
            hold = self.fields.positive_number(m, "stale_sidecar_hold", "cache")
        return CacheSettings(
            dir=_given(directory, default.dir),
            max_size=_given(max_size, default.max_size),
            max_virtual_size=_given(max_virtual_size, default.max_virtual_size),
            max_concurrent_downloads=_given(downloads, default.max_concurrent_downloads),
            stale_sidecar_hold=float(_given(hold, default.stale_sidecar_hold)),
        )

    def _policies(self, m: LineMap) -> PoliciesSettings:
        directory = self._path(m, "dir", "policies")
        return PoliciesSettings(dir=_given(directory, PoliciesSettings().dir))

    def _http(self, m: LineMap) -> HttpSettings:
        return HttpSettings(listen=_given(self._listen(m, "http"), HttpSettings().listen))

    def _listen(self, m: LineMap, where: str) -> str | None:
        listen = self.fields.string(m, "listen", where, empty_ok=True)
        if listen is not None and listen != "":
            try:
                parse_listen(listen)
            except ValueError:
                self.fields.report(m.value_line("listen"), f"{where}.listen: expected host:port "
                                   f"(or \"\" to disable the server), got {describe(listen)}")
                return None
        return listen

    def _api(self, m: LineMap) -> ApiSettings:
        """The API section; with ``listen`` set it must name a pool and a way to authenticate."""
        listen = self._listen(m, "api") or ""
        files = {key: self._existing_file(m, key, "api")
                 for key in ("tokens_file", "tls_cert", "tls_key", "client_ca")}
        pool = self.fields.string(m, "pool", "api", empty_ok=True) or ""
        if "/" in pool:
            self.fields.report(m.value_line("pool"), "api.pool: expected a libvirt pool name "
                                                     f"(no '/'), got {describe(pool)}")
        given = {key for key in files if m.get(key)}  # set, whether or not the file exists
        line = m.key_line("listen")
        if listen and not pool:
            self.fields.report(line, "api.pool: required when api.listen is set "
                                     "(the libvirt pool holding the API's volumes)")
        if listen and not given & {"tokens_file", "client_ca"}:
            self.fields.report(line, "api: with listen set, tokens_file or client_ca is "
                                     "required (there is no unauthenticated API)")
        for key, other in (("tls_cert", "tls_key"), ("tls_key", "tls_cert")):
            if key in given and other not in given:
                self.fields.report(m.key_line(key), f"api.{key}: needs api.{other} as well")
        if "client_ca" in given and "tls_cert" not in given:
            self.fields.report(m.key_line("client_ca"), "api.client_ca: needs api.tls_cert and "
                               "api.tls_key (client certificates need TLS)")
        return ApiSettings(listen=listen, pool=pool, **files)

    def _existing_file(self, m: LineMap, key: str, where: str) -> Path | None:
        """An optional file setting: unset or "" is None, else a file that must exist."""
        text = self.fields.string(m, key, where, empty_ok=True)
        if not text:
            return None  # "" is the same as not setting it
        path = self.base / text
        if not path.is_file():
            self.fields.report(m.value_line(key), f"{field_path(where, key)}: no such file: "
                                                  f"{path}")
            return None
        return path

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
        return ReprovisionSettings(max_concurrent=_given(limit,
                                                         ReprovisionSettings().max_concurrent))

    def _tracing(self, m: LineMap) -> TracingSettings:
        if m.get("otlp_endpoint") == "":
            return TracingSettings(otlp_endpoint="")
        endpoint = self._url(m, "otlp_endpoint", "tracing", ("http", "https"))
        return TracingSettings(otlp_endpoint=_given(endpoint, TracingSettings().otlp_endpoint))

    def _host(self, m: LineMap) -> HostSettings:
        name = self.fields.string(m, "name", "host", empty_ok=True)
        if name and not is_host_name(name):
            self.fields.report(m.value_line("name"), f"host.name: expected {HOST_NAME_RULE} "
                                                     "(it names a queue and an S3 key), "
                                                     f"got {describe(name)}")
            name = None
        return HostSettings(name=_given(name, HostSettings().name))

    def _fleet(self, m: LineMap) -> FleetSettings:
        bucket = self.fields.string(m, "status_bucket", "fleet", empty_ok=True)
        if bucket and not _BUCKET_NAME.fullmatch(bucket):
            self.fields.report(m.value_line("status_bucket"), "fleet.status_bucket: expected an "
                               f"S3 bucket name (3-63 of a-z 0-9 . -), got {describe(bucket)}")
            bucket = None
        return FleetSettings(status_bucket=_given(bucket, FleetSettings().status_bucket))

    def _prewarm(self, m: LineMap) -> PrewarmSettings:
        value = m.get("spread")
        if value == 0 and not isinstance(value, bool):
            return PrewarmSettings(spread=0.0)  # 0, the default, is off
        spread = self.fields.positive_number(m, "spread", "prewarm")
        return PrewarmSettings(spread=_given(spread, PrewarmSettings().spread))

    # --- value kinds

    def _path(self, m: LineMap, key: str, where: str) -> Path | None:
        text = self.fields.string(m, key, where)
        return None if text is None else self.base / text  # absolute paths stay as they are

    def _size(self, m: LineMap, key: str, where: str) -> int | None:
        """A size such as ``100GiB`` or ``512M`` in bytes, larger than 0."""
        if key not in m:
            return None
        try:
            size = parse_size(m[key])
        except ValueError as exc:
            self.fields.report(m.value_line(key), f"{field_path(where, key)}: {exc}")
            return None
        if size <= 0:
            self.fields.report(m.value_line(key),
                               f"{field_path(where, key)}: must be larger than 0")
            return None
        return size

    def _url(self, m: LineMap, key: str, where: str, schemes: tuple[str, ...]) -> str | None:
        text = self.fields.string(m, key, where)
        if text is None:
            return None
        if url_scheme(text) not in schemes or not urlsplit(text).netloc:
            wanted = " or ".join(f"{scheme}://" for scheme in schemes)
            self.fields.report(m.value_line(key), f"{field_path(where, key)}: expected a URL "
                                                  f"starting with {wanted}, got {describe(text)}")
            return None
        return text


def _given(value: T | None, default: T) -> T:
    """``value`` when the file set it validly, else the setting's default."""
    return default if value is None else value
