"""What the HTTP job API accepts: request bodies, headers and path values, validated.

Why it exists: the API is the one face that takes input from the network, and every value
it passes on ends up in an S3 request, a libvirt volume name, an LVM LV name or a database
row. Each is checked here, once, against the narrowest rule that the predecessor's clients
still meet; anything else is a ``BadRequest`` that names the field (a 400 for the client).
Pure: values in, frozen dataclasses out; no I/O.

Decisions the routes and their clients can rely on:

- Unknown body fields are ignored: the predecessor's clients send fields this daemon has
  no use for, and refusing them would break those clients for no safety gain.
- ``null`` for an optional field means "absent" (``image_type`` then defaults to qcow2).
- ``volume_size_gb`` is a JSON integer; a float with an integral value (``10.0``, as some
  serialisers write every number) is accepted as that integer; booleans, strings and
  fractions are refused.
- ``image_url`` may name any host, as the orchestrator knows the object store
  (``http://minio:9000/images/u.qcow2``): only its path (``/<bucket>/<key>``) is used,
  and the object is always read from the daemon's own ``s3.endpoint``, so no request
  can make the daemon contact another server. ``named_host`` records a host that differs,
  for one log line.
- ``image_url`` keys are percent-decoded exactly once, in both URL forms (an ``s3://`` URL
  is a URL too: a literal ``%`` in a key is written ``%25``). A key still holding an
  escape after that one decoding is refused as double-encoded.
"""

from __future__ import annotations

import ipaddress
import math
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, cast
from urllib.parse import SplitResult, quote, unquote, urlsplit

ImageType = Literal["qcow2", "raw"]
IMAGE_TYPES: tuple[ImageType, ...] = ("qcow2", "raw")
MAX_VOLUME_SIZE_GB = 65536
"""64 TiB: larger than any root disk, small enough that a typo is caught."""
MAX_URL_LENGTH = 2048
MAX_KEY_BYTES = 1024
"""S3's limit on an object key, in UTF-8 bytes."""
DEFAULT_POOL = "cloud-init"
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
MAX_OFFSET = 2**62
SIDECAR_SUFFIX = ".sha256"
GIB = 1024**3

_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")
_VOLUME_NAME = re.compile(r"[A-Za-z0-9+_][A-Za-z0-9+_.-]{0,126}")
_CORRELATION_ID = re.compile(r"[A-Za-z0-9._:/@+-]{1,128}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_DIGITS = re.compile(r"[0-9]{1,18}")
_DEFAULT_PORTS = {"http": 80, "https": 443}
# LVM refuses LV names with these prefixes or containing these strings (its own component
# and internal volumes use them; lvm(8), "VALID NAMES"). A few newer lvm2 releases added
# are included too: refusing them costs nothing.
_LVM_RESERVED_PREFIXES = ("snapshot", "pvmove")
_LVM_RESERVED_PARTS = (
    "_cdata", "_cmeta", "_corig", "_cpool", "_cvol", "_imeta", "_iorig", "_mimage", "_mlog",
    "_pmspare", "_rimage", "_rmeta", "_tdata", "_tmeta", "_vdata", "_vorigin", "_wcorig",
)


class BadRequest(Exception):
    """An input the API refuses: ``field`` names it, ``message`` says what is wrong."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field} {message}")
        self.field = field
        self.message = message


class BodyTooLarge(BadRequest):
    """The upload's Content-Length is over the limit: a 413 rather than a 400."""


@dataclass(frozen=True)
class ImageRef:
    """An object of the daemon's own S3 endpoint."""

    bucket: str
    key: str
    """Decoded: the object's real key."""

    @property
    def url(self) -> str:
        """``s3://bucket/key``, the key percent-encoded where needed, so it parses back."""
        return f"s3://{self.bucket}/{quote(self.key, safe='/~')}"


@dataclass(frozen=True)
class ProvisionRequest:
    """``POST /api/v1/jobs``: write an image onto a volume of ``api.pool``."""

    image: ImageRef
    image_url: str
    """As the client sent it (echoed in the job's record)."""
    image_type: ImageType
    named_host: str | None
    """The URL's ``host[:port]`` when it is not the S3 endpoint's (never contacted)."""
    volume_name: str
    volume_size_gb: int
    correlation_id: str | None

    @property
    def volume_size(self) -> int:
        """The requested volume size in bytes."""
        return self.volume_size_gb * GIB


@dataclass(frozen=True)
class FetchRequest:
    """``POST /api/v1/cache/fetch``: only pre-warm the cache with an image."""

    image: ImageRef
    image_url: str
    image_type: ImageType
    named_host: str | None


@dataclass(frozen=True)
class UploadRequest:
    """``PUT /volumes/upload-content``: the headers that say where the body goes."""

    volume_name: str
    pool: str
    length: int
    """The body's size in bytes, from Content-Length."""


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _has_unsafe_char(text: str, *, allow_space: bool) -> bool:
    for char in text:
        if char == " ":
            if not allow_space:
                return True
            continue
        # Cc: NUL and other controls; Cf: invisible format marks (bidi overrides);
        # Cs: lone surrogates, which JSON can carry; Zl/Zp/Zs: line breaks and odd spaces.
        if unicodedata.category(char) in ("Cc", "Cf", "Cs", "Zl", "Zp", "Zs"):
            return True
    return False


def _endpoint(s3_endpoint: str) -> tuple[str, str, int, str]:
    """(scheme, host, port, path prefix) of the configured endpoint."""
    text = s3_endpoint if "://" in s3_endpoint else f"http://{s3_endpoint}"
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        raise ValueError(f"the S3 endpoint must be http(s)://host[:port], got {s3_endpoint!r}")
    return scheme, parts.hostname, parts.port or _DEFAULT_PORTS[scheme], parts.path.rstrip("/")


def _check_bucket(bucket: str, field: str) -> str:
    if not _BUCKET.fullmatch(bucket) or ".." in bucket or ".-" in bucket or "-." in bucket:
        raise BadRequest(field, f"names bucket {_shown(bucket)}, which is not a valid S3 "
                                "bucket name (3-63 of a-z 0-9 . -, starting and ending with "
                                "a letter or digit)")
    try:
        ipaddress.IPv4Address(bucket)
    except ValueError:
        return bucket
    raise BadRequest(field, f"names bucket {_shown(bucket)}, which looks like an IP address")


def _decode_key(raw: str, field: str) -> str:
    if raw.count("%") != len(_ESCAPE.findall(raw)):
        raise BadRequest(field, "has a % that does not start a %XX escape (write %25)")
    try:
        key = unquote(raw, encoding="utf-8", errors="strict")
    except UnicodeDecodeError:
        raise BadRequest(field, "has escapes that do not decode as UTF-8") from None
    if _ESCAPE.search(key):
        raise BadRequest(field, "has a key that is still percent-encoded after decoding "
                                "(double-encoded)")
    return key


def _check_key(key: str, field: str) -> str:
    if not key:
        raise BadRequest(field, "names no object key (expected <bucket>/<key>)")
    if len(key.encode("utf-8", errors="surrogatepass")) > MAX_KEY_BYTES:
        raise BadRequest(field, f"has a key longer than {MAX_KEY_BYTES} bytes")
    if _has_unsafe_char(key, allow_space=True) or "\\" in key:
        raise BadRequest(field, "has a key with a control character, backslash or unusual "
                                "space")
    if key.endswith("/"):
        raise BadRequest(field, "names a folder, not an object (the key ends in /)")
    if any(segment in ("", ".", "..") for segment in key.split("/")):
        raise BadRequest(field, "has a key with an empty, . or .. segment")
    if key.endswith(SIDECAR_SUFFIX):
        raise BadRequest(field, f"names a checksum sidecar ({SIDECAR_SUFFIX}), not an image")
    return key


def _split_image_url(url: object, field: str) -> tuple[str, SplitResult]:
    """The URL's scheme (lower case) and parts, after the checks every form shares."""
    if not isinstance(url, str):
        raise BadRequest(field, f"must be a string, got {_shown(url)}")
    if not url:
        raise BadRequest(field, "is required")
    if len(url) > MAX_URL_LENGTH:
        raise BadRequest(field, f"is longer than {MAX_URL_LENGTH} characters")
    if _has_unsafe_char(url, allow_space=False) or "\\" in url:
        raise BadRequest(field, "has a space, backslash or control character (percent-encode "
                                "the key)")
    if "?" in url or "#" in url:
        raise BadRequest(field, "must not have a query or fragment")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError as exc:
        raise BadRequest(field, f"is not a URL: {exc}") from None
    scheme = parts.scheme.lower()
    if "@" in parts.netloc:
        raise BadRequest(field, "must not carry credentials (user@host)")
    if scheme != "s3" and scheme not in _DEFAULT_PORTS:
        raise BadRequest(field, "must be an s3://<bucket>/<key> or a path-style "
                                "http(s)://<host>/<bucket>/<key> URL")
    if scheme in _DEFAULT_PORTS and not parts.hostname:
        raise BadRequest(field, "names no host (expected http(s)://<host>/<bucket>/<key>)")
    return scheme, parts


def _is_endpoint(scheme: str, parts: SplitResult, s3_endpoint: str) -> tuple[bool, str]:
    """Whether an http(s) URL names the S3 endpoint itself, and the endpoint's path prefix."""
    want_scheme, want_host, want_port, prefix = _endpoint(s3_endpoint)
    port = parts.port or _DEFAULT_PORTS[scheme]
    same = (scheme, (parts.hostname or "").lower(), port) == (want_scheme, want_host.lower(),
                                                                want_port)
    return same, prefix


def parse_image_url(url: object, s3_endpoint: str, *, field: str = "image_url") -> ImageRef:
    """``s3://<bucket>/<key>`` or a path-style ``http(s)://<any host>/<bucket>/<key>``.

    The host is not used (see ``named_host``): the bucket and key are read from the
    daemon's own ``s3_endpoint``; a URL of that endpoint may carry its path prefix.
    Refused: another scheme, credentials in the URL, a query or fragment, and keys that
    are empty, name a folder or a sidecar, hold ``.``/``..`` segments or control
    characters (also once decoded).
    """
    scheme, parts = _split_image_url(url, field)
    if scheme == "s3":
        bucket = _check_bucket(parts.netloc, field)
        if not parts.path.startswith("/"):
            raise BadRequest(field, "names no object key (expected s3://<bucket>/<key>)")
        raw_key = parts.path.removeprefix("/")
    else:
        path = parts.path
        same, prefix = _is_endpoint(scheme, parts, s3_endpoint)
        if same and prefix and path.startswith(prefix + "/"):
            path = path[len(prefix):]
        if not path.startswith("/"):
            raise BadRequest(field, "names no bucket (expected http(s)://<host>/<bucket>/<key>)")
        bucket_text, _, raw_key = path[1:].partition("/")
        bucket = _check_bucket(bucket_text, field)
    return ImageRef(bucket, _check_key(_decode_key(raw_key, field), field))


def named_host(url: str, s3_endpoint: str) -> str | None:
    """The ``host[:port]`` an http(s) ``image_url`` names when it is not the S3 endpoint
    (for a log line; it is never contacted); None for ``s3://`` and the endpoint itself.
    ``url`` has passed ``parse_image_url``."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or _is_endpoint(scheme, parts, s3_endpoint)[0]:
        return None
    return parts.netloc.lower()


def _check_image_type(value: object) -> ImageType:
    if value is None:
        return "qcow2"
    if value not in IMAGE_TYPES:
        raise BadRequest("image_type", f"must be qcow2 or raw, got {_shown(value)}")
    return value


def _check_size_gb(value: object) -> int:
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest("volume_size_gb", f"must be an integer number of GiB, "
                                           f"got {_shown(value)}")
    if not 1 <= value <= MAX_VOLUME_SIZE_GB:
        raise BadRequest("volume_size_gb", f"must be from 1 to {MAX_VOLUME_SIZE_GB}, "
                                           f"got {value}")
    return value


def _check_correlation_id(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _CORRELATION_ID.fullmatch(value):
        raise BadRequest("correlation_id", "must be 1-128 of A-Za-z0-9 . _ : / @ + -, "
                                           f"got {_shown(value)}")
    return value


def _body(body: object) -> dict[str, object]:
    if not isinstance(body, dict):
        raise BadRequest("body", f"must be a JSON object, got {type(body).__name__}")
    return cast(dict[str, object], body)


def _required(body: dict[str, object], name: str) -> object:
    if body.get(name) is None:
        raise BadRequest(name, "is required")
    return body[name]


def parse_provision(body: object, s3_endpoint: str) -> ProvisionRequest:
    """The body of ``POST /api/v1/jobs`` (and its alias ``/api/v1/provision``)."""
    fields = _body(body)
    url = _required(fields, "image_url")
    image = parse_image_url(url, s3_endpoint)
    return ProvisionRequest(
        image=image,
        image_url=cast(str, url),
        image_type=_check_image_type(fields.get("image_type")),
        named_host=named_host(cast(str, url), s3_endpoint),
        volume_name=check_volume_name(_required(fields, "volume_name")),
        volume_size_gb=_check_size_gb(_required(fields, "volume_size_gb")),
        correlation_id=_check_correlation_id(fields.get("correlation_id")),
    )


def parse_fetch(body: object, s3_endpoint: str) -> FetchRequest:
    """The body of ``POST /api/v1/cache/fetch``."""
    fields = _body(body)
    url = _required(fields, "image_url")
    image = parse_image_url(url, s3_endpoint)
    return FetchRequest(image=image, image_url=cast(str, url),
                        image_type=_check_image_type(fields.get("image_type")),
                        named_host=named_host(cast(str, url), s3_endpoint))


def check_volume_name(value: object, field: str = "volume_name") -> str:
    """A plain name valid both as a libvirt volume name and as an LVM LV name."""
    if not isinstance(value, str):
        raise BadRequest(field, f"must be a string, got {_shown(value)}")
    if not _VOLUME_NAME.fullmatch(value) or value in (".", ".."):
        raise BadRequest(field, "must be 1-127 of A-Za-z0-9 + _ . - , not starting with "
                                f". or -, got {_shown(value)}")
    if value.startswith(_LVM_RESERVED_PREFIXES):
        raise BadRequest(field, f"{_shown(value)} starts with a prefix LVM reserves "
                                "(snapshot, pvmove)")
    reserved = next((part for part in _LVM_RESERVED_PARTS if part in value), None)
    if reserved is not None:
        raise BadRequest(field, f"{_shown(value)} contains {reserved}, which LVM reserves "
                                "for its internal volumes")
    return value


def check_cache_key(value: str) -> str:
    """A cache entry's key: its SHA-256 as 64 lowercase hex digits."""
    if not isinstance(value, str) or not _SHA256.fullmatch(value):
        raise BadRequest("sha256", f"must be 64 lowercase hex digits, got {_shown(value)}")
    return value


def check_job_id(value: str) -> str:
    """A job id as the API hands them out: a lowercase canonical UUID."""
    if not isinstance(value, str) or not _UUID.fullmatch(value):
        raise BadRequest("job_id", f"must be a lowercase UUID, got {_shown(value)}")
    return value


def _single(values: Mapping[str, str], name: str) -> str | None:
    """The one value of ``name`` (case-insensitive); a repeated one is refused."""
    found = [value for key, value in values.items() if key.lower() == name.lower()]
    if len(found) > 1:
        raise BadRequest(name, "is given more than once")
    return found[0] if found else None


def parse_upload_headers(headers: Mapping[str, str], *, max_bytes: int) -> UploadRequest:
    """The headers of ``PUT /volumes/upload-content``; the body is streamed elsewhere."""
    volume = _single(headers, "X-Volume-Name")
    if volume is None:
        raise BadRequest("X-Volume-Name", "is required")
    pool = _single(headers, "X-Pool-Name")
    if _single(headers, "Transfer-Encoding") is not None:
        raise BadRequest("Content-Length", "is required: send the body with a Content-Length, "
                                           "not chunked")
    length_text = _single(headers, "Content-Length")
    if length_text is None:
        raise BadRequest("Content-Length", "is required (chunked uploads are not accepted)")
    length_text = length_text.strip(" \t")
    if not _DIGITS.fullmatch(length_text):
        raise BadRequest("Content-Length", f"must be a number of bytes, got {_shown(length_text)}")
    length = int(length_text)
    if length < 1:
        raise BadRequest("Content-Length", "must be at least 1: the body is empty")
    if length > max_bytes:
        raise BodyTooLarge("Content-Length", f"is {length} bytes; at most {max_bytes} are "
                                             "accepted")
    return UploadRequest(
        volume_name=check_volume_name(volume, "X-Volume-Name"),
        pool=check_volume_name(DEFAULT_POOL if pool is None else pool, "X-Pool-Name"),
        length=length,
    )


def _count(query: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    text = _single(query, name)
    if text is None or text == "":
        return default
    if not _DIGITS.fullmatch(text) or not low <= int(text) <= high:
        raise BadRequest(name, f"must be an integer from {low} to {high}, got {_shown(text)}")
    return int(text)


def parse_paging(query: Mapping[str, str]) -> tuple[int, int]:
    """``(offset, limit)`` of a listing; an empty value (``?offset=``) means the default."""
    return (_count(query, "offset", 0, 0, MAX_OFFSET),
            _count(query, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT))
