"""Secrets of the daemon config: where each one comes from, and when one is exposed.

Why it exists: a secret is not read like other settings. The first of its sources wins:
the environment (``LVW_S3_ACCESS_KEY``...), the config file (the key itself, or
``<key>_file`` naming a file that holds it), then a systemd credential (``s3-access-key``...
in ``$CREDENTIALS_DIRECTORY``). Its value must never reach ``repr()`` or a message, so
problems name the source instead, and ``check`` warns about a secret written in a config
file that group or others can read. Kept apart, ``watcher.config`` reads the rest alike.
"""

from __future__ import annotations

import stat
from collections.abc import Mapping
from dataclasses import Field, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from watcher.core.errors import Problem
from watcher.core.yamlsource import FieldReader, LineMap, field_path

ENVIRONMENT = "environment"
"""The ``file`` of a Problem about an environment variable."""


@dataclass(frozen=True)
class SecretSpec:
    """One secret setting and the names it goes by in each source."""

    section: str
    key: str
    env: str
    credential: str
    empty_ok: bool
    schemes: tuple[str, ...] = ()
    """For a URL: the schemes it may have; inline, it counts as a secret only with a password."""

    @classmethod
    def of(cls, section: str, setting: Field[Any]) -> SecretSpec:
        """The spec a ``kind="secret"`` field of ``watcher.settings`` declares."""
        meta = setting.metadata
        return cls(section, setting.name, meta["env"], meta["credential"],
                   meta.get("empty_ok", False), meta.get("schemes", ()))


@dataclass(frozen=True)
class Origin:
    """Where a secret came from, to point at it without showing it."""

    file: str
    line: int
    label: str


class SecretReader:
    """Resolves secrets for one config file, noting problems in its ``FieldReader``."""

    def __init__(self, fields: FieldReader, base: Path, environ: Mapping[str, str]) -> None:
        self.fields = fields
        self.base = base
        self.environ = environ
        self.inline: list[Origin] = []
        """Secrets written in the config file itself (an AMQP URL only with a password)."""

    def read(self, m: LineMap, spec: SecretSpec) -> str | None:
        """The secret from the first source that sets it, or None to keep the default."""
        found = self._find(m, spec)
        if found is None or not spec.schemes:
            return None if found is None else found[0]
        value, origin = found
        if url_scheme(value) in spec.schemes:
            return value
        wanted = " or ".join(f"{scheme}://" for scheme in spec.schemes)
        self.fields.problems.append(Problem(origin.file, origin.line, (
            f"{origin.label}: expected an {wanted} URL (the value is a secret and is not shown)")))
        return None

    def _find(self, m: LineMap, spec: SecretSpec) -> tuple[str, Origin] | None:
        where, key, file_key = spec.section, spec.key, f"{spec.key}_file"
        inline = self.fields.string(m, key, where, secret=True, empty_ok=spec.empty_ok)
        file_name = self.fields.string(m, file_key, where)
        if key in m and file_key in m:
            self.fields.report(m.key_line(file_key),
                               f"{where}: set either {key!r} or {file_key!r}, not both")
        if inline and (not spec.schemes or has_credentials(inline, password_only=True)):
            # Still in the file when the environment overrides it.
            self.inline.append(Origin(self.fields.file, m.value_line(key), field_path(where, key)))
        from_env = self.environ.get(spec.env, "")
        if from_env:
            return from_env, Origin(ENVIRONMENT, 0, spec.env)
        if inline is not None:
            return inline, Origin(self.fields.file, m.value_line(key), field_path(where, key))
        if file_name is not None:
            origin = Origin(self.fields.file, m.value_line(file_key), field_path(where, file_key))
            value = self._read_file(self.base / file_name, origin)
            return None if value is None else (value, origin)
        credentials = self.environ.get("CREDENTIALS_DIRECTORY", "")
        if credentials:
            path = Path(credentials) / spec.credential
            # The unit's SetCredential= fallback is an empty credential: treat it as unset.
            if path.exists() and path.read_bytes().strip():
                origin = Origin(str(path), 0, f"credential {spec.credential}")
                value = self._read_file(path, origin)
                return None if value is None else (value, origin)
        return None

    def _read_file(self, path: Path, origin: Origin) -> str | None:
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
        self.fields.problems.append(Problem(origin.file, origin.line,
                                            f"{origin.label}: the secret file {path} {reason}"))
        return None


def exposed_secrets(path: Path, inline: list[Origin]) -> list[Problem]:
    """A warning per secret written in the config file when group or others can read it."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return []
    readers = [who for who, bit in (("group", stat.S_IRGRP), ("others", stat.S_IROTH))
               if mode & bit]
    if not readers:
        return []
    return [Problem(origin.file, origin.line, (
        f"warning: {origin.label} is a secret written in a file readable by "
        f"{' and '.join(readers)} (mode {stat.S_IMODE(mode):04o}); move it to a credential "
        f"file or a *_file setting, or chmod 600 {path}"))
        for origin in sorted(inline, key=lambda origin: origin.line)]


def url_scheme(url: str) -> str:
    """The scheme of ``url`` in lower case; "" when it is not a URL at all."""
    try:
        return urlsplit(url).scheme.lower()
    except ValueError:
        return ""


def has_credentials(url: str, *, password_only: bool = False) -> bool:
    """Whether the URL carries a password (or, unless ``password_only``, a user name)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    return parts.password is not None or (not password_only and parts.username is not None)
