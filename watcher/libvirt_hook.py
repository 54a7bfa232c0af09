#!/usr/bin/python3 -IS
"""libvirt qemu hook: refuse to start a domain whose root volume is being rewritten.

While the watcher writes an image onto a domain's root volume its metadata element is
``<provisioning/>``; a guest booted then would read a half-written disk and a write into
a running guest's disk corrupts it. libvirtd runs this script before every start
(``prepare begin``, domain XML on stdin); exiting 1 makes libvirt refuse the start and
show our stderr to whoever asked.

An HTTP API job writes a volume by name, with no domain's metadata to mark: it leaves a
marker file in ``/run/libvirt-volume-watcher/writing`` instead (``watcher/adapters/
write_markers.py`` writes them; the format is read again here), and a domain with any disk
on that volume (a file or block source resolving to the marked path, or a ``type='volume'``
disk naming the marked pool and volume) is refused as well. A marker counts only while the
process that wrote it runs (same pid, same start time, same boot); one that cannot be read
is reported on stderr and ignored: nothing here may block every guest on the host.
The environment variable ``LIBVIRT_VOLUME_WATCHER_WRITING_DIR`` names another marker
directory, for tests and for running the hook by hand only: libvirtd gives its hooks a
fixed environment, so the installed hook always reads the default directory.

Installed by ``scripts/install-hook.sh`` as ``/etc/libvirt/hooks/qemu.d/libvirt-volume-watcher``
and run by the system Python, so it uses the standard library only and imports nothing
of the watcher package.

libvirtd runs its hooks synchronously at every step of every domain's life (``prepare``,
``start``, ``started``, ``stopped``, ``release``...), so each start waits for three runs of
this script. Only ``prepare begin`` concerns it: every other call exits before the
imports, and the interpreter runs isolated without ``site`` (``-IS``: no environment
variables, no user or site packages), which keeps a run near the interpreter's own
start-up time.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and sys.argv[2:4] != ["prepare", "begin"]:
    sys.exit(0)

import json  # the imports after the fast exit above
from collections.abc import Callable, Sequence
from xml.parsers import expat  # a tenth of ElementTree's import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, TextIO

NAMESPACE = "urn:libvirt-volume-watcher:1"
WRITING_DIR = "/run/libvirt-volume-watcher/writing"
WRITING_DIR_ENV = "LIBVIRT_VOLUME_WATCHER_WRITING_DIR"
"""Overrides ``WRITING_DIR``; for tests only."""


class DomainFacts:
    """What the hook reads from a domain's XML, in one pass of expat."""

    def __init__(self) -> None:
        self.provisioning: dict[str, str] | None = None
        """The attributes of ``metadata/<provisioning/>`` in our namespace, if present."""
        self.sources: list[tuple[str | None, str | None, str | None]] = []
        """``(path, pool, volume)`` of every disk source, backing chains included: a path
        for ``type='file'``/``'block'``, pool and volume for ``type='volume'``."""


PROVISIONING = f"{NAMESPACE} provisioning"


def domain_facts(domain_xml: str) -> DomainFacts:
    """Parse the domain XML; ``expat.ExpatError`` when it is not well-formed."""
    facts = DomainFacts()
    stack: list[str] = []
    kinds: list[str | None] = []  # the type of each open disk/backingStore, innermost last
    chain_depth: list[int] = []  # stack depths of those elements

    def start(name: str, attrs: dict[str, str]) -> None:
        depth = len(stack)
        parent = stack[-1] if stack else None
        if name == PROVISIONING and stack == ["domain", "metadata"]:
            facts.provisioning = attrs
        elif (name == "disk" and stack == ["domain", "devices"]) or (
                name == "backingStore" and chain_depth and chain_depth[-1] == depth - 1):
            kinds.append(attrs.get("type"))
            chain_depth.append(depth)
        elif name == "source" and parent in ("disk", "backingStore") and chain_depth \
                and chain_depth[-1] == depth - 1:
            kind = kinds[-1]
            if kind == "volume":
                facts.sources.append((None, attrs.get("pool"), attrs.get("volume")))
            elif kind in ("file", "block"):
                path = attrs.get("file") if kind == "file" else attrs.get("dev")
                if path:
                    facts.sources.append((path, None, None))
        stack.append(name)

    def end(name: str) -> None:
        stack.pop()
        if chain_depth and chain_depth[-1] == len(stack):
            chain_depth.pop()
            kinds.pop()

    parser = expat.ParserCreate(namespace_separator=" ")
    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.Parse(domain_xml, True)
    return facts


def refusal(facts: DomainFacts) -> str | None:
    """Why the domain must not start now, or None when it may."""
    if facts.provisioning is None:
        return None
    image = facts.provisioning.get("image") or "an image"
    started = facts.provisioning.get("started") or "an unknown time"
    return (f"libvirt-volume-watcher is writing {image} onto this domain's root volume "
            f"(started {started}); it can start once the write has finished")


class Marker:
    """A volume being written, as its marker file says."""

    __slots__ = ("job_id", "pool", "real_path", "started", "volume")

    def __init__(self, real_path: str, pool: str | None, volume: str | None, job_id: str,
                 started: str) -> None:
        self.real_path = real_path
        self.pool = pool
        self.volume = volume
        self.job_id = job_id
        self.started = started


def process_start_time(pid: int) -> int | None:
    """When ``pid`` started (clock ticks after boot, ``/proc/<pid>/stat`` field 22)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            fields = stat.read().rpartition(")")[2].split()
        return int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as source:
            return source.read().strip()
    except OSError:
        return None


def writer_alive(content: dict[str, Any]) -> bool:
    """Whether the process that wrote a marker still runs: same pid, start time and boot."""
    pid, started = content.get("pid"), content.get("pid_start_time")
    if not isinstance(pid, int) or not isinstance(started, int):
        return False
    if content.get("boot_id") not in (None, boot_id()):
        return False
    return process_start_time(pid) == started


def parse_marker(text: str) -> tuple[Marker, dict[str, Any]]:
    """A marker file's content; ``ValueError`` when it is not one."""
    content = json.loads(text)
    if not isinstance(content, dict):
        raise ValueError("not a JSON object")
    real_path, job_id = content.get("real_path"), content.get("job_id")
    if not isinstance(real_path, str) or not real_path or not isinstance(job_id, str):
        raise ValueError("real_path or job_id missing")

    def optional(key: str) -> str | None:
        value = content.get(key)
        return value if isinstance(value, str) else None

    return Marker(real_path, optional("pool"), optional("volume"), job_id,
                  optional("started") or "an unknown time"), content


def live_markers(directory: str, note: Callable[[str], None],
                 alive: Callable[[dict[str, Any]], bool] = writer_alive) -> list[Marker]:
    """The markers in ``directory`` whose writer still runs; others are skipped, and any
    that cannot be read are reported through ``note``."""
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
    except OSError as exc:
        note(f"cannot list {directory} ({exc}); ignoring its markers")
        return []
    markers: list[Marker] = []
    for name in names:
        if name.startswith(".") or not name.endswith(".json"):
            continue  # a temp file being written
        path = os.path.join(directory, name)
        try:
            with open(path, encoding="utf-8") as source:
                marker, content = parse_marker(source.read())
        except FileNotFoundError:
            continue  # the write finished meanwhile
        except (OSError, ValueError) as exc:
            note(f"ignoring unreadable marker {path} ({exc})")
            continue
        if alive(content):
            markers.append(marker)
    return markers


def marker_refusal(facts: DomainFacts, markers: Sequence[Marker],
                   realpath: Callable[[str], str] = os.path.realpath) -> str | None:
    """Why the domain must not start: a disk of it is on a marked volume; else None."""
    if not markers:
        return None
    for path, pool, volume in facts.sources:
        for marker in markers:
            if path is not None:
                hit = realpath(path) == marker.real_path
            else:
                hit = (marker.pool is not None and marker.volume is not None
                       and (pool, volume) == (marker.pool, marker.volume))
            if hit:
                what = (f"volume {marker.volume} of pool {marker.pool} ({marker.real_path})"
                        if marker.pool and marker.volume else marker.real_path)
                return (f"libvirt-volume-watcher is writing {what} for job {marker.job_id} "
                        f"(started {marker.started}); it can start once the write has finished")
    return None


def writing_dir() -> str:
    return os.environ.get(WRITING_DIR_ENV) or WRITING_DIR


def _marker_reason(facts: DomainFacts, err: TextIO) -> str | None:
    def note(text: str) -> None:
        print(f"libvirt-volume-watcher hook: {text}", file=err)

    try:
        return marker_refusal(facts, live_markers(writing_dir(), note))
    except Exception as exc:  # a bug here must not block every guest on this host
        note(f"checking the write markers failed ({exc!r}); allowing the start")
        return None


def main(argv: Sequence[str] | None = None, stdin: TextIO | None = None,
         stderr: TextIO | None = None) -> int:
    """Hook entry point: ``GUEST OPERATION SUB-OPERATION EXTRA``; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 3 or (args[1], args[2]) != ("prepare", "begin"):
        return 0
    err = stderr or sys.stderr
    try:
        facts = domain_facts((stdin or sys.stdin).read())
    except expat.ExpatError as exc:
        # libvirt always sends valid XML; never block every guest on this host over it.
        print(f"libvirt-volume-watcher hook: cannot parse the domain XML ({exc}); "
              "allowing the start", file=err)
        return 0
    reason = refusal(facts) or _marker_reason(facts, err)
    if reason is None:
        return 0
    print(f"{args[0]}: {reason}", file=err)
    return 1


if __name__ == "__main__":
    sys.exit(main())
