"""Loading the daemon config: YAML in, a validated ``Config`` (``watcher.settings``) out.

Why it exists: an operator fixes a config in one round, so ``load_config`` reports every
mistake as ``file:line: message`` (unknown keys included) instead of stopping at the first.
One reader serves every setting: it walks the fields of the settings dataclasses, so their
names are the allowed keys, their defaults fill what the file leaves out or gets wrong, and
their kind (``watcher.settings.KINDS``) picks how a value is checked. Relative paths are
relative to the config file. Checks that involve several fields are the named functions of
``CROSS_FIELD_RULES``, run once every field is read.

Secrets (the S3 keys and the AMQP URL) have sources of their own: ``watcher.config_secrets``.

``load_policy_dir`` reads the policy directory for start-up and SIGHUP, and ``check_config``
backs the ``check`` command: problems, plus warnings that do not fail it (an inline secret
in a file that group or others can read).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import Field, dataclass, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from watcher.config_secrets import (
    SecretReader,
    SecretSpec,
    exposed_secrets,
    has_credentials,
    url_scheme,
)
from watcher.core.errors import ConfigError, Problem
from watcher.core.policy import PolicySet
from watcher.core.policy_load import parse_policies
from watcher.core.units import parse_size
from watcher.core.yamlsource import FieldReader, LineMap, describe, field_path, parse_yaml
from watcher.settings import Config

DEFAULT_CONFIG_PATH = Path("/etc/libvirt-volume-watcher/config.yaml")
POLICY_SUFFIXES = (".yaml", ".yml")


# --- the keys, from the settings dataclasses ------------------------------------------------


def config_keys(cls: type[Any]) -> tuple[str, ...]:
    """The keys a mapping read into ``cls`` may hold: a secret also has ``<key>_file``."""
    keys = [f.name for f in fields(cls) if "kind" in f.metadata]
    return (*keys, *(f"{f.name}_file" for f in fields(cls) if f.metadata.get("kind") == "secret"))


SECTIONS: Mapping[str, type[Any]] = {
    f.name: f.metadata["cls"] for f in fields(Config) if f.metadata.get("kind") == "section"}
SECTION_KEYS = {name: config_keys(cls) for name, cls in SECTIONS.items()}
TOP_LEVEL_KEYS = config_keys(Config)


# --- checks of several fields together --------------------------------------------------------

Written = Mapping[str, LineMap]
"""The mapping of each section as written ("" is the top level), for lines and raw values."""
Rule = Callable[[Config, Written], Iterator[tuple[int, str]]]
"""A cross-field rule: given the config read and the file, the ``(line, message)`` it breaks."""


def _given(mapping: LineMap, key: str) -> bool:
    """Whether the file sets ``key`` to something, valid or not ("" and null do not count)."""
    return bool(mapping.get(key))


def api_listener_needs_a_pool(config: Config, written: Written) -> Iterator[tuple[int, str]]:
    """An API listener needs the libvirt pool its volumes live in."""
    pool = written["api"].get("pool")
    if config.api.listen and not (isinstance(pool, str) and pool):
        yield written["api"].key_line("listen"), (
            "api.pool: required when api.listen is set (the libvirt pool holding the API's "
            "volumes)")


def api_listener_needs_authentication(config: Config,
                                      written: Written) -> Iterator[tuple[int, str]]:
    """There is no unauthenticated API: a listener needs tokens or client certificates."""
    api = written["api"]
    if config.api.listen and not (_given(api, "tokens_file") or _given(api, "client_ca")):
        yield api.key_line("listen"), ("api: with listen set, tokens_file or client_ca is "
                                       "required (there is no unauthenticated API)")


def tls_needs_a_certificate_and_its_key(config: Config,
                                        written: Written) -> Iterator[tuple[int, str]]:
    """HTTPS takes both halves: ``tls_cert`` and ``tls_key`` are set together or not at all."""
    api = written["api"]
    for key, other in (("tls_cert", "tls_key"), ("tls_key", "tls_cert")):
        if _given(api, key) and not _given(api, other):
            yield api.key_line(key), f"api.{key}: needs api.{other} as well"


def client_certificates_need_tls(config: Config, written: Written) -> Iterator[tuple[int, str]]:
    """Client certificates are checked in the TLS handshake, so ``client_ca`` needs TLS."""
    api = written["api"]
    if _given(api, "client_ca") and not _given(api, "tls_cert"):
        yield api.key_line("client_ca"), ("api.client_ca: needs api.tls_cert and api.tls_key "
                                          "(client certificates need TLS)")


CROSS_FIELD_RULES: tuple[Rule, ...] = (
    api_listener_needs_a_pool,
    api_listener_needs_authentication,
    tls_needs_a_certificate_and_its_key,
    client_certificates_need_tls,
)


# --- loading -------------------------------------------------------------------------------


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
        self.kinds: Mapping[str, Callable[[LineMap, Field[Any], str], object]] = {
            "text": self._text, "seconds": self._seconds, "size": self._size,
            "path": self._path, "file": self._file, "url": self._url, "list": self._list,
            "choice": lambda m, f, where: self.fields.choice(m, f.name, where,
                                                             f.metadata["choices"]),
            "count": lambda m, f, where: self.fields.positive_int(m, f.name, where),
            "secret": lambda m, f, where: self.secrets.read(m, SecretSpec.of(where, f))}

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
        top = self._document()
        if top is None:
            return None
        self.fields.check_keys(top, TOP_LEVEL_KEYS, "")
        written: dict[str, LineMap] = {"": top}
        for name in SECTIONS:
            mapping = self.fields.section(top, name, "")
            if mapping is not None:
                self.fields.check_keys(mapping, SECTION_KEYS[name], name)
                written[name] = mapping
        sections: dict[str, Any] = {}
        for name, cls in SECTIONS.items():
            before, was_mapping = len(self.problems), name in written
            mapping = written.setdefault(name, LineMap(top.key_line(name)))
            sections[name] = cls(**self._values(mapping, cls, name))
            if name == "policies":
                self.policies_dir_ok = was_mapping and len(self.problems) == before
        config = Config(**sections, **self._values(top, Config, ""), source=self.path.absolute())
        for rule in CROSS_FIELD_RULES:
            for line, message in rule(config, written):
                self.fields.report(line, message)
        return config

    def _document(self) -> LineMap | None:
        """The top-level mapping of the file (empty for an empty file), None after a problem."""
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
            return None if document.problems else LineMap(1)  # an empty file: every default
        if not isinstance(top, LineMap):
            self.fields.report(document.line, f"the config must be a mapping of sections, "
                                              f"got {describe(top)}")
            return None
        return top

    def _values(self, mapping: LineMap, cls: type[Any], where: str) -> dict[str, Any]:
        """The valid values of ``mapping`` by field; absent or invalid ones keep the default."""
        values = {}
        for setting in fields(cls):  # sections and ``source`` have no kind of value
            read = self.kinds.get(setting.metadata.get("kind", ""))
            value = None if read is None else read(mapping, setting, where)
            if value is not None:
                values[setting.name] = value
        return values

    # --- one reader per kind: the value, or None (absent, or invalid and reported)

    def _text(self, m: LineMap, f: Field[Any], where: str) -> str | None:
        value = self.fields.string(m, f.name, where, empty_ok=f.metadata.get("empty_ok", False))
        return self._checked(m, f, where, value)

    def _checked(self, m: LineMap, f: Field[Any], where: str, value: str | None,
                 line: int | None = None) -> str | None:
        """``value`` unless the field's ``valid`` refuses it; an empty value is not checked."""
        valid = f.metadata.get("valid")
        if not value or valid is None or valid(value):
            return value
        self.fields.report(line or m.value_line(f.name), f"{field_path(where, f.name)}: "
                           f"expected {f.metadata['expected']}, got {describe(value)}")
        return None

    def _seconds(self, m: LineMap, f: Field[Any], where: str) -> float | None:
        """A number larger than 0; 0 too when it turns the feature off (``zero_off``)."""
        value = m.get(f.name)
        if f.metadata.get("zero_off") and value == 0 and not isinstance(value, bool):
            return 0.0
        return self.fields.positive_number(m, f.name, where)

    def _size(self, m: LineMap, f: Field[Any], where: str) -> int | None:
        """A size such as ``100GiB`` or ``512M`` in bytes, larger than 0."""
        if f.name not in m:
            return None
        try:
            size = parse_size(m[f.name])
            if size <= 0:
                raise ValueError("must be larger than 0")
        except ValueError as exc:
            self.fields.report(m.value_line(f.name), f"{field_path(where, f.name)}: {exc}")
            return None
        return size

    def _path(self, m: LineMap, f: Field[Any], where: str) -> Path | None:
        text = self.fields.string(m, f.name, where)
        return None if text is None else self.base / text  # absolute paths stay as they are

    def _file(self, m: LineMap, f: Field[Any], where: str) -> Path | None:
        """An optional file: unset or "" is None, else a file that must exist."""
        text = self.fields.string(m, f.name, where, empty_ok=True)
        if not text:
            return None  # "" is the same as not setting it
        path = self.base / text
        if not path.is_file():
            self.fields.report(m.value_line(f.name), f"{field_path(where, f.name)}: no such "
                                                     f"file: {path}")
            return None
        return path

    def _url(self, m: LineMap, f: Field[Any], where: str) -> str | None:
        """A URL with one of the field's ``schemes``; "" too with ``empty_ok``."""
        if f.metadata.get("empty_ok") and m.get(f.name) == "":
            return ""
        text = self.fields.string(m, f.name, where)
        if text is None:
            return None
        name, line, schemes = field_path(where, f.name), m.value_line(f.name), f.metadata["schemes"]
        if url_scheme(text) not in schemes or not urlsplit(text).netloc:
            wanted = " or ".join(f"{scheme}://" for scheme in schemes)
            self.fields.report(line, f"{name}: expected a URL starting with {wanted}, "
                                     f"got {describe(text)}")
            return None
        if f.metadata.get("no_credentials") and has_credentials(text):
            self.fields.report(line, (
                f"{name}: credentials do not belong in the URL (the value is not shown); "
                f"set {f.metadata['no_credentials']}, best through credential files"))
            return None
        return text

    def _list(self, m: LineMap, f: Field[Any], where: str) -> tuple[str, ...] | None:
        """A list of non-empty strings, each passing the field's ``valid``; null is empty."""
        items = self.fields.string_list(m, f.name, where)
        if items is None:
            return None
        checked = [self._checked(m, f, where, item, line) for item, line in items]
        return tuple(item for item in checked if item is not None)
