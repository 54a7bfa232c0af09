"""The daemon's own LVM and qemu-img code, run inside the service's sandbox.

Why it exists: ``DevicePolicy=closed``, ``ProtectSystem=strict``, the capability bounding
set and the system call filter of ``libvirt-volume-watcher.service`` can each break lvm
or qemu-img in ways no static check shows (a PV whose device class is not allowed hides
the whole VG from ``lvs``). ``tests/systemd/in-guest.sh`` runs this file as the main
process of a copy of the installed unit, with the installed virtualenv's Python, on a
real LV in the User-Mode Linux guest, and reads its verdict from the journal.

usage: python sandbox_probe.py /dev/VG/LV SOURCE.qcow2 FORBIDDEN_DEVICE
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from watcher.adapters import lvm
from watcher.adapters.qemu_img import qemu_img_info, write_image
from watcher.core.lvm_rules import cow_snapshot_size

MIB = 1024 * 1024
MARK = b"libvirt-volume-watcher sandbox probe"
"""The first bytes of the probe image (in-guest.sh writes them)."""


def forbidden_is_refused(device: str) -> str:
    """The sandbox is in force: a block device class the unit does not allow is refused."""
    try:
        os.close(os.open(device, os.O_RDONLY))
    except PermissionError:
        return f"{device} refused (EPERM)"
    raise SystemExit(f"FAIL: {device} opened: DevicePolicy=closed is not in force")


async def probe(lv_path: str, source: Path) -> list[str]:
    done: list[str] = []
    info = await lvm.recognise(os.path.realpath(lv_path))  # lvs: it must read the PV
    if info is None:
        raise SystemExit(f"FAIL: lvs does not see {lv_path} as an LV")
    done.append(f"lvs sees {info.name} ({info.size // MIB} MiB)")
    grown = await lvm.grow(info, info.size + 8 * MIB)  # lvextend
    done.append(f"lvextend grew it to {grown.size // MIB} MiB")
    image = await qemu_img_info(source, "qcow2")
    done.append(f"qemu-img info read {source.name} ({image.get('virtual-size')} bytes)")
    # A rollback snapshot around the write (lvcreate --snapshot, then lvremove), as a
    # reprovision with snapshot: does.
    async with lvm.rollback_snapshot(grown, cow_snapshot_size(grown, 8 * MIB)):
        await write_image(source, "qcow2", Path(grown.path))
    done.append("qemu-img convert wrote the LV inside a rollback snapshot")
    with open(grown.path, "rb") as device:
        head = device.read(len(MARK))
    if head != MARK:
        raise SystemExit(f"FAIL: the LV starts with {head!r}, not the image's data")
    done.append("the LV holds the image's data")
    return done


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    lv_path, source, forbidden = argv[1], Path(argv[2]), argv[3]
    steps = [forbidden_is_refused(forbidden), *asyncio.run(probe(lv_path, source))]
    for step in steps:
        print(f"sandbox probe: {step}", flush=True)
    print("sandbox probe: ok", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
