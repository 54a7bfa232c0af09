"""Image header checks: decide whether a downloaded image may be trusted at all.

A downloaded image is hostile until proven otherwise. A qcow2 file can point QEMU at
other files (a backing file, an external data file) and so leak host data into a guest;
an encrypted image cannot be written without its key; a file declared ``raw`` that is
really a qcow2 or vmdk would be copied byte for byte onto a disk, where anything that
later probes the volume's format (QEMU does when no format is given) would follow the
foreign header. So a ``raw`` image is refused when any format QEMU can probe recognises
it, and a qcow2 header must be sane enough for QEMU to open without surprises: tables
inside the file, an L1 table that covers the virtual size, sizes within QEMU's own limits.
A virtual size beyond the operator's limit (``cache.max_virtual_size``) is refused too: a
tiny file may claim petabytes, and a volume would be grown or a job started for it.

These checks read the file in plain Python *before* qemu-img ever opens it (which format
a file really is comes from ``watcher.core.formats``), then cross-check what
``qemu-img info`` says against what the header said.

Everything here is pure: the caller reads the first ``HEADER_BYTES`` and the last
``TAIL_BYTES`` of the file and passes them in with the file's size.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass

from watcher.core.errors import ImageRejected
from watcher.core.formats import identify
from watcher.core.policy import ImageFormat
from watcher.core.units import format_size

HEADER_BYTES = 2 * 1024 * 1024
"""How many leading bytes of a file ``check_header`` needs: ``min(file size, HEADER_BYTES)``.

QEMU requires the qcow2 header, its extensions and the backing file name to lie inside
the first cluster, and clusters are at most 2 MiB (``cluster_bits`` <= 21), so 2 MiB
always holds everything the checks read. Every other format's signature lies in the
first ``VMDK_DESCRIPTOR_WINDOW`` bytes, or in the last ``TAIL_BYTES``.
"""

DEFAULT_MAX_VIRTUAL_SIZE = 4 * 1024**4
"""Largest virtual size accepted unless configured otherwise (``cache.max_virtual_size``)."""

# qcow2 header field offsets (all big-endian), from the qcow2 specification.
_V2_HEADER_LENGTH = 72
_V3_MIN_HEADER_LENGTH = 104
_MIN_CLUSTER_BITS = 9
_MAX_CLUSTER_BITS = 21
_MAX_BACKING_NAME = 1023
# QEMU refuses to open a qcow2 whose active L1 table exceeds 32 MiB or whose refcount
# table exceeds 8 MiB; nothing legitimate comes near either.
_MAX_L1_ENTRIES = 32 * 1024**2 // 8
_MAX_REFCOUNT_TABLE_BYTES = 8 * 1024**2

# Header extension types.
_EXT_END = 0x00000000
_EXT_BACKING_FORMAT = 0xE2792ACA
_EXT_FULL_DISK_ENCRYPTION = 0x0537BE77
_EXT_DATA_FILE = 0x44415441

# Incompatible feature bits (version 3).
_INCOMPAT_DIRTY = 1 << 0
_INCOMPAT_CORRUPT = 1 << 1
_INCOMPAT_DATA_FILE = 1 << 2
_INCOMPAT_COMPRESSION_TYPE = 1 << 3
_INCOMPAT_EXTENDED_L2 = 1 << 4
_INCOMPAT_KNOWN = (
    _INCOMPAT_DIRTY | _INCOMPAT_CORRUPT | _INCOMPAT_DATA_FILE
    | _INCOMPAT_COMPRESSION_TYPE | _INCOMPAT_EXTENDED_L2
)

_COMPRESSION_TYPES = {0: "zlib", 1: "zstd"}



@dataclass(frozen=True)
class HeaderFacts:
    """What the header of an accepted image says about it."""

    detected_format: ImageFormat
    virtual_size: int
    """Bytes the guest sees: the qcow2 ``size`` field, or the file size for raw."""
    cluster_size: int | None
    """qcow2 cluster size in bytes; None for raw."""
    qcow2_version: int | None
    """2 or 3; None for raw."""
    compression_type: str | None
    """Codec of compressed clusters (``zlib`` or ``zstd``); None for raw. Any qcow2 may
    hold compressed clusters, which is why the cache keeps qcow2 files as they are."""
    dirty: bool = False
    """The lazy-refcounts dirty bit: refcounts need repair, data is still readable."""
    extended_l2: bool = False
    snapshot_count: int = 0
    """Internal snapshots; converting copies only the active layer."""


@dataclass(frozen=True)
class ImageFacts:
    """An image that passed both the header checks and the qemu-img cross-check."""

    format: ImageFormat
    virtual_size: int
    """Bytes a volume needs to hold the image."""
    actual_size: int | None
    """Bytes the file occupies on disk, as qemu-img reports it."""
    cluster_size: int | None
    qcow2_version: int | None
    compression_type: str | None




def check_header(
    head: bytes,
    declared_format: ImageFormat,
    file_size: int,
    *,
    tail: bytes,
    max_virtual_size: int = DEFAULT_MAX_VIRTUAL_SIZE,
) -> HeaderFacts:
    """Accept an image whose header matches its declared format and is self-contained.

    ``head`` is the first ``min(file_size, HEADER_BYTES)`` bytes of the file, ``tail`` the
    last ``min(file_size, TAIL_BYTES)``. Raises ``ImageRejected`` with reason
    ``format_mismatch``, ``bad_header``, ``backing_file``, ``data_file``, ``encrypted``,
    ``corrupt``, ``unknown_features``, or ``virtual_size`` when the image is larger than
    ``max_virtual_size`` bytes.
    """
    detected, where = identify(head, tail)
    if declared_format == "raw":
        if detected != "raw":
            raise ImageRejected(
                "format_mismatch",
                f"image is declared raw but its {where} is that of a {detected} image; "
                "declare the real format or convert it to raw",
            )
        facts = HeaderFacts(
            detected_format="raw", virtual_size=file_size, cluster_size=None,
            qcow2_version=None, compression_type=None,
        )
    elif detected != "qcow2":
        what = "has no recognisable image header" if detected == "raw" else (
            f"is a {detected} image")
        raise ImageRejected(
            "format_mismatch", f"image is declared qcow2 but the file {what}",
        )
    else:
        facts = _check_qcow2(head, file_size)
    _check_virtual_size(facts.virtual_size, max_virtual_size)
    return facts


def _check_virtual_size(virtual_size: int, limit: int) -> None:
    if virtual_size > limit:
        raise ImageRejected(
            "virtual_size",
            f"image has a virtual size of {format_size(virtual_size)} ({virtual_size} bytes), "
            f"more than the limit of {format_size(limit)} ({limit} bytes, "
            "cache.max_virtual_size)",
        )


def _bad_header(message: str) -> ImageRejected:
    return ImageRejected("bad_header", f"qcow2 header is invalid: {message}")


def _check_qcow2(head: bytes, file_size: int) -> HeaderFacts:
    if len(head) < _V2_HEADER_LENGTH:
        raise _bad_header(f"the file holds only {len(head)} bytes, fewer than a qcow2 header")
    (_, version, backing_offset, backing_size, cluster_bits, virtual_size, crypt_method,
     l1_size, l1_offset, refcount_offset, refcount_clusters, snapshot_count,
     snapshots_offset) = struct.unpack_from(">4sIQIIQIIQQIIQ", head, 0)

    if version not in (2, 3):
        raise _bad_header(f"version {version} is not 2 or 3")
    if not _MIN_CLUSTER_BITS <= cluster_bits <= _MAX_CLUSTER_BITS:
        raise _bad_header(f"cluster_bits {cluster_bits} is outside "
                          f"{_MIN_CLUSTER_BITS}..{_MAX_CLUSTER_BITS}")
    cluster_size = 1 << cluster_bits

    incompatible = 0
    compression_type = 0
    header_length = _V2_HEADER_LENGTH
    if version == 3:
        if len(head) < _V3_MIN_HEADER_LENGTH:
            raise _bad_header(f"the file holds only {len(head)} bytes, "
                              "fewer than a version 3 header")
        incompatible, _compatible, _autoclear, refcount_order, header_length = (
            struct.unpack_from(">QQQII", head, 72))
        if header_length < _V3_MIN_HEADER_LENGTH or header_length % 8:
            raise _bad_header(f"header_length {header_length} is not a multiple of 8 "
                              f"of at least {_V3_MIN_HEADER_LENGTH}")
        if header_length > cluster_size:
            raise _bad_header(f"header_length {header_length} exceeds the cluster size")
        if header_length > len(head):
            raise _bad_header(f"the header is {header_length} bytes "
                              f"but the file holds only {len(head)}")
        if refcount_order > 6:
            raise _bad_header(f"refcount_order {refcount_order} is above 6")
        if header_length > _V3_MIN_HEADER_LENGTH:
            compression_type = head[_V3_MIN_HEADER_LENGTH]

    extensions = _read_extensions(head, header_length, cluster_size)

    # Self-containment first: these are the checks that protect the host.
    if backing_offset != 0:
        name = _backing_name(head, backing_offset, backing_size, cluster_size)
        raise ImageRejected(
            "backing_file",
            f"qcow2 image refers to a backing file {name!r}; images must be self-contained",
        )
    if _EXT_DATA_FILE in extensions or incompatible & _INCOMPAT_DATA_FILE:
        name = extensions.get(_EXT_DATA_FILE, b"").decode("utf-8", "replace")
        where = f"an external data file {name!r}" if name else "an external data file"
        raise ImageRejected(
            "data_file",
            f"qcow2 image keeps its data in {where}; images must be self-contained",
        )
    if crypt_method != 0 or _EXT_FULL_DISK_ENCRYPTION in extensions:
        method = {1: "AES", 2: "LUKS"}.get(crypt_method, f"method {crypt_method}")
        raise ImageRejected(
            "encrypted",
            f"qcow2 image is encrypted ({method}); only unencrypted images can be written",
        )
    unknown = incompatible & ~_INCOMPAT_KNOWN
    if unknown:
        raise ImageRejected(
            "unknown_features",
            f"qcow2 image uses unknown incompatible features (bits {_bit_list(unknown)}); "
            "it cannot be read safely",
        )
    if incompatible & _INCOMPAT_CORRUPT:
        raise ImageRejected(
            "corrupt", "qcow2 image is marked corrupt; repair it with 'qemu-img check -r all'",
        )
    if bool(compression_type) != bool(incompatible & _INCOMPAT_COMPRESSION_TYPE):
        raise _bad_header("the compression type and its incompatible feature bit disagree")
    if compression_type not in _COMPRESSION_TYPES:
        raise _bad_header(f"compression type {compression_type} is unknown")

    _check_sizes(virtual_size, cluster_size, l1_size, refcount_clusters,
                 extended_l2=bool(incompatible & _INCOMPAT_EXTENDED_L2))
    _check_table_within_file("L1 table", l1_offset, l1_size * 8, cluster_size, file_size)
    _check_table_within_file("refcount table", refcount_offset,
                             refcount_clusters * cluster_size, cluster_size, file_size)
    if snapshot_count:
        # Each snapshot entry is at least 40 bytes; only the start is checked here.
        _check_table_within_file("snapshot table", snapshots_offset, 40 * snapshot_count,
                                 cluster_size, file_size)

    return HeaderFacts(
        detected_format="qcow2",
        virtual_size=virtual_size,
        cluster_size=cluster_size,
        qcow2_version=version,
        compression_type=_COMPRESSION_TYPES[compression_type],
        dirty=bool(incompatible & _INCOMPAT_DIRTY),
        extended_l2=bool(incompatible & _INCOMPAT_EXTENDED_L2),
        snapshot_count=snapshot_count,
    )


def _read_extensions(head: bytes, start: int, cluster_size: int) -> dict[int, bytes]:
    """Walk the header extensions up to the end marker; they must fit in cluster 0."""
    limit = min(len(head), cluster_size)
    extensions: dict[int, bytes] = {}
    offset = start
    while True:
        if offset + 8 > limit:
            raise _bad_header("the header extensions run past the first cluster "
                              "or the end of the file")
        ext_type, length = struct.unpack_from(">II", head, offset)
        if ext_type == _EXT_END:
            return extensions
        data_start = offset + 8
        if data_start + length > limit:
            raise _bad_header(f"header extension 0x{ext_type:08x} of {length} bytes runs "
                              "past the first cluster or the end of the file")
        extensions.setdefault(ext_type, head[data_start:data_start + length])
        offset = data_start + (length + 7) // 8 * 8


def _backing_name(head: bytes, offset: int, size: int, cluster_size: int) -> str:
    """The backing file name, or a description when the header cannot hold one."""
    if size > _MAX_BACKING_NAME or offset + size > min(len(head), cluster_size):
        return f"<{size} bytes at offset {offset}>"
    return head[offset:offset + size].decode("utf-8", "replace")


def _check_sizes(
    virtual_size: int, cluster_size: int, l1_size: int, refcount_clusters: int, *,
    extended_l2: bool,
) -> None:
    """The virtual size, L1 table and refcount table agree and stay within QEMU's limits."""
    if virtual_size == 0:
        raise _bad_header("the virtual size is 0; an image must not be empty")
    if l1_size > _MAX_L1_ENTRIES:
        raise _bad_header(f"l1_size {l1_size} is above QEMU's limit of {_MAX_L1_ENTRIES}")
    # One L1 entry points at one L2 table of a cluster; extended L2 entries take 16 bytes.
    bytes_per_l1_entry = cluster_size * (cluster_size // (16 if extended_l2 else 8))
    l1_needed = -(-virtual_size // bytes_per_l1_entry)
    if l1_needed > _MAX_L1_ENTRIES:
        raise _bad_header(f"the virtual size {virtual_size} is absurd: with {cluster_size}-byte "
                          f"clusters it needs {l1_needed} L1 entries, above QEMU's limit "
                          f"of {_MAX_L1_ENTRIES}")
    if l1_size < l1_needed:
        raise _bad_header(f"l1_size {l1_size} is too small for the virtual size "
                          f"{virtual_size}, which needs {l1_needed} L1 entries")
    if refcount_clusters == 0:
        raise _bad_header("the refcount table has no clusters")
    if refcount_clusters * cluster_size > _MAX_REFCOUNT_TABLE_BYTES:
        raise _bad_header(f"the refcount table of {refcount_clusters} clusters is above "
                          f"QEMU's limit of {_MAX_REFCOUNT_TABLE_BYTES} bytes")


def _check_table_within_file(
    what: str, offset: int, length: int, cluster_size: int, file_size: int,
) -> None:
    if offset % cluster_size:
        raise _bad_header(f"the {what} offset {offset} is not cluster aligned")
    if length and offset == 0:
        raise _bad_header(f"the {what} starts in cluster 0, on top of the header")
    if length and offset + length > file_size:
        raise _bad_header(f"the {what} ends at byte {offset + length} but the file has only "
                          f"{file_size} bytes; the image is truncated")


def _bit_list(mask: int) -> str:
    return ", ".join(str(bit) for bit in range(64) if mask >> bit & 1)


def crosscheck(
    head: HeaderFacts, qemu_info: Mapping[str, object], declared_format: ImageFormat,
) -> ImageFacts:
    """Confirm ``qemu-img info --output=json`` agrees with the header checks.

    Two independent parsers must tell the same story; any disagreement means one of
    them was fooled, and the image is rejected with reason ``inconsistent_info``.
    """

    def reject(message: str) -> ImageRejected:
        return ImageRejected(
            "inconsistent_info", f"qemu-img info disagrees with the image header: {message}",
        )

    fmt = qemu_info.get("format")
    if fmt != declared_format or head.detected_format != declared_format:
        raise reject(f"it reports format {fmt!r}, the image is declared {declared_format}")
    for key in ("backing-filename", "full-backing-filename"):
        if key in qemu_info:
            raise reject(f"it reports a backing file {qemu_info[key]!r}")
    if qemu_info.get("encrypted"):
        raise reject("it reports the image as encrypted")
    specific = qemu_info.get("format-specific")
    data = specific.get("data") if isinstance(specific, Mapping) else None
    if isinstance(data, Mapping):
        if "data-file" in data:
            raise reject(f"it reports an external data file {data['data-file']!r}")
        if "encrypt" in data:
            raise reject("it reports encryption settings")
        if data.get("corrupt"):
            raise reject("it reports the image as corrupt")

    virtual_size = qemu_info.get("virtual-size")
    if not isinstance(virtual_size, int) or isinstance(virtual_size, bool):
        raise reject(f"its virtual size {virtual_size!r} is not a number")
    if virtual_size <= 0:
        raise reject(f"its virtual size is {virtual_size} bytes; an image must not be empty")
    if declared_format == "qcow2" and virtual_size != head.virtual_size:
        raise reject(f"it reports a virtual size of {virtual_size} bytes, "
                     f"the header says {head.virtual_size}")
    cluster_size = qemu_info.get("cluster-size")
    if head.cluster_size is not None and cluster_size not in (None, head.cluster_size):
        raise reject(f"it reports a cluster size of {cluster_size!r}, "
                     f"the header says {head.cluster_size}")

    actual_size = qemu_info.get("actual-size")
    return ImageFacts(
        format=declared_format,
        virtual_size=virtual_size,
        actual_size=actual_size if isinstance(actual_size, int) else None,
        cluster_size=head.cluster_size,
        qcow2_version=head.qcow2_version,
        compression_type=head.compression_type,
    )
