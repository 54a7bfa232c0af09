"""The reprovision tag, the root disk of a domain and the decision: tables over pure code."""

from __future__ import annotations

import io

import pytest

from watcher import libvirt_hook
from watcher.core.domain import (
    Action,
    DomainSnapshot,
    DomainState,
    Fail,
    MalformedState,
    Nothing,
    RootDiskSource,
    RootDiskUnusable,
    Unmatched,
    Write,
    decide,
    parse_state,
    render_state,
    root_disk,
)
from watcher.core.policy import DomainRule, ImageSpec, PolicySet

NS = "urn:libvirt-volume-watcher:1"
DIGEST = "ab" * 32

# ---- the metadata element -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("element", "expected"),
    [
        pytest.param(None, None, id="absent"),
        pytest.param("  ", None, id="empty"),
        pytest.param("<reprovision/>", DomainState("reprovision"), id="bare-request"),
        pytest.param('<reprovision image="debian"/>', DomainState("reprovision", image="debian"),
                     id="request-with-image"),
        pytest.param(f'<vw:reprovision xmlns:vw="{NS}"/>', DomainState("reprovision"),
                     id="request-with-namespace-prefix"),
        pytest.param(f'<provisioning image="u" sha256="{DIGEST}" started="2026-01-01T00:00:00Z"/>',
                     DomainState("provisioning", "u", DIGEST, "2026-01-01T00:00:00Z"),
                     id="provisioning"),
        pytest.param(f'<provisioned image="u" sha256="{DIGEST}" finished="2026-01-02T00:00:00Z"/>',
                     DomainState("provisioned", "u", DIGEST, "2026-01-02T00:00:00Z"),
                     id="provisioned"),
        pytest.param('<failed image="u" reason="no policy matches" at="2026-01-03T00:00:00Z"/>',
                     DomainState("failed", "u", None, "2026-01-03T00:00:00Z", "no policy matches"),
                     id="failed"),
    ],
)
def test_metadata_elements_parse_into_states(element: str | None,
                                             expected: DomainState | None) -> None:
    assert parse_state(element) == expected


@pytest.mark.parametrize(
    "element", ["<reprovision", "<rebuild/>", "plain text"],
    ids=["broken-xml", "unknown-element", "not-xml"])
def test_unknown_or_broken_metadata_is_malformed(element: str) -> None:
    with pytest.raises(MalformedState):
        parse_state(element)


@pytest.mark.parametrize(
    "state",
    [
        DomainState("reprovision"),
        DomainState("reprovision", image="debian"),
        DomainState("provisioning", "u", DIGEST, "2026-01-01T00:00:00+00:00"),
        DomainState("provisioned", "u", DIGEST, "2026-01-02T00:00:00+00:00"),
        DomainState("failed", "u", None, "2026-01-03T00:00:00+00:00", 'size <"big"> & more'),
    ],
    ids=lambda s: s.kind + ("-with-image" if s.image else ""),
)
def test_rendered_states_parse_back_to_themselves(state: DomainState) -> None:
    assert parse_state(render_state(state)) == state


def test_rendered_states_use_the_contract_attribute_names() -> None:
    assert render_state(DomainState("provisioned", "u", DIGEST, "T")) == (
        f'<provisioned image="u" sha256="{DIGEST}" finished="T" />')
    assert render_state(DomainState("failed", "u", None, "T", "why")) == (
        '<failed image="u" reason="why" at="T" />')


# ---- the root disk ------------------------------------------------------------------------


def domain_xml(*disks: str) -> str:
    return f"<domain type='kvm'><name>d</name><devices>{''.join(disks)}</devices></domain>"


CDROM = ("<disk type='file' device='cdrom'><source file='/iso/seed.iso'/>"
         "<target dev='sda' bus='sata'/></disk>")
FILE_DISK = ("<disk type='file' device='disk'><driver name='qemu' type='raw'/>"
             "<source file='/var/lib/libvirt/images/d.img'/>"
             "<target dev='vda' bus='virtio'/></disk>")
BLOCK_DISK = ("<disk type='block' device='disk'><driver name='qemu' type='raw'/>"
              "<source dev='/dev/vg0/d-root'/><target dev='vdb' bus='virtio'/></disk>")
VOLUME_DISK = ("<disk type='volume' device='disk'><source pool='vg0' volume='d-data'/>"
               "<target dev='vdc' bus='virtio'/></disk>")
NETWORK_DISK = ("<disk type='network' device='disk'><source protocol='rbd' name='p/i'/>"
                "<target dev='vdd' bus='virtio'/></disk>")


@pytest.mark.parametrize(
    ("disks", "target", "expected"),
    [
        pytest.param((CDROM, FILE_DISK, BLOCK_DISK), None,
                     RootDiskSource("file", "vda", path="/var/lib/libvirt/images/d.img",
                                    format="raw"), id="first-disk-skipping-cdrom"),
        pytest.param((FILE_DISK, BLOCK_DISK), "vdb",
                     RootDiskSource("block", "vdb", path="/dev/vg0/d-root", format="raw"),
                     id="block-by-target"),
        pytest.param((FILE_DISK, VOLUME_DISK), "vdc",
                     RootDiskSource("volume", "vdc", pool="vg0", volume="d-data"),
                     id="pool-volume-by-target"),
    ],
)
def test_root_disk_is_found_by_target_or_as_the_first_disk(
        disks: tuple[str, ...], target: str | None, expected: RootDiskSource) -> None:
    assert root_disk(domain_xml(*disks), target) == expected


@pytest.mark.parametrize(
    ("disks", "target", "message"),
    [
        pytest.param((CDROM,), None, "no <disk device='disk'>", id="only-a-cdrom"),
        pytest.param((FILE_DISK,), "vdz", "no disk with target vdz", id="unknown-target"),
        pytest.param((CDROM,), "sda", "is a cdrom", id="target-is-a-cdrom"),
        pytest.param((NETWORK_DISK,), None, "type 'network'", id="network-disk"),
        pytest.param(("<disk type='file' device='disk'><target dev='vda'/></disk>",), None,
                     "has no source", id="empty-drive"),
    ],
)
def test_root_disk_that_cannot_be_written_is_refused_with_a_reason(
        disks: tuple[str, ...], target: str | None, message: str) -> None:
    with pytest.raises(RootDiskUnusable, match=message):
        root_disk(domain_xml(*disks), target)


# ---- the decision -------------------------------------------------------------------------

WEB = DomainRule("web-*", "ubuntu", grow=True)
POLICIES = PolicySet(
    images={
        "ubuntu": ImageSpec("ubuntu", "b", "u.qcow2", None, "qcow2"),
        "debian": ImageSpec("debian", "b", "d.qcow2", None, "qcow2"),
    },
    rules=(WEB,),
)


def snapshot(state: DomainState | None, *, name: str = "web-1", shut_off: bool = True,
             managed_save: bool = False) -> DomainSnapshot:
    return DomainSnapshot(name, "uuid-1", shut_off, managed_save, state)


@pytest.mark.parametrize(
    ("snap", "expected"),
    [
        pytest.param(snapshot(None), Nothing("no reprovision requested"), id="untagged"),
        pytest.param(snapshot(DomainState("provisioned", "ubuntu", DIGEST, "T")),
                     Nothing("no reprovision requested"), id="already-provisioned"),
        pytest.param(snapshot(DomainState("failed", "ubuntu", None, "T", "x")),
                     Nothing("no reprovision requested"), id="failed-waits-for-a-new-request"),
        pytest.param(snapshot(DomainState("reprovision"), shut_off=False),
                     Nothing("requested; waiting until the domain is shut off"),
                     id="tagged-while-running"),
        pytest.param(snapshot(DomainState("reprovision")), Write(WEB, "ubuntu"),
                     id="tagged-and-shut-off"),
        pytest.param(snapshot(DomainState("reprovision", image="debian")), Write(WEB, "debian"),
                     id="tag-overrides-the-image"),
        pytest.param(snapshot(DomainState("provisioning", "debian", DIGEST, "T")),
                     Write(WEB, "debian"), id="interrupted-write-resumes-with-its-image"),
        pytest.param(snapshot(DomainState("reprovision"), name="db-1"),
                     Unmatched("no rule of this watcher matches it (another instance may own "
                               "it)"), id="no-rule-matches-left-alone"),
        pytest.param(snapshot(DomainState("reprovision", image="arch")),
                     Fail("image 'arch' is not defined by any policy", "arch", WEB, "resolve"),
                     id="unknown-override-image-of-a-matched-domain"),
    ],
)
def test_decision_for_a_domain_snapshot(snap: DomainSnapshot, expected: Action) -> None:
    assert decide(snap, POLICIES) == expected


def test_a_managed_save_image_fails_the_request_with_that_reason() -> None:
    action = decide(snapshot(DomainState("reprovision"), managed_save=True), POLICIES)
    assert isinstance(action, Fail)
    assert "managed-save image" in action.reason


def test_a_managed_save_image_of_a_running_domain_is_not_judged_until_it_stops() -> None:
    action = decide(snapshot(DomainState("reprovision"), shut_off=False, managed_save=True),
                    POLICIES)
    assert isinstance(action, Nothing)


# ---- the start interlock (libvirt hook) ---------------------------------------------------


def hook(operation: str, sub_operation: str, domain_xml: str) -> tuple[int, str]:
    err = io.StringIO()
    status = libvirt_hook.main(["web-1", operation, sub_operation, "-"],
                               io.StringIO(domain_xml), err)
    return status, err.getvalue()


def tagged_xml(element: str) -> str:
    return (f"<domain><name>web-1</name><metadata><vw:{element} xmlns:vw='{NS}' image='u' "
            "started='T'/></metadata></domain>")


def test_hook_refuses_to_start_a_domain_being_written_and_says_why() -> None:
    status, message = hook("prepare", "begin", tagged_xml("provisioning"))
    assert status == 1
    assert "web-1: libvirt-volume-watcher is writing u" in message


@pytest.mark.parametrize(
    ("operation", "sub_operation", "xml"),
    [
        pytest.param("prepare", "begin", tagged_xml("provisioned"), id="provisioned"),
        pytest.param("prepare", "begin", tagged_xml("reprovision"), id="requested"),
        pytest.param("prepare", "begin", "<domain><name>web-1</name></domain>", id="no-metadata"),
        pytest.param("release", "end", tagged_xml("provisioning"), id="other-operation"),
        pytest.param("prepare", "begin", "<domain", id="unparseable-xml-is-not-blocking"),
    ],
)
def test_hook_lets_every_other_start_and_operation_through(
        operation: str, sub_operation: str, xml: str) -> None:
    assert hook(operation, sub_operation, xml)[0] == 0
