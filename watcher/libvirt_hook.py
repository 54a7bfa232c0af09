#!/usr/bin/python3
"""libvirt qemu hook: refuse to start a domain whose root volume is being rewritten.

While the watcher writes an image onto a domain's root volume its metadata element is
``<provisioning/>``; a guest booted then would read a half-written disk and a write into
a running guest's disk corrupts it. libvirtd runs this script before every start
(``prepare begin``, domain XML on stdin); exiting 1 makes libvirt refuse the start and
show our stderr to whoever asked.

Installed by ``scripts/install-hook.sh`` as ``/etc/libvirt/hooks/qemu.d/libvirt-volume-watcher``
and run by the system Python, so it uses the standard library only and imports nothing
of the watcher package.
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from typing import TextIO

NAMESPACE = "urn:libvirt-volume-watcher:1"


def refusal(domain_xml: str) -> str | None:
    """Why the domain must not start now, or None when it may."""
    root = ET.fromstring(domain_xml)
    metadata = root.find("metadata")
    if metadata is None:
        return None
    element = metadata.find(f"{{{NAMESPACE}}}provisioning")
    if element is None:
        return None
    image = element.get("image") or "an image"
    started = element.get("started") or "an unknown time"
    return (f"libvirt-volume-watcher is writing {image} onto this domain's root volume "
            f"(started {started}); it can start once the write has finished")


def main(argv: Sequence[str] | None = None, stdin: TextIO | None = None,
         stderr: TextIO | None = None) -> int:
    """Hook entry point: ``GUEST OPERATION SUB-OPERATION EXTRA``; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 3 or (args[1], args[2]) != ("prepare", "begin"):
        return 0
    err = stderr or sys.stderr
    try:
        reason = refusal((stdin or sys.stdin).read())
    except ET.ParseError as exc:
        # libvirt always sends valid XML; never block every guest on this host over it.
        print(f"libvirt-volume-watcher hook: cannot parse the domain XML ({exc}); "
              "allowing the start", file=err)
        return 0
    if reason is None:
        return 0
    print(f"{args[0]}: {reason}", file=err)
    return 1


if __name__ == "__main__":
    sys.exit(main())
