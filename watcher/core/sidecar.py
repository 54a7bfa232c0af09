"""The ``.sha256`` sidecar next to each image: the digest a download must match.

Operators produce sidecars with ``sha256sum`` (``<hex>  <name>``, ``<hex> *<name>`` in
binary mode), ``sha256sum --tag`` (``SHA256 (<name>) = <hex>``) or by writing the bare
digest. A sidecar with one entry vouches for the object it sits beside whatever file name
the entry gives: images are often renamed on upload (``sha256sum`` ran on the build's file
name), and the digest, not the name, is what the download must match. A sidecar with
several entries (a ``SHA256SUMS`` list) yields the one entry naming this object; one that
stays ambiguous is rejected, since caching an image under a digest nobody vouched for
would defeat the verification.
"""

from __future__ import annotations

import posixpath
import re

from watcher.core.errors import ImageRejected

MAX_SIDECAR_BYTES = 4096
"""A sidecar holds one line; anything larger is not a sidecar."""

_DIGEST_LENGTH = 64
_PLAIN = re.compile(r"^(?P<digest>\S+)(?:[ \t]+\*?(?P<name>.+))?$")
_TAGGED = re.compile(r"^SHA256 ?\((?P<name>.+)\) ?= ?(?P<digest>\S+)$")
_HEX = re.compile(r"^[0-9a-fA-F]+$")


class MalformedSidecar(ImageRejected):
    """The sidecar cannot be read as the SHA-256 of this image."""

    def __init__(self, message: str) -> None:
        super().__init__("bad_sidecar", message)


def parse_sidecar(content: bytes, object_name: str | None = None) -> str:
    """Return the lowercase hex SHA-256 a sidecar declares.

    One entry is the digest, whatever name it gives. Of several different entries, the one
    whose file name is ``object_name``'s (compared by basename) is; raises
    ``MalformedSidecar`` when that does not single out one digest, or the content is not a
    sidecar.
    """
    if len(content) > MAX_SIDECAR_BYTES:
        raise MalformedSidecar(f"sidecar is {len(content)} bytes, over {MAX_SIDECAR_BYTES}")
    try:
        text = content.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise MalformedSidecar("sidecar is not UTF-8 text") from None

    entries = {_parse_line(line) for line in text.splitlines() if line.strip()}
    if not entries:
        raise MalformedSidecar("sidecar is empty")
    digests = {digest for digest, _name in entries}
    if len(digests) == 1:
        return digests.pop()
    if object_name is not None:
        expected = posixpath.basename(object_name)
        named = {digest for digest, name in entries
                 if name is not None and posixpath.basename(name) == expected}
        if len(named) == 1:
            return named.pop()
        if len(named) > 1:
            raise MalformedSidecar(f"sidecar gives {len(named)} different digests for {expected!r}")
        raise MalformedSidecar(
            f"sidecar holds {len(digests)} different digests and none for {expected!r}")
    raise MalformedSidecar(f"sidecar holds {len(digests)} different digests, expected one")


def _parse_line(line: str) -> tuple[str, str | None]:
    """``(lowercase digest, named file or None)`` of one non-blank sidecar line."""
    stripped = line.strip()
    match = _TAGGED.match(stripped) or _PLAIN.match(stripped)
    assert match is not None  # _PLAIN matches any non-blank stripped line
    digest = match["digest"]
    if not _HEX.match(digest):
        raise MalformedSidecar(f"sidecar digest {_shorten(digest)!r} is not hexadecimal")
    if len(digest) != _DIGEST_LENGTH:
        raise MalformedSidecar(
            f"sidecar digest has {len(digest)} hex digits, a SHA-256 has {_DIGEST_LENGTH}"
        )
    name = match["name"]
    if name is not None:
        name = name.strip()
        name = name.removeprefix("./") or None
    return digest.lower(), name


def _shorten(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[:limit] + "..."
