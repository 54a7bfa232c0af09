"""Names from outside data become paths only through one checked helper.

Image names, digests and LVM names reach the filesystem as root; each hostile shape
here would otherwise write or read outside the directory it was meant for.
"""

from __future__ import annotations

from pathlib import PurePosixPath

import pytest

from watcher.core.errors import UnsafeName
from watcher.core.paths import digest_file, image_file, is_image_name, path_inside

CACHE = PurePosixPath("/var/lib/libvirt-volume-watcher/cache/refs")
HOSTILE = [
    pytest.param("", id="empty"),
    pytest.param(".", id="dot"),
    pytest.param("..", id="dot-dot"),
    pytest.param("../x", id="climbs-one-level"),
    pytest.param("../../../../tmp/x", id="climbs-to-tmp"),
    pytest.param("ubuntu/24.04", id="subdirectory"),
    pytest.param("/etc/passwd", id="absolute"),
    pytest.param("a\0b", id="nul-byte"),
    pytest.param("a\nb", id="newline"),
    pytest.param("a\\b", id="backslash"),
]


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_names_never_become_paths(name: str) -> None:
    with pytest.raises(UnsafeName):
        path_inside(CACHE, name, ".json")


@pytest.mark.parametrize("name", ["ubuntu-24.04", "a", "x.json", "..a", "a..", "-"])
def test_plain_names_stay_right_inside_the_directory(name: str) -> None:
    path = path_inside(CACHE, name, ".json")
    assert path.parent == CACHE
    assert path.name == f"{name}.json"


def test_a_suffix_cannot_turn_a_name_into_a_path() -> None:
    with pytest.raises(UnsafeName):
        path_inside(CACHE, "x", "/../../y")
    with pytest.raises(UnsafeName):
        path_inside(CACHE, ".", ".")


@pytest.mark.parametrize(("name", "valid"), [
    ("ubuntu-24.04", True), ("Debian_12", True), ("a" * 64, True), ("9", True),
    ("a" * 65, False), ("ubuntu/24.04", False), ("../x", False), (".hidden", False),
    ("-flag", False), ("", False), ("ubuntu 24.04", False), ("ubuntü", False), (None, False),
    ("x\n", False),
])
def test_image_names_are_identifiers(name: object, valid: bool) -> None:
    assert is_image_name(name) is valid


@pytest.mark.parametrize("name", ["-flag", "..", "ubuntu/24.04", "a" * 65, "x\n"])
def test_image_files_refuse_names_that_are_not_identifiers(name: str) -> None:
    with pytest.raises(UnsafeName):
        image_file(CACHE, name, ".json")


@pytest.mark.parametrize("digest", ["A" * 64, "a" * 63, "g" * 64, "../" + "a" * 61, ""])
def test_digest_files_refuse_anything_but_lowercase_sha256_hex(digest: str) -> None:
    with pytest.raises(UnsafeName):
        digest_file(CACHE, digest, ".json")


def test_a_digest_file_is_named_by_the_digest() -> None:
    assert digest_file(CACHE, "ab" * 32, ".qcow2") == CACHE / f"{'ab' * 32}.qcow2"
