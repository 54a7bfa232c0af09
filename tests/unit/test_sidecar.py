"""A ``.sha256`` sidecar yields exactly one digest for its image, or is rejected."""

from __future__ import annotations

import pytest

from watcher.core.errors import ImageRejected
from watcher.core.sidecar import MAX_SIDECAR_BYTES, MalformedSidecar, parse_sidecar

DIGEST = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
OTHER = "60303ae22b998861bce3b28f33eec1be758a213c86c93c076dbe9f558c11c752"


@pytest.mark.parametrize(
    ("content", "object_name"),
    [
        pytest.param(DIGEST.encode(), None, id="bare-digest"),
        pytest.param(DIGEST.encode() + b"\n", None, id="bare-digest-trailing-newline"),
        pytest.param(DIGEST.upper().encode(), None, id="uppercase-digest-lowered"),
        pytest.param(b"  \t" + DIGEST.encode() + b" \r\n\n", None, id="surrounding-whitespace"),
        pytest.param(DIGEST.encode(), "ubuntu/u.qcow2", id="bare-digest-with-object-name"),
        pytest.param(f"{DIGEST}  u.qcow2\n".encode(), "ubuntu/u.qcow2", id="sha256sum-text-mode"),
        pytest.param(f"{DIGEST} *u.qcow2\n".encode(), "ubuntu/u.qcow2", id="sha256sum-binary-mode"),
        pytest.param(f"{DIGEST}  u.qcow2\n".encode(), None, id="named-without-object-name"),
        pytest.param(f"{DIGEST}  ./u.qcow2".encode(), "u.qcow2", id="dot-slash-name"),
        pytest.param(f"{DIGEST}  /srv/build/u.qcow2".encode(), "images/u.qcow2",
                     id="name-compared-by-basename"),
        pytest.param(f"{DIGEST}  my image.qcow2".encode(), "my image.qcow2",
                     id="name-with-spaces"),
        pytest.param(f"{DIGEST}  été.qcow2".encode(), "img/été.qcow2", id="unicode-name"),
        pytest.param(f"SHA256 (u.qcow2) = {DIGEST}\n".encode(), "u.qcow2", id="bsd-tagged"),
        pytest.param(f"{DIGEST}  u.qcow2\n{DIGEST}  u.qcow2\n".encode(), "u.qcow2",
                     id="repeated-identical-line"),
        pytest.param(b"\xef\xbb\xbf" + DIGEST.encode(), None, id="utf8-bom"),
        # One entry vouches for the object beside it, whatever file name it gives.
        pytest.param(f"{DIGEST}  other.qcow2".encode(), "ubuntu/u.qcow2", id="renamed-on-upload"),
        pytest.param(f"{DIGEST} *u.qcow2.bak".encode(), "u.qcow2", id="binary-mode-other-name"),
        pytest.param(f"SHA256 (other.qcow2) = {DIGEST}".encode(), "u.qcow2",
                     id="bsd-tagged-other-name"),
        pytest.param(f"{DIGEST}  a.qcow2\n{DIGEST}  b.qcow2\n".encode(), None,
                     id="same-digest-two-names"),
        # A SHA256SUMS list: the entry naming this object.
        pytest.param(f"{OTHER}  a.qcow2\n{DIGEST}  u.qcow2\n{OTHER}  b.qcow2\n".encode(),
                     "images/u.qcow2", id="sums-list-entry-for-the-object"),
        pytest.param(f"{OTHER}  a.qcow2\nSHA256 (u.qcow2) = {DIGEST}\n".encode(), "u.qcow2",
                     id="sums-list-mixed-styles"),
    ],
)
def test_sidecar_yields_lowercase_digest(content: bytes, object_name: str | None) -> None:
    assert parse_sidecar(content, object_name) == DIGEST


@pytest.mark.parametrize(
    ("content", "object_name", "message"),
    [
        pytest.param(b"", None, "empty", id="empty"),
        pytest.param(b" \n\t\n", None, "empty", id="only-whitespace"),
        pytest.param(b"z" * 64, None, "not hexadecimal", id="not-hex"),
        pytest.param(DIGEST[:-1].encode() + b"g", None, "not hexadecimal", id="one-non-hex-digit"),
        pytest.param(DIGEST[:40].encode(), None, "40 hex digits", id="too-short-sha1-length"),
        pytest.param((DIGEST + "00").encode(), None, "66 hex digits", id="too-long"),
        pytest.param(b"d41d8cd98f00b204e9800998ecf8427e  u.qcow2", "u.qcow2", "32 hex digits",
                     id="md5-digest"),
        pytest.param(f"{DIGEST}\n{OTHER}\n".encode(), None, "2 different digests, expected one",
                     id="two-different-digests"),
        pytest.param(f"{DIGEST}\n{OTHER}\n".encode(), "u.qcow2", "none for 'u.qcow2'",
                     id="two-bare-digests-with-object-name"),
        pytest.param(f"{DIGEST}  a.qcow2\n{OTHER}  b.qcow2\n".encode(), "u.qcow2",
                     "none for 'u.qcow2'", id="sums-list-without-the-object"),
        pytest.param(f"{DIGEST}  u.qcow2\n{OTHER}  x/u.qcow2\n".encode(), "u.qcow2",
                     "2 different digests for 'u.qcow2'", id="sums-list-naming-it-twice"),
        pytest.param(b"\xff" + DIGEST.encode(), None, "not UTF-8", id="not-utf8"),
        pytest.param(DIGEST.encode() + b" " * MAX_SIDECAR_BYTES, None, "over 4096",
                     id="larger-than-4-kib"),
    ],
)
def test_bad_sidecar_is_rejected(content: bytes, object_name: str | None, message: str) -> None:
    with pytest.raises(MalformedSidecar, match=message):
        parse_sidecar(content, object_name)


def test_bad_sidecar_is_an_image_rejection_with_a_stable_reason() -> None:
    with pytest.raises(ImageRejected) as caught:
        parse_sidecar(b"nonsense")
    assert caught.value.reason == "bad_sidecar"
