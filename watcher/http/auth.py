"""Who may call the API: tokens from ``api.tokens_file`` and client certificates (mTLS).

Why it exists: there is no unauthenticated API (``check`` refuses one), and the rules
for credentials are worth keeping in one small place apart from the HTTP plumbing:

- A token is sent as ``Authorization: Bearer T`` or ``X-API-Token: T`` and compared with
  every configured token in constant time (``hmac.compare_digest``, no early exit), so
  the answer's timing tells nothing about how much of a token was right.
- A client certificate is verified by TLS itself against ``api.client_ca``
  (``CERT_OPTIONAL``: token clients connect without one). A certificate the CA did not
  sign fails the handshake: such a client never reaches HTTP, and gets no status code.
  A verified certificate authenticates on its own; a token sent alongside must still be
  right.
- No credentials at all and a wrong token are both 401 (with ``WWW-Authenticate:
  Bearer``), as the predecessor answers: its clients treat 401 as "fix the token".

The tokens file holds one token per line; blank lines and ``#`` comments are skipped. It
is read at start (a problem there stops the daemon) and again on SIGHUP, where a file
that cannot be read keeps the tokens in force.
"""

from __future__ import annotations

import hmac
import ssl
from enum import Enum
from pathlib import Path

from aiohttp import web

from watcher import telemetry
from watcher.settings import ApiSettings

log = telemetry.get_logger(component="http", listener="api")


class Verdict(Enum):
    ALLOWED = "allowed"
    NO_CREDENTIALS = "no_credentials"
    WRONG_CREDENTIALS = "wrong_credentials"


class Tokens:
    """The tokens of ``api.tokens_file``; none when the API authenticates by certificate only."""

    def __init__(self, path: Path | None) -> None:
        self._path = path
        self._tokens: tuple[bytes, ...] = read_tokens(path) if path is not None else ()

    def __len__(self) -> int:
        return len(self._tokens)

    def reload(self) -> bool:
        """Re-read the file; on a problem keep the tokens in force and say so."""
        if self._path is None:
            return True
        try:
            self._tokens = read_tokens(self._path)
        except (OSError, UnicodeDecodeError) as exc:
            log.error("api tokens not reloaded; keeping the previous ones",
                      file=str(self._path), error=str(exc))
            return False
        log.info("api tokens loaded", file=str(self._path), tokens=len(self._tokens))
        return True

    def accepts(self, presented: str) -> bool:
        given = presented.encode()
        found = False
        for token in self._tokens:  # every one, whatever matched: no early exit
            found |= hmac.compare_digest(token, given)
        return found


def read_tokens(path: Path) -> tuple[bytes, ...]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return tuple(line.strip().encode() for line in lines
                 if line.strip() and not line.lstrip().startswith("#"))


def presented_token(request: web.Request) -> str | None:
    """The token of ``Authorization: Bearer T`` or ``X-API-Token: T``, if either is sent."""
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    token = request.headers.get("X-API-Token", "").strip()
    return token or None


def has_verified_certificate(request: web.Request) -> bool:
    """True when the client presented a certificate TLS verified against ``client_ca``."""
    transport = request.transport
    return bool(transport is not None and transport.get_extra_info("peercert"))


def judge(request: web.Request, tokens: Tokens) -> Verdict:
    token = presented_token(request)
    if token is not None:
        return Verdict.ALLOWED if tokens.accepts(token) else Verdict.WRONG_CREDENTIALS
    return Verdict.ALLOWED if has_verified_certificate(request) else Verdict.NO_CREDENTIALS


def server_context(settings: ApiSettings) -> ssl.SSLContext | None:
    """The API's TLS context, verifying optional client certificates; None for plain HTTP."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(settings.tls_cert, settings.tls_key)
    if settings.client_ca is not None:
        context.load_verify_locations(cafile=settings.client_ca)
        context.verify_mode = ssl.CERT_OPTIONAL
    return context
