"""The one way a name from outside becomes a path: checked to stay inside its directory.

Image names come from policy files, digests from sidecars and cache records, VG and LV
names from LVM's reports. Any of them could hold ``/``, ``..`` or a NUL byte, and the
watcher runs as root, so a name joined onto a directory unchecked could write anywhere.
Every such join goes through ``path_inside``; identifiers that have a stricter shape
(image names, SHA-256 digests) are checked against that shape as well.

Pure: the checks are lexical and touch no file, so symlinks inside the directory are the
directory owner's business (the cache and ``/dev`` are root's).
"""

from __future__ import annotations

import re
from pathlib import PurePath
from typing import TypeVar

from watcher.core.errors import UnsafeName

P = TypeVar("P", bound=PurePath)

IMAGE_NAME_RULE = "letters, digits, '.', '_' and '-', starting with a letter or digit, " \
                  "at most 64 characters"
_IMAGE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_DIGEST = re.compile(r"[0-9a-f]{64}")


def is_image_name(name: object) -> bool:
    """True for a valid image identifier: ``ubuntu-24.04`` yes, ``ubuntu/24.04`` no."""
    return isinstance(name, str) and _IMAGE_NAME.fullmatch(name) is not None


def is_digest(value: object) -> bool:
    """True for a SHA-256 digest in lowercase hex, the only form the cache names files by."""
    return isinstance(value, str) and _DIGEST.fullmatch(value) is not None


def path_inside(directory: P, name: str, suffix: str = "") -> P:
    """``directory / (name + suffix)``, refused unless that is one entry right inside it.

    Raises ``UnsafeName`` for an empty name, ``.`` or ``..``, a separator, a NUL byte,
    or anything else that would not name a direct child of ``directory``.
    """
    leaf = f"{name}{suffix}"
    if (not name or name in (".", "..") or leaf in (".", "..")
            or any(c in "/\\" or ord(c) < 0x20 for c in leaf)):
        raise UnsafeName(f"{name!r} is not a plain file name; refusing to use it under "
                         f"{directory}")
    path = directory / leaf
    if path.parent != directory or path.name != leaf:
        raise UnsafeName(f"{name!r} does not name an entry inside {directory}")
    return path


def image_file(directory: P, image_name: str, suffix: str) -> P:
    """The file of image ``image_name`` in ``directory``; the name must be an identifier."""
    if not is_image_name(image_name):
        raise UnsafeName(f"image name {image_name!r} is not an identifier ({IMAGE_NAME_RULE})")
    return path_inside(directory, image_name, suffix)


def digest_file(directory: P, digest: str, suffix: str) -> P:
    """The file named by ``digest`` in ``directory``; the digest must be 64 lowercase hex."""
    if not is_digest(digest):
        raise UnsafeName(f"{digest!r} is not a SHA-256 digest in lowercase hex")
    return path_inside(directory, digest, suffix)
