"""Header checks against crafted images: every rejection and the images that must pass.

Every format QEMU can probe appears here with a hostile raw-declared sample, and every
qcow2 sanity check with a header that breaks just that check.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field, replace
from typing import Any

import pytest

from watcher.core.errors import ImageRejected
from watcher.core.formats import TAIL_BYTES, VMDK_DESCRIPTOR_WINDOW, detect_format
from watcher.core.inspect import (
    DEFAULT_MAX_VIRTUAL_SIZE,
    HEADER_BYTES,
    HeaderFacts,
    check_header,
    crosscheck,
)
from watcher.core.policy import ImageFormat

MiB = 1024 * 1024
GiB = 1024 * MiB
TiB = 1024 * GiB
MAX_L1_ENTRIES = 4 * MiB  # QEMU: an active L1 table of at most 32 MiB
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_NAMES = 0x6803F857
EXT_FDE = 0x0537BE77
EXT_DATA_FILE = 0x44415441


@dataclass
class Qcow2:
    """A qcow2 file laid out like ``qemu-img create`` does: header, refcount, L1."""

    version: int = 3
    cluster_bits: int = 16
    size: int = 4 * MiB
    crypt_method: int = 0
    incompatible: int = 0
    header_length: int | None = None  # default: 72 for v2, 112 for v3
    compression_type: int = 0
    extensions: list[tuple[int, bytes]] = field(default_factory=list)
    end_marker: bool = True
    backing_file: bytes | None = None
    l1_offset: int | None = None  # default: cluster 3
    l1_size: int | None = None  # default: just enough entries for size
    refcount_offset: int | None = None  # default: cluster 1
    refcount_clusters: int = 1
    snapshots: int = 0
    snapshots_offset: int = 0
    file_clusters: int = 4

    def l1_entries(self) -> int:
        if self.l1_size is not None:
            return self.l1_size
        cluster = 1 << self.cluster_bits
        entry_bytes = 16 if self.incompatible & 1 << 4 else 8
        return max(1, -(-self.size // (cluster * (cluster // entry_bytes))))

    def file(self) -> bytes:
        cluster = 1 << self.cluster_bits
        header_length = self.header_length or (72 if self.version == 2 else 112)
        tail = b""
        for ext_type, data in self.extensions:
            tail += struct.pack(">II", ext_type, len(data)) + data
            tail += b"\0" * (-len(data) % 8)
        if self.end_marker:
            tail += struct.pack(">II", 0, 0)
        backing_offset = backing_size = 0
        if self.backing_file is not None:
            backing_offset = header_length + len(tail)
            backing_size = len(self.backing_file)
            tail += self.backing_file
        header = struct.pack(
            ">4sIQIIQIIQQIIQ", b"QFI\xfb", self.version, backing_offset, backing_size,
            self.cluster_bits, self.size, self.crypt_method, self.l1_entries(),
            3 * cluster if self.l1_offset is None else self.l1_offset,
            cluster if self.refcount_offset is None else self.refcount_offset,
            self.refcount_clusters, self.snapshots, self.snapshots_offset,
        )
        if self.version == 3:
            header += struct.pack(">QQQII", self.incompatible, 0, 0, 4, header_length)
            header += bytes([self.compression_type]) + b"\0" * 7
        # Never cut the fields themselves, even for a deliberately short header_length.
        header = header[:max(header_length, 104 if self.version == 3 else 72)]
        header = header.ljust(header_length, b"\0")
        body = header + tail
        size = max(self.file_clusters * cluster, len(body))
        return body.ljust(size, b"\0")


def head_of(data: bytes) -> bytes:
    return data[:HEADER_BYTES]


def check(
    data: bytes, declared: ImageFormat, file_size: int | None = None, *,
    max_virtual_size: int = DEFAULT_MAX_VIRTUAL_SIZE,
) -> HeaderFacts:
    """``check_header`` on ``data`` as the adapter reads it: its head and its tail."""
    return check_header(head_of(data), declared, len(data) if file_size is None else file_size,
                        tail=data[-TAIL_BYTES:], max_virtual_size=max_virtual_size)


def vdi_file() -> bytes:
    return b"<<< Oracle VM VirtualBox Disk Image >>>\n".ljust(0x40, b"\0") + struct.pack(
        "<I", 0xBEDA107F).ljust(448, b"\0")


def bochs_file() -> bytes:
    header = (b"Bochs Virtual HD Image".ljust(32, b"\0") + b"Redolog".ljust(16, b"\0")
              + b"Growing".ljust(16, b"\0") + struct.pack("<II", 0x00020000, 512))
    return header.ljust(512, b"\0") + b"\xff" * 256


def ending_with(trailer: bytes, size: int = 8192) -> bytes:
    """A file of zeros whose last TAIL_BYTES start with ``trailer``."""
    return bytes(size - TAIL_BYTES) + trailer.ljust(TAIL_BYTES, b"\0")


VMDK_DESCRIPTOR = (
    b"# Disk DescriptorFile\nversion=1\nCID=52a1c3f0\nparentCID=ffffffff\n"
    b'createType="monolithicFlat"\n\n# Extent description\nRW 8192 FLAT "disk-flat.vmdk" 0\n'
)

FOREIGN = {
    "qcow-v1": struct.pack(">4sI", b"QFI\xfb", 1).ljust(512, b"\0"),
    "qcow2": Qcow2().file(),
    "vmdk-sparse": b"KDMV".ljust(512, b"\0"),
    "vmdk-cowd": b"COWD\x01\0\0\0".ljust(512, b"\0"),
    "vmdk-descriptor": VMDK_DESCRIPTOR.ljust(512, b"\0"),
    "vmdk-descriptor-after-comments": (
        b"# Exported from the build farm\n#   keep this line\n" + VMDK_DESCRIPTOR
    ).ljust(4096, b"\0"),
    "vmdk-descriptor-crlf": VMDK_DESCRIPTOR.replace(b"\n", b"\r\n").ljust(512, b"\0"),
    "vmdk-descriptor-after-blank-lines": (b"   \n\t\n" + VMDK_DESCRIPTOR).ljust(512, b"\0"),
    "vmdk-descriptor-after-binary": (bytes(3000) + b"\n" + VMDK_DESCRIPTOR).ljust(8192, b"\0"),
    "vmdk-version-line-only": b"# no title\n   \r\nversion=1\r\n".ljust(512, b"\0"),
    "vmdk-create-type-only": b'CID=1\ncreateType = "vmfs"\n'.ljust(512, b"\0"),
    "vmdk-extent-line-only": b'RW 8192 FLAT "/dev/sda" 0\n'.ljust(512, b"\0"),
    "vhdx": b"vhdxfile".ljust(512, b"\0"),
    "vdi": vdi_file(),
    "qed": b"QED\x00".ljust(512, b"\0"),
    "luks": b"LUKS\xba\xbe\x00\x01".ljust(512, b"\0"),
    "luks-v2": b"LUKS\xba\xbe\x00\x02".ljust(4096, b"\0"),
    "vpc": b"conectix".ljust(512, b"\0") + ending_with(b"conectix"),
    "vpc-fixed": ending_with(b"conectix\0\0\0\x02\0\x01\0\0"),
    "parallels": (b"WithoutFreeSpace" + struct.pack("<I", 2)).ljust(512, b"\0"),
    "parallels-ext": (b"WithouFreSpacExt" + struct.pack("<I", 2)).ljust(512, b"\0"),
    "bochs": bochs_file(),
    "cloop": b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 "
             b"/dev/cloop $1\n".ljust(4096, b"\0"),
    "dmg": ending_with(b"koly" + struct.pack(">II", 4, 512)),
}
FOUND_IN_TRAILER = {"vpc-fixed", "dmg"}
"""FOREIGN samples recognised by their last TAIL_BYTES rather than their header."""


class TestAcceptedImages:
    @pytest.mark.parametrize(
        ("image", "expected"),
        [
            pytest.param(Qcow2(version=2), {"qcow2_version": 2, "cluster_size": 65536},
                         id="qcow2-v2"),
            pytest.param(Qcow2(), {"qcow2_version": 3, "compression_type": "zlib"},
                         id="qcow2-v3"),
            pytest.param(Qcow2(header_length=104), {"qcow2_version": 3},
                         id="qcow2-v3-short-header"),
            pytest.param(Qcow2(incompatible=1 << 3, compression_type=1),
                         {"compression_type": "zstd"}, id="qcow2-v3-zstd"),
            pytest.param(Qcow2(incompatible=1 << 4), {"extended_l2": True},
                         id="qcow2-v3-extended-l2"),
            pytest.param(Qcow2(incompatible=1), {"dirty": True}, id="qcow2-v3-dirty"),
            pytest.param(Qcow2(cluster_bits=9, file_clusters=8), {"cluster_size": 512},
                         id="qcow2-smallest-clusters"),
            pytest.param(Qcow2(size=4 * GiB), {"virtual_size": 4 * GiB},
                         id="qcow2-l1-of-eight-entries"),
            pytest.param(Qcow2(incompatible=1 << 4, size=512 * MiB), {"extended_l2": True},
                         id="qcow2-extended-l2-needs-a-larger-l1"),
            pytest.param(Qcow2(l1_size=16), {"qcow2_version": 3},
                         id="qcow2-l1-larger-than-needed"),
            pytest.param(Qcow2(size=DEFAULT_MAX_VIRTUAL_SIZE),
                         {"virtual_size": DEFAULT_MAX_VIRTUAL_SIZE}, id="qcow2-at-the-size-limit"),
            pytest.param(Qcow2(size=512), {"virtual_size": 512}, id="qcow2-one-sector"),
            pytest.param(Qcow2(cluster_bits=21, file_clusters=4), {"cluster_size": 2 * MiB},
                         id="qcow2-largest-clusters"),
            pytest.param(Qcow2(extensions=[(EXT_FEATURE_NAMES, b"\0\0dirty bit".ljust(48, b"\0"))]),
                         {"qcow2_version": 3}, id="qcow2-feature-name-table"),
            pytest.param(Qcow2(snapshots=2, snapshots_offset=2 * 65536), {"snapshot_count": 2},
                         id="qcow2-internal-snapshots"),
        ],
    )
    def test_valid_qcow2_is_accepted(self, image: Qcow2, expected: dict[str, Any]) -> None:
        facts = check(image.file(), "qcow2")
        assert facts.detected_format == "qcow2"
        assert facts.virtual_size == image.size
        for name, value in expected.items():
            assert getattr(facts, name) == value

    @pytest.mark.parametrize(
        "data",
        [
            pytest.param(b"\0" * 4096, id="zeros"),
            pytest.param(b"\xeb\x63\x90".ljust(510, b"\0") + b"\x55\xaa", id="mbr-boot-sector"),
            pytest.param(bytes(range(256)) * 16, id="arbitrary-bytes"),
            pytest.param(b"QFI", id="partial-qcow-magic"),
            pytest.param(b"", id="empty-file"),
            pytest.param(b"\xeb\x63\x90 see createType= and # Disk DescriptorFile\n".ljust(
                4096, b"\0"), id="vmdk-words-mid-line"),
            pytest.param(bytes(VMDK_DESCRIPTOR_WINDOW) + VMDK_DESCRIPTOR,
                         id="vmdk-words-after-the-descriptor-window"),
            pytest.param(b"#!/bin/sh\necho hello\n".ljust(512, b"\0"), id="shell-script"),
            pytest.param(b"# notes\nname=value\n".ljust(512, b"\0"), id="text-without-version"),
            pytest.param(ending_with(b"xkoly"), id="koly-not-at-the-trailer-start"),
            pytest.param(b"koly".ljust(100, b"\0"), id="koly-in-a-file-shorter-than-a-trailer"),
            pytest.param(ending_with(b"") + b"conectix", id="conectix-in-the-last-bytes-only"),
        ],
    )
    def test_raw_without_a_known_header_is_accepted(self, data: bytes) -> None:
        facts = check(data, "raw")
        assert facts == HeaderFacts(
            detected_format="raw", virtual_size=len(data), cluster_size=None,
            qcow2_version=None, compression_type=None,
        )

    def test_only_the_head_and_tail_are_needed_for_a_large_file(self) -> None:
        facts = check_header(Qcow2().file(), "qcow2", 10 * 1024**3, tail=bytes(TAIL_BYTES))
        assert facts.virtual_size == 4 * MiB


REJECTED = [
    # Not self-contained.
    pytest.param(Qcow2(backing_file=b"base.img"), "backing_file", "'base.img'",
                 id="backing-file-v3"),
    pytest.param(Qcow2(version=2, backing_file=b"/etc/shadow"), "backing_file", "/etc/shadow",
                 id="backing-file-v2"),
    pytest.param(Qcow2(backing_file=b"base.raw", extensions=[(EXT_BACKING_FORMAT, b"raw")]),
                 "backing_file", "base.raw", id="backing-file-with-format"),
    pytest.param(Qcow2(incompatible=1 << 2, extensions=[(EXT_DATA_FILE, b"/dev/sda")]),
                 "data_file", "/dev/sda", id="external-data-file"),
    pytest.param(Qcow2(incompatible=1 << 2), "data_file", "external data file",
                 id="external-data-file-bit-only"),
    pytest.param(Qcow2(extensions=[(EXT_DATA_FILE, b"d.raw")]), "data_file", "d.raw",
                 id="external-data-file-extension-only"),
    # Encrypted.
    pytest.param(Qcow2(version=2, crypt_method=1), "encrypted", "AES", id="encrypted-aes"),
    pytest.param(Qcow2(crypt_method=2, extensions=[(EXT_FDE, b"\0" * 16)]), "encrypted", "LUKS",
                 id="encrypted-luks"),
    pytest.param(Qcow2(extensions=[(EXT_FDE, b"\0" * 16)]), "encrypted", "encrypted",
                 id="encryption-extension-only"),
    # Feature bits.
    pytest.param(Qcow2(incompatible=1 << 5), "unknown_features", "bits 5", id="unknown-bit-5"),
    pytest.param(Qcow2(incompatible=1 << 63 | 1 << 40), "unknown_features", "bits 40, 63",
                 id="unknown-high-bits"),
    pytest.param(Qcow2(incompatible=1 << 1), "corrupt", "qemu-img check", id="corrupt-bit"),
    # Garbage or truncated headers.
    pytest.param(Qcow2().file()[:50], "bad_header", "fewer than a qcow2 header",
                 id="truncated-before-v2-header"),
    pytest.param(Qcow2().file()[:90], "bad_header", "fewer than a version 3 header",
                 id="truncated-inside-v3-header"),
    pytest.param(Qcow2().file()[:112], "bad_header", "header extensions",
                 id="truncated-before-extensions"),
    pytest.param(Qcow2(version=4), "bad_header", "version 4", id="unknown-version"),
    pytest.param(Qcow2(cluster_bits=8), "bad_header", "cluster_bits 8", id="clusters-too-small"),
    pytest.param(Qcow2(cluster_bits=22), "bad_header", "cluster_bits 22", id="clusters-too-large"),
    pytest.param(Qcow2(header_length=100), "bad_header", "header_length 100",
                 id="header-length-too-short"),
    pytest.param(Qcow2(header_length=108), "bad_header", "header_length 108",
                 id="header-length-unaligned"),
    pytest.param(Qcow2(cluster_bits=9, header_length=1024, file_clusters=8), "bad_header",
                 "exceeds the cluster size", id="header-longer-than-cluster"),
    pytest.param(Qcow2(extensions=[(0x12345678, b"x" * 70000)], end_marker=False), "bad_header",
                 "past the first cluster", id="extension-past-first-cluster"),
    pytest.param(Qcow2(cluster_bits=9, file_clusters=8,
                       extensions=[(0x12345678, b"x" * 400)]), "bad_header",
                 "past the first cluster", id="extensions-without-end-marker-in-cluster"),
    pytest.param(Qcow2(file_clusters=3), "bad_header", "truncated", id="l1-table-past-end-of-file"),
    pytest.param(Qcow2(refcount_clusters=100), "bad_header", "refcount table",
                 id="refcount-table-past-end-of-file"),
    pytest.param(Qcow2(snapshots=1, snapshots_offset=100 * 65536), "bad_header", "snapshot table",
                 id="snapshot-table-past-end-of-file"),
    pytest.param(Qcow2(l1_offset=3 * 65536 + 8), "bad_header", "not cluster aligned",
                 id="l1-table-unaligned"),
    pytest.param(Qcow2(compression_type=1), "bad_header", "compression type",
                 id="compression-type-without-feature-bit"),
    # Sizes and tables that do not add up.
    pytest.param(Qcow2(size=0), "bad_header", "virtual size is 0", id="virtual-size-zero"),
    pytest.param(Qcow2(size=2**62, l1_size=1), "bad_header", "is absurd", id="virtual-size-absurd"),
    pytest.param(Qcow2(size=2**64 - 1, l1_size=1), "bad_header", "is absurd",
                 id="virtual-size-max-u64"),
    pytest.param(Qcow2(cluster_bits=9, size=2**45, l1_size=1, file_clusters=8), "bad_header",
                 "with 512-byte clusters", id="virtual-size-absurd-for-small-clusters"),
    pytest.param(Qcow2(size=4 * GiB, l1_size=1), "bad_header", "needs 8 L1 entries",
                 id="l1-too-small-for-virtual-size"),
    pytest.param(Qcow2(l1_size=0, l1_offset=0), "bad_header", "l1_size 0 is too small",
                 id="l1-empty"),
    pytest.param(Qcow2(incompatible=1 << 4, size=512 * MiB, l1_size=1), "bad_header",
                 "needs 2 L1 entries", id="l1-too-small-with-extended-l2"),
    pytest.param(Qcow2(l1_size=MAX_L1_ENTRIES + 1), "bad_header",
                 f"l1_size {MAX_L1_ENTRIES + 1} is above", id="l1-above-qemu-limit"),
    pytest.param(Qcow2(refcount_clusters=0), "bad_header", "refcount table has no clusters",
                 id="refcount-table-empty"),
    pytest.param(Qcow2(refcount_clusters=129), "bad_header", "refcount table of 129 clusters",
                 id="refcount-table-above-qemu-limit"),
    pytest.param(Qcow2(l1_offset=0), "bad_header", "L1 table starts in cluster 0",
                 id="l1-table-on-the-header"),
    pytest.param(Qcow2(refcount_offset=0), "bad_header", "refcount table starts in cluster 0",
                 id="refcount-table-on-the-header"),
    pytest.param(Qcow2(incompatible=1 << 3, compression_type=7), "bad_header",
                 "compression type 7", id="unknown-compression-type"),
    # Not qcow2 at all.
    *(pytest.param(data, "format_mismatch", "declared qcow2", id=f"{name}-declared-qcow2")
      for name, data in FOREIGN.items() if name != "qcow2"),
    pytest.param(b"\0" * 4096, "format_mismatch", "no recognisable image header",
                 id="raw-declared-qcow2"),
    pytest.param(b"", "format_mismatch", "declared qcow2", id="empty-file-declared-qcow2"),
]


class TestRejectedQcow2:
    @pytest.mark.parametrize(("image", "reason", "in_message"), REJECTED)
    def test_image_declared_qcow2_is_rejected(
        self, image: Qcow2 | bytes, reason: str, in_message: str,
    ) -> None:
        data = image.file() if isinstance(image, Qcow2) else image
        with pytest.raises(ImageRejected) as caught:
            check(data, "qcow2")
        assert caught.value.reason == reason
        assert in_message in str(caught.value)

    def test_backing_file_message_tells_operators_what_to_do(self) -> None:
        with pytest.raises(ImageRejected) as caught:
            check(Qcow2(backing_file=b"base.img").file(), "qcow2")
        assert str(caught.value) == (
            "qcow2 image refers to a backing file 'base.img'; images must be self-contained"
        )

    def test_backing_file_is_rejected_even_when_its_name_is_out_of_bounds(self) -> None:
        data = bytearray(Qcow2().file())
        struct.pack_into(">QI", data, 8, 60000, 5000)
        with pytest.raises(ImageRejected) as caught:
            check(bytes(data), "qcow2")
        assert caught.value.reason == "backing_file"
        assert "5000 bytes at offset 60000" in str(caught.value)


class TestDeclaredRaw:
    @pytest.mark.parametrize(
        ("data", "detected"),
        [pytest.param(data, name.split("-")[0], id=f"{name}-declared-raw")
         for name, data in FOREIGN.items()],
    )
    def test_raw_image_with_another_formats_header_is_rejected(
        self, data: bytes, detected: str, request: pytest.FixtureRequest,
    ) -> None:
        name = request.node.callspec.id.removesuffix("-declared-raw")
        where = "trailer" if name in FOUND_IN_TRAILER else "header"
        with pytest.raises(ImageRejected) as caught:
            check(data, "raw")
        assert caught.value.reason == "format_mismatch"
        assert f"declared raw but its {where} is that of a {detected} image" in str(caught.value)

    @pytest.mark.parametrize(
        ("data", "expected"),
        [pytest.param(data, name.split("-")[0], id=name) for name, data in FOREIGN.items()]
        + [pytest.param(b"\0" * 512, "raw", id="zeros")],
    )
    def test_detect_format_names_each_signature(self, data: bytes, expected: str) -> None:
        assert detect_format(head_of(data), data[-TAIL_BYTES:]) == expected

    @pytest.mark.parametrize("name", sorted(FOUND_IN_TRAILER))
    def test_a_trailer_is_only_seen_when_the_tail_is_passed(self, name: str) -> None:
        assert detect_format(head_of(FOREIGN[name])) == "raw"

    def test_a_qcow2_header_wins_over_a_foreign_trailer(self) -> None:
        data = Qcow2().file() + ending_with(b"koly")
        assert check(data, "qcow2").detected_format == "qcow2"


class TestVirtualSizeLimit:
    def test_qcow2_above_the_default_limit_is_rejected(self) -> None:
        with pytest.raises(ImageRejected) as caught:
            check(Qcow2(size=DEFAULT_MAX_VIRTUAL_SIZE + 512, file_clusters=6).file(), "qcow2")
        assert caught.value.reason == "virtual_size"
        assert "more than the limit of 4.0TiB" in str(caught.value)
        assert "cache.max_virtual_size" in str(caught.value)

    def test_a_one_pib_qcow2_is_rejected(self) -> None:
        # 2 Mi L1 entries (16 MiB) past cluster 3; the file is as large as that needs.
        image = Qcow2(size=1024 * TiB)
        with pytest.raises(ImageRejected) as caught:
            check(image.file(), "qcow2", file_size=260 * 65536)
        assert caught.value.reason == "virtual_size"
        assert "1024.0TiB (1125899906842624 bytes)" in str(caught.value)

    @pytest.mark.parametrize(("size", "limit"), [
        pytest.param(4 * MiB, 4 * MiB - 1, id="one-byte-over"),
        pytest.param(4 * MiB, MiB, id="well-over"),
    ])
    def test_qcow2_above_a_configured_limit_is_rejected(self, size: int, limit: int) -> None:
        with pytest.raises(ImageRejected) as caught:
            check(Qcow2(size=size).file(), "qcow2", max_virtual_size=limit)
        assert caught.value.reason == "virtual_size"
        assert f"({size} bytes)" in str(caught.value)

    def test_raw_larger_than_the_limit_is_rejected(self) -> None:
        with pytest.raises(ImageRejected) as caught:
            check(bytes(4096), "raw", file_size=DEFAULT_MAX_VIRTUAL_SIZE + 1)
        assert caught.value.reason == "virtual_size"

    @pytest.mark.parametrize("declared", ["raw", "qcow2"])
    def test_an_image_exactly_at_the_limit_is_accepted(self, declared: ImageFormat) -> None:
        data = Qcow2().file() if declared == "qcow2" else bytes(4 * MiB)
        assert check(data, declared, max_virtual_size=4 * MiB).virtual_size == 4 * MiB

    def test_a_hostile_header_is_reported_before_its_size(self) -> None:
        with pytest.raises(ImageRejected) as caught:
            check(Qcow2(size=1024 * TiB, backing_file=b"/etc/shadow").file(), "qcow2")
        assert caught.value.reason == "backing_file"


QCOW2_FACTS = HeaderFacts(
    detected_format="qcow2", virtual_size=4 * MiB, cluster_size=65536, qcow2_version=3,
    compression_type="zlib",
)
RAW_FACTS = HeaderFacts(
    detected_format="raw", virtual_size=4 * MiB, cluster_size=None, qcow2_version=None,
    compression_type=None,
)


def qcow2_info(**changes: object) -> dict[str, object]:
    info: dict[str, object] = {
        "virtual-size": 4 * MiB, "filename": "a.qcow2", "cluster-size": 65536,
        "format": "qcow2", "actual-size": 200704, "dirty-flag": False,
        "format-specific": {"type": "qcow2", "data": {
            "compat": "1.1", "compression-type": "zlib", "lazy-refcounts": False,
            "refcount-bits": 16, "corrupt": False, "extended-l2": False}},
    }
    info.update(changes)
    return info


def qcow2_info_data(**changes: object) -> dict[str, object]:
    info = qcow2_info()
    specific = info["format-specific"]
    assert isinstance(specific, dict)
    specific["data"].update(changes)
    return info


class TestCrosscheck:
    def test_agreeing_qcow2_info_gives_image_facts(self) -> None:
        facts = crosscheck(QCOW2_FACTS, qcow2_info(), "qcow2")
        assert facts.format == "qcow2"
        assert facts.virtual_size == 4 * MiB
        assert facts.actual_size == 200704
        assert facts.cluster_size == 65536
        assert facts.qcow2_version == 3
        assert facts.compression_type == "zlib"

    def test_agreeing_raw_info_gives_image_facts(self) -> None:
        info = {"virtual-size": 4 * MiB, "format": "raw", "actual-size": 4096}
        facts = crosscheck(RAW_FACTS, info, "raw")
        assert (facts.format, facts.virtual_size, facts.cluster_size) == ("raw", 4 * MiB, None)

    @pytest.mark.parametrize(
        ("head", "info", "declared", "in_message"),
        [
            pytest.param(QCOW2_FACTS, qcow2_info(format="raw"), "qcow2", "format 'raw'",
                         id="format-differs"),
            pytest.param(RAW_FACTS, qcow2_info(), "raw", "format 'qcow2'",
                         id="raw-reported-as-qcow2"),
            pytest.param(QCOW2_FACTS, qcow2_info(**{"backing-filename": "base.img"}), "qcow2",
                         "backing file 'base.img'", id="backing-file"),
            pytest.param(QCOW2_FACTS, qcow2_info_data(**{"data-file": "d.raw"}), "qcow2",
                         "external data file", id="data-file"),
            pytest.param(QCOW2_FACTS, qcow2_info(encrypted=True), "qcow2", "encrypted",
                         id="encrypted-flag"),
            pytest.param(QCOW2_FACTS, qcow2_info_data(encrypt={"format": "luks"}), "qcow2",
                         "encryption", id="encrypt-settings"),
            pytest.param(QCOW2_FACTS, qcow2_info_data(corrupt=True), "qcow2", "corrupt",
                         id="corrupt"),
            pytest.param(QCOW2_FACTS, qcow2_info(**{"virtual-size": 8 * MiB}), "qcow2",
                         "header says 4194304", id="virtual-size-differs"),
            pytest.param(replace(QCOW2_FACTS, virtual_size=0), qcow2_info(**{"virtual-size": 0}),
                         "qcow2", "must not be empty", id="virtual-size-zero"),
            pytest.param(RAW_FACTS, {"format": "raw", "virtual-size": 0}, "raw",
                         "must not be empty", id="raw-empty"),
            pytest.param(QCOW2_FACTS, qcow2_info(**{"virtual-size": "4M"}), "qcow2",
                         "not a number", id="virtual-size-not-a-number"),
            pytest.param(QCOW2_FACTS, {"format": "qcow2"}, "qcow2", "not a number",
                         id="virtual-size-missing"),
            pytest.param(QCOW2_FACTS, qcow2_info(**{"cluster-size": 512}), "qcow2",
                         "cluster size", id="cluster-size-differs"),
        ],
    )
    def test_disagreeing_info_is_rejected(
        self, head: HeaderFacts, info: dict[str, object], declared: ImageFormat,
        in_message: str,
    ) -> None:
        with pytest.raises(ImageRejected) as caught:
            crosscheck(head, info, declared)
        assert caught.value.reason == "inconsistent_info"
        assert in_message in str(caught.value)
