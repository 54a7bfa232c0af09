"""Which tagged domains are this watcher's: the decision, ``status``'s listed state and the
once-per-request info line, as tables over pure code."""

from __future__ import annotations

import pytest

from watcher.core.domain import (
    Action,
    DomainSnapshot,
    DomainState,
    Fail,
    Nothing,
    Unmatched,
    Write,
    decide,
)
from watcher.core.policy import DomainRule, ImageSpec, PolicySet
from watcher.core.triage import UNMATCHED, listed_state
from watcher.reprovision.unmatched import UnmatchedNotes

WEB = DomainRule("web-*", "ubuntu")
EDGE = DomainRule("edge-*", "ubuntu", hosts=("hv-edge-*",))
POLICIES = PolicySet(images={"ubuntu": ImageSpec("ubuntu", "b", "u.qcow2", None, "qcow2")},
                     rules=(WEB, EDGE), host="hv-core-1")
NOT_OURS = "no rule of this watcher matches it (another instance may own it)"
ELSEWHERE = "rule 'edge-*' matches it only on hosts hv-edge-*, not on hv-core-1"
REQUEST = DomainState("reprovision")
WRITING = DomainState("provisioning", "ubuntu", "ab" * 32, "T")


def snap(name: str, state: DomainState | None, *, shut_off: bool = True,
         managed_save: bool = False) -> DomainSnapshot:
    return DomainSnapshot(name, "uuid-1", shut_off, managed_save, state)


@pytest.mark.parametrize(("snapshot", "expected"), [
    pytest.param(snap("web-1", REQUEST), Write(WEB, "ubuntu"), id="matched"),
    pytest.param(snap("db-1", REQUEST), Unmatched(NOT_OURS), id="unmatched"),
    pytest.param(snap("db-1", WRITING), Unmatched(NOT_OURS),
                 id="unmatched-write-under-way-is-not-resumed"),
    pytest.param(snap("db-1", REQUEST, shut_off=False), Unmatched(NOT_OURS),
                 id="unmatched-running"),
    pytest.param(snap("db-1", REQUEST, managed_save=True), Unmatched(NOT_OURS),
                 id="unmatched-managed-save-is-not-failed"),
    pytest.param(snap("db-1", DomainState("reprovision", image="nowhere")), Unmatched(NOT_OURS),
                 id="unmatched-with-an-unknown-image-is-not-failed"),
    pytest.param(snap("edge-1", REQUEST), Unmatched(ELSEWHERE), id="hosts-scoped-out"),
    pytest.param(snap("db-1", None), Nothing("no reprovision requested"), id="untagged"),
    pytest.param(snap("db-1", DomainState("failed", None, None, "T", "x")),
                 Nothing("no reprovision requested"), id="unmatched-failed-untouched"),
    pytest.param(snap("web-1", DomainState("reprovision", image="nowhere")),
                 Fail("image 'nowhere' is not defined by any policy", "nowhere", WEB,
                      "resolve"), id="matched-with-an-unknown-image-fails"),
])
def test_a_watcher_decides_only_about_the_domains_its_rules_match(
        snapshot: DomainSnapshot, expected: Action) -> None:
    assert decide(snapshot, POLICIES) == expected


def test_on_the_host_its_hosts_globs_name_the_scoped_rule_matches() -> None:
    edge = POLICIES.on_host("hv-edge-7")
    assert decide(snap("edge-1", REQUEST), edge) == Write(EDGE, "ubuntu")


def test_with_no_rule_at_all_the_reason_says_another_instance_may_own_it() -> None:
    assert PolicySet(rules=()).why_unmatched("x") == NOT_OURS


@pytest.mark.parametrize(("name", "kind", "listed"), [
    ("web-1", "provisioned", "provisioned"),
    ("web-1", "none", "none"),
    ("web-1", "reprovision", "reprovision"),
    ("db-1", "reprovision", UNMATCHED),
    ("db-1", "provisioning", UNMATCHED),
    ("edge-1", "reprovision", UNMATCHED),
    ("db-1", "provisioned", None),
    ("db-1", "failed", None),
    ("db-1", "none", None),
    ("db-1", "malformed", None),
])
def test_status_lists_matched_domains_and_tagged_unmatched_ones(
        name: str, kind: str, listed: str | None) -> None:
    assert listed_state(name, kind, POLICIES) == listed


def test_an_unmatched_request_is_said_once_until_it_ends_or_its_reason_changes() -> None:
    notes = UnmatchedNotes()
    assert notes.first("u1", NOT_OURS)
    assert not notes.first("u1", NOT_OURS)  # the next event, the next sweep, its owner writing
    assert notes.first("u2", NOT_OURS)  # another domain
    assert notes.first("u1", ELSEWHERE)  # a reload scoped a rule
    assert not notes.first("u1", ELSEWHERE)
    notes.forget("u1")  # provisioned, failed, untagged, matched in between, or gone
    assert notes.first("u1", ELSEWHERE)  # tagged anew


def test_the_memory_of_unmatched_domains_is_bounded() -> None:
    notes = UnmatchedNotes(max_domains=2)
    for uuid in ("a", "b", "c"):
        notes.first(uuid, NOT_OURS)
    assert len(notes) == 2
    assert notes.first("a", NOT_OURS)  # forgotten first, so said again
