"""What a domain says about itself, and what the watcher should do about it.

A reprovision is requested and reported through one metadata element of the domain (the
contract in docs/operating.md, "The metadata tag": ``<reprovision/>``, ``<provisioning/>``,
``<provisioned/>``, ``<failed/>`` in namespace ``urn:libvirt-volume-watcher:1``). This
module parses and renders that element, finds the root disk in the domain XML, and decides,
from a snapshot of the domain and the policies, whether to write, to give up with a reason,
or to wait. No I/O: the libvirt adapter gathers the facts and the job acts on the decision.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Literal

from watcher.core.errors import PermanentError
from watcher.core.policy import DomainRule, PolicySet

NAMESPACE = "urn:libvirt-volume-watcher:1"
"""Namespace URI of the watcher's metadata element."""
KEY = "vw"
"""Prefix libvirt binds to the namespace when the watcher writes the element."""

StateKind = Literal["reprovision", "provisioning", "provisioned", "failed"]
STATE_KINDS: tuple[StateKind, ...] = ("reprovision", "provisioning", "provisioned", "failed")
REQUEST_KINDS: frozenset[str] = frozenset({"reprovision", "provisioning"})
"""States that ask for a write: a new request, or one interrupted by a crash."""

_TIME_ATTRIBUTE: dict[str, str] = {
    "provisioning": "started", "provisioned": "finished", "failed": "at",
}
"""Which attribute carries each state's timestamp."""


class MalformedState(PermanentError):
    """The metadata element is not XML or not one of the four known states."""


class RootDiskUnusable(PermanentError):
    """The domain XML names no root disk the watcher can write; the message says why."""


@dataclass(frozen=True)
class DomainState:
    """The watcher's metadata element of one domain."""

    kind: StateKind
    image: str | None = None
    """Requested (override) image, or the image being / last written."""
    sha256: str | None = None
    """Digest of the image written or being written."""
    time: str | None = None
    """ISO-8601: ``started`` (provisioning), ``finished`` (provisioned) or ``at`` (failed)."""
    reason: str | None = None
    """Why a reprovision failed; only for ``failed``."""

    @property
    def is_request(self) -> bool:
        return self.kind in REQUEST_KINDS


def parse_state(element: str | None) -> DomainState | None:
    """The state held by the element's XML (as libvirt returns it), or None when absent.

    A namespace prefix or declaration on the element is accepted; an unknown element
    or broken XML raises ``MalformedState``.
    """
    if element is None or not element.strip():
        return None
    try:
        root = ET.fromstring(element)
    except ET.ParseError as exc:
        raise MalformedState(f"metadata element is not XML: {exc}") from None
    tag = root.tag.rsplit("}", 1)[-1]
    if tag not in STATE_KINDS:
        raise MalformedState(
            f"metadata element <{tag}> is not one of {', '.join(STATE_KINDS)}")
    kind: StateKind = tag
    time_attribute = _TIME_ATTRIBUTE.get(kind)
    return DomainState(
        kind=kind,
        image=root.get("image") or None,
        sha256=root.get("sha256") or None,
        time=root.get(time_attribute) if time_attribute else None,
        reason=root.get("reason") if kind == "failed" else None,
    )


def render_state(state: DomainState) -> str:
    """The element's XML, without namespace (libvirt adds it under the ``vw`` prefix)."""
    element = ET.Element(state.kind)
    if state.image is not None:
        element.set("image", state.image)
    if state.sha256 is not None and state.kind in ("provisioning", "provisioned"):
        element.set("sha256", state.sha256)
    if state.kind == "failed":
        element.set("reason", state.reason or "unknown")
    time_attribute = _TIME_ATTRIBUTE.get(state.kind)
    if time_attribute is not None and state.time is not None:
        element.set(time_attribute, state.time)
    return ET.tostring(element, encoding="unicode")


DiskSourceType = Literal["file", "block", "volume"]


@dataclass(frozen=True)
class RootDiskSource:
    """Where a domain's root disk lives, as its XML says."""

    type: DiskSourceType
    target: str
    """Target dev, e.g. ``vda``."""
    path: str | None = None
    """File or device path, for ``file`` and ``block``."""
    pool: str | None = None
    """Storage pool name, for ``volume``."""
    volume: str | None = None
    """Volume name in ``pool``, for ``volume``."""
    format: str | None = None
    """``<driver type=...>``; None when the XML does not say (libvirt then uses raw)."""


def root_disk(domain_xml: str, target: str | None = None) -> RootDiskSource:
    """The disk with target dev ``target``, or the first ``<disk device='disk'>``.

    Raises ``RootDiskUnusable`` when there is none, or its source is of a kind the
    watcher cannot write (network, nvme, missing).
    """
    try:
        root = ET.fromstring(domain_xml)
    except ET.ParseError as exc:
        raise RootDiskUnusable(f"domain XML is not XML: {exc}") from None
    disks = root.findall("./devices/disk")
    chosen: ET.Element | None = None
    for disk in disks:
        dev = disk.find("target")
        dev_name = dev.get("dev") if dev is not None else None
        if target is None and disk.get("device", "disk") == "disk":
            chosen = disk
            break
        if target is not None and dev_name == target:
            chosen = disk
            break
    if chosen is None:
        if target is None:
            raise RootDiskUnusable("domain has no <disk device='disk'>")
        raise RootDiskUnusable(f"domain has no disk with target {target}")
    if chosen.get("device", "disk") != "disk":
        raise RootDiskUnusable(
            f"disk {target} is a {chosen.get('device')}, not a disk")
    target_element = chosen.find("target")
    dev_name = (target_element.get("dev") if target_element is not None else None) or "?"
    driver = chosen.find("driver")
    disk_format = driver.get("type") if driver is not None else None
    source = chosen.find("source")
    kind = chosen.get("type", "file")
    if source is None:
        raise RootDiskUnusable(f"disk {dev_name} has no source")
    if kind == "file" and source.get("file"):
        return RootDiskSource("file", dev_name, path=source.get("file"), format=disk_format)
    if kind == "block" and source.get("dev"):
        return RootDiskSource("block", dev_name, path=source.get("dev"), format=disk_format)
    if kind == "volume" and source.get("pool") and source.get("volume"):
        return RootDiskSource("volume", dev_name, pool=source.get("pool"),
                              volume=source.get("volume"), format=disk_format)
    raise RootDiskUnusable(
        f"disk {dev_name} has a source of type {kind!r} the watcher cannot write "
        "(file, block and volume are supported)")


@dataclass(frozen=True)
class DomainSnapshot:
    """What the decision needs to know about one domain, read at one moment."""

    name: str
    uuid: str
    shut_off: bool
    managed_save: bool
    state: DomainState | None


@dataclass(frozen=True)
class Write:
    """Write ``image`` onto the domain's root volume as ``rule`` says."""

    rule: DomainRule
    image: str


@dataclass(frozen=True)
class Fail:
    """Record ``failed`` with ``reason``; nothing is written."""

    reason: str
    image: str | None
    rule: DomainRule
    """The rule that made the domain this watcher's."""
    step: str
    """Where the job stopped (``check``, ``resolve``), for the failure's log line."""


@dataclass(frozen=True)
class Unmatched:
    """A request no rule of this watcher matches: leave the domain exactly as it is."""

    why: str


@dataclass(frozen=True)
class Nothing:
    """Do nothing now; ``why`` is for debug logs."""

    why: str


Action = Write | Fail | Unmatched | Nothing


def decide(snapshot: DomainSnapshot, policies: PolicySet) -> Action:
    """The action a domain's snapshot calls for under ``policies``.

    Whose domain it is comes first: a request no rule matches may be another watcher's
    on the same host, so nothing about the domain (power, managed save) is judged here.
    """
    state = snapshot.state
    if state is None or not state.is_request:
        return Nothing("no reprovision requested")
    rule = policies.rule_for(snapshot.name)
    if rule is None:
        return Unmatched(policies.why_unmatched(snapshot.name))
    if not snapshot.shut_off:
        return Nothing("requested; waiting until the domain is shut off")
    if snapshot.managed_save:
        return Fail(
            "domain has a managed-save image; writing its disk would corrupt the saved "
            "state (remove it with virsh managedsave-remove, then request again)",
            state.image, rule, "check")
    image = state.image or rule.image
    if image not in policies.images:
        return Fail(f"image {image!r} is not defined by any policy", image, rule, "resolve")
    return Write(rule, image)
