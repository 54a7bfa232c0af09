"""Tiny bootable VM images for end-to-end tests of reprovisioning.

A reprovision is proven when a guest that booted image v1 boots image v2 afterwards. The
smallest guest that shows which image it booted is a 512-byte x86 boot sector that prints a
banner on COM1 and halts; SeaBIOS loads it from a virtio disk and libvirt's file-backed
serial port records the banner. No assembler is installed, so the 16-bit real-mode code is
emitted here byte by byte, with a two-pass label fixup for the short jumps.
"""

from __future__ import annotations

import grp
import os
import subprocess
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

SECTOR = 512
LOAD_ADDRESS = 0x7C00
"""Where the BIOS copies the boot sector (segment 0)."""
COM1 = 0x3F8


class _RealModeCode:
    """Just enough of a 16-bit assembler: raw bytes, labels and short relative jumps."""

    def __init__(self) -> None:
        self.code = bytearray()
        self.labels: dict[str, int] = {}
        self.fixups: list[tuple[int, str]] = []
        self.word_fixups: list[tuple[int, str]] = []

    def emit(self, *data: int) -> None:
        self.code.extend(data)

    def label(self, name: str) -> None:
        self.labels[name] = len(self.code)

    def jump_short(self, opcode: int, target: str) -> None:
        """``jmp``/``jz``/``jnz`` rel8 to ``target``."""
        self.emit(opcode, 0)
        self.fixups.append((len(self.code) - 1, target))

    def mov_si_address_of(self, target: str) -> None:
        self.emit(0xBE, 0, 0)  # mov si, imm16
        self.word_fixups.append((len(self.code) - 2, target))

    def mov_dx(self, value: int) -> None:
        self.emit(0xBA, value & 0xFF, value >> 8)  # mov dx, imm16

    def out_dx_byte(self, port: int, value: int) -> None:
        self.mov_dx(port)
        self.emit(0xB0, value)  # mov al, imm8
        self.emit(0xEE)  # out dx, al

    def assemble(self) -> bytes:
        for where, target in self.fixups:
            offset = self.labels[target] - (where + 1)
            assert -128 <= offset <= 127, f"jump to {target} out of range"
            self.code[where] = offset & 0xFF
        for where, target in self.word_fixups:
            address = LOAD_ADDRESS + self.labels[target]
            self.code[where : where + 2] = address.to_bytes(2, "little")
        return bytes(self.code)


def boot_sector(banner: str) -> bytes:
    """A 512-byte MBR that prints ``banner`` and a newline on COM1, then halts forever."""
    text = (banner + "\r\n").encode("ascii")
    asm = _RealModeCode()
    asm.emit(0xFA)  # cli
    asm.emit(0xFC)  # cld
    asm.emit(0x31, 0xC0)  # xor ax, ax
    asm.emit(0x8E, 0xD8)  # mov ds, ax
    # 8250/16550 set-up: no interrupts, 115200 baud (divisor 1), 8N1, FIFOs on, DTR/RTS.
    asm.out_dx_byte(COM1 + 1, 0x00)
    asm.out_dx_byte(COM1 + 3, 0x80)
    asm.out_dx_byte(COM1 + 0, 0x01)
    asm.out_dx_byte(COM1 + 1, 0x00)
    asm.out_dx_byte(COM1 + 3, 0x03)
    asm.out_dx_byte(COM1 + 2, 0xC7)
    asm.out_dx_byte(COM1 + 4, 0x03)
    asm.mov_si_address_of("banner")
    asm.label("next")
    asm.emit(0xAC)  # lodsb
    asm.emit(0x84, 0xC0)  # test al, al
    asm.jump_short(0x74, "halt")  # jz halt
    asm.emit(0x88, 0xC4)  # mov ah, al
    asm.label("wait")
    asm.mov_dx(COM1 + 5)
    asm.emit(0xEC)  # in al, dx  (line status)
    asm.emit(0xA8, 0x20)  # test al, 0x20  (transmit holding register empty)
    asm.jump_short(0x74, "wait")  # jz wait
    asm.emit(0x88, 0xE0)  # mov al, ah
    asm.mov_dx(COM1)
    asm.emit(0xEE)  # out dx, al
    asm.jump_short(0xEB, "next")  # jmp next
    asm.label("halt")
    asm.emit(0xFA)  # cli
    asm.emit(0xF4)  # hlt
    asm.jump_short(0xEB, "halt")  # jmp halt
    asm.label("banner")
    asm.emit(*text, 0)
    code = asm.assemble()
    if len(code) > SECTOR - 2:
        raise ValueError(f"banner too long: boot code is {len(code)} bytes")
    return code.ljust(SECTOR - 2, b"\0") + b"\x55\xaa"


def write_raw_image(path: Path, banner: str, size: int = 1024 * 1024) -> Path:
    """A sparse raw disk of ``size`` bytes whose first sector boots and prints ``banner``."""
    with path.open("wb") as out:
        out.write(boot_sector(banner))
        out.truncate(size)
    return path


def write_qcow2_image(path: Path, banner: str, size: int = 1024 * 1024) -> Path:
    """A qcow2 made from the raw boot disk with ``qemu-img convert``."""
    raw = path.with_suffix(".raw-src")
    write_raw_image(raw, banner, size)
    try:
        subprocess.run(
            ["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(path)],
            check=True, capture_output=True, timeout=60,
        )
    finally:
        raw.unlink(missing_ok=True)
    return path


def domain_type() -> str:
    """``kvm`` when QEMU (running as libvirt-qemu, group kvm) can open /dev/kvm, else TCG.

    A /dev/kvm left as root-only 0600 exists but makes every kvm guest fail to start.
    """
    try:
        info = os.stat("/dev/kvm")
    except OSError:
        return "qemu"
    try:
        kvm_gid = grp.getgrnam("kvm").gr_gid
    except KeyError:
        kvm_gid = None
    usable = info.st_mode & 0o006 == 0o006 or (
        info.st_gid == kvm_gid and info.st_mode & 0o060 == 0o060
    )
    return "kvm" if usable else "qemu"


def domain_xml(
    name: str,
    disk_source: str,
    console_log: Path,
    *,
    disk_type: str = "file",
    disk_format: str = "raw",
    metadata: str = "",
) -> str:
    """A 64 MiB, network-less guest booting from virtio ``vda`` with COM1 logged to a file.

    ``disk_type`` is ``file`` or ``block`` (``disk_source`` a path) or ``volume``
    (``disk_source`` is ``pool/volume``).
    """
    if disk_type == "volume":
        pool, volume = disk_source.split("/", 1)
        source = f"<source pool={quoteattr(pool)} volume={quoteattr(volume)}/>"
    elif disk_type == "block":
        source = f"<source dev={quoteattr(disk_source)}/>"
    else:
        source = f"<source file={quoteattr(disk_source)}/>"
    log = quoteattr(str(console_log))
    return f"""<domain type='{domain_type()}'>
  <name>{escape(name)}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <metadata>{metadata}</metadata>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <boot dev='hd'/>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <disk type='{disk_type}' device='disk'>
      <driver name='qemu' type='{disk_format}' cache='none'/>
      {source}
      <target dev='vda' bus='virtio'/>
    </disk>
    <serial type='file'>
      <source path={log}/>
      <target port='0'/>
    </serial>
    <console type='file'>
      <source path={log}/>
      <target type='serial' port='0'/>
    </console>
    <video><model type='none'/></video>
    <memballoon model='none'/>
  </devices>
</domain>
"""
