"""Which format a file really is, by the signatures QEMU's probes look for.

Why it exists: a file declared ``raw`` is written byte for byte onto a volume, so it is
refused when any format QEMU can probe recognises it (``watcher.core.inspect``). The table
of signatures follows QEMU's drivers and grows with them; the qcow2 rules do not.
Pure: the caller passes the file's first and last bytes.
"""

from __future__ import annotations

import re
import struct

TAIL_BYTES = 512
"""How many trailing bytes ``check_header`` needs: ``min(file size, TAIL_BYTES)``.

A DMG image keeps its ``koly`` trailer in the last 512 bytes, and a fixed VHD (vpc) has
its only ``conectix`` footer there; nothing at the start of those files gives them away.
"""

VMDK_DESCRIPTOR_WINDOW = 4096
"""Leading bytes searched for a VMDK text descriptor. QEMU's probe reads 512 bytes, and its
vmdk driver, once told the format, finds ``createType`` anywhere in the descriptor; a wider
window costs nothing and also catches descriptors that QEMU's probe would not."""

QCOW_MAGIC = b"QFI\xfb"

# Other formats' signatures at the start of the file: (name, offset, bytes). qcow
# (version 1) shares qcow2's magic and is told apart by the version field. QEMU's own
# probes also check a version field for some of these; the magic alone is enough to refuse.
_VDI_SIGNATURE = struct.pack("<I", 0xBEDA107F)
_HEAD_MAGICS: tuple[tuple[str, int, bytes], ...] = (
    ("vmdk", 0, b"KDMV"),  # version 4 sparse extent
    ("vmdk", 0, b"COWD"),  # version 3 (ESX) sparse extent
    ("vhdx", 0, b"vhdxfile"),
    ("vdi", 0x40, _VDI_SIGNATURE),
    ("qed", 0, b"QED\x00"),
    ("luks", 0, b"LUKS\xba\xbe"),
    ("vpc", 0, b"conectix"),  # dynamic VHD: a copy of the footer leads the file
    ("parallels", 0, b"WithoutFreeSpace"),
    ("parallels", 0, b"WithouFreSpacExt"),
    ("bochs", 0, b"Bochs Virtual HD Image"),
    ("cloop", 0, b"#!/bin/sh\n#V2.0 Format\n"),
)
# Signatures at the start of the last TAIL_BYTES of the file.
_TAIL_MAGICS: tuple[tuple[str, bytes], ...] = (
    ("dmg", b"koly"),
    ("vpc", b"conectix"),  # fixed VHD: the footer is the only header
)

# A line only a VMDK descriptor has: its title comment, the createType setting or an
# extent line ("RW 8192 FLAT "disk-flat.vmdk" 0"), which is what points at other files.
_VMDK_DESCRIPTOR_LINE = re.compile(
    rb"^[ \t]*(?:#[ \t]*Disk[ \t]+DescriptorFile"
    rb"|createType[ \t]*="
    rb"|(?:RW|RDONLY|NOACCESS)[ \t]+\d+[ \t]+"
    rb"(?:FLAT|SPARSE|ZERO|VMFS|VMFSSPARSE|VMFSRDM|VMFSRAW|SESPARSE)\b)",
    re.MULTILINE | re.IGNORECASE,
)


def detect_format(head: bytes, tail: bytes = b"") -> str:
    """Name the image format that ``head`` (and ``tail``, the file's end) identify; ``raw``
    when none does. Every format QEMU can probe is recognised."""
    return identify(head, tail)[0]


def identify(head: bytes, tail: bytes) -> tuple[str, str]:
    """The format and where its signature was found (``header`` or ``trailer``)."""
    if head.startswith(QCOW_MAGIC):
        if len(head) >= 8 and struct.unpack_from(">I", head, 4)[0] == 1:
            return "qcow", "header"
        return "qcow2", "header"
    for name, offset, magic in _HEAD_MAGICS:
        if head[offset:offset + len(magic)] == magic:
            return name, "header"
    if _is_vmdk_descriptor(head[:VMDK_DESCRIPTOR_WINDOW]):
        return "vmdk", "header"
    if len(tail) == TAIL_BYTES:
        for name, magic in _TAIL_MAGICS:
            if tail.startswith(magic):
                return name, "trailer"
    return "raw", ""


def _is_vmdk_descriptor(window: bytes) -> bool:
    """Whether ``window`` reads as a VMDK text descriptor.

    QEMU's probe skips comment lines and blank lines and then wants ``version=``; this
    accepts that and, wherever it appears, any line only a descriptor has.
    """
    if _VMDK_DESCRIPTOR_LINE.search(window):
        return True
    for line in window.split(b"\n"):
        text = line.strip(b" \t\r")
        if text and not text.startswith(b"#"):
            return text.startswith(b"version=")
    return False
