"""The rows ``status`` and the outdated gauge read: a table over stand-in libvirt domains.

``read_domain_rows`` only calls methods of the connection and domain objects it is given,
so stand-ins with the same methods exercise it without a libvirtd.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import libvirt
import pytest

from watcher.adapters.hypervisor.base import DomainRow, read_domain_rows

DIGEST = "cd" * 32


class _NoMetadata(libvirt.libvirtError):  # type: ignore[misc]  # libvirt is untyped
    def __init__(self) -> None:
        super().__init__("no metadata")

    def get_error_code(self) -> int:
        return int(libvirt.VIR_ERR_NO_DOMAIN_METADATA)


@dataclass
class StandInDomain:
    domain_name: str
    element: str | None = None
    power: int = libvirt.VIR_DOMAIN_SHUTOFF
    calls: list[str] = field(default_factory=list)

    def name(self) -> str:
        return self.domain_name

    def UUIDString(self) -> str:
        return f"uuid-{self.domain_name}"

    def isPersistent(self) -> bool:
        return True

    def metadata(self, kind: int, uri: str, flags: int) -> str:
        self.calls.append("metadata")
        if self.element is None:
            raise _NoMetadata()
        return self.element

    def state(self) -> tuple[int, int]:
        self.calls.append("state")
        return self.power, 0


@dataclass
class StandInConnection:
    domains: list[StandInDomain]

    def listAllDomains(self, flags: int) -> list[StandInDomain]:
        return list(self.domains)


def row(name: str, state: str, power: str = "shut off", **fields: str | None) -> DomainRow:
    values: dict[str, str | None] = {"provisioned_image": None, "provisioned_sha256": None,
                                     "finished": None, "reason": None, **fields}
    return DomainRow(domain=name, uuid=f"uuid-{name}", power=power, state=state, **values)


@pytest.mark.parametrize(("element", "power", "expected"), [
    pytest.param(None, libvirt.VIR_DOMAIN_RUNNING, row("d", "none", "running"), id="untagged"),
    pytest.param("<reprovision/>", libvirt.VIR_DOMAIN_SHUTOFF, row("d", "reprovision"),
                 id="requested"),
    pytest.param(f'<provisioning image="u" sha256="{DIGEST}" started="t0"/>',
                 libvirt.VIR_DOMAIN_SHUTOFF, row("d", "provisioning"),
                 id="being-written-shows-no-provisioned-digest"),
    pytest.param(f'<provisioned image="u" sha256="{DIGEST}" finished="t1"/>',
                 libvirt.VIR_DOMAIN_RUNNING,
                 row("d", "provisioned", "running", provisioned_image="u",
                     provisioned_sha256=DIGEST, finished="t1"), id="provisioned"),
    pytest.param('<failed image="u" reason="too small" at="t2"/>', libvirt.VIR_DOMAIN_SHUTOFF,
                 row("d", "failed", reason="too small"), id="failed-with-its-reason"),
    pytest.param("<not-ours/>", libvirt.VIR_DOMAIN_PAUSED, row("d", "malformed", "paused"),
                 id="malformed"),
])
def test_a_row_shows_power_and_the_metadata_element(
    element: str | None, power: int, expected: DomainRow,
) -> None:
    conn = StandInConnection([StandInDomain("d", element, power)])
    assert read_domain_rows(conn, lambda _name: True) == [expected]


def test_rows_come_in_name_order_and_excluded_domains_cost_no_call() -> None:
    skipped = StandInDomain("b-other")
    conn = StandInConnection([StandInDomain("c-web"), skipped, StandInDomain("a-web")])
    rows = read_domain_rows(conn, lambda name: name.endswith("-web"))
    assert [r.domain for r in rows] == ["a-web", "c-web"]
    assert skipped.calls == []
