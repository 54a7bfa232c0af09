"""Why a reprovision ended ``failed``: the words of its metadata reason and its log line.

A failed rebuild must be explainable from the log alone, also on a host where several
watchers run: which domain, which rule of this watcher made it ours (its glob, its place
in the policies, its file and line), at which step the job stopped, and why. This module
names the steps as an operator reads them (the plan's many steps in a few groups), finds
a rule's place, and makes sure no failure is recorded without a reason. Pure.
"""

from __future__ import annotations

from typing import Any

from watcher.core.policy import DomainRule, PolicySet
from watcher.core.steps import (
    ActivateLv,
    CheckShutOff,
    CheckUnused,
    CloneGolden,
    CreateVolume,
    Discard,
    DropPrevious,
    DropSnapshot,
    ExtendLv,
    GrowClone,
    GrowVolume,
    MakeGolden,
    MarkProvisioned,
    MarkProvisioning,
    RemoveLv,
    RenameLv,
    Snapshot,
    StartDomain,
    Step,
    SwapOut,
    WriteImage,
)

FAILURE_STEPS = ("check", "resolve", "fetch", "record", "grow", "snapshot", "write",
                 "golden", "clone", "recover", "start")
"""Where a job can stop: ``check`` (a safety rule refused), ``resolve`` (the image name or
the root disk's volume), ``fetch`` (the image into the cache), ``record`` (a metadata
write), then the plan's own steps."""

_STEP_GROUPS: dict[type[Any], str] = {
    MarkProvisioning: "record", MarkProvisioned: "record", CheckShutOff: "check",
    CheckUnused: "check", CreateVolume: "grow", GrowVolume: "grow", ExtendLv: "grow",
    GrowClone: "grow",
    Snapshot: "snapshot", DropSnapshot: "snapshot", Discard: "write", WriteImage: "write",
    MakeGolden: "golden", SwapOut: "clone", CloneGolden: "clone", DropPrevious: "clone",
    ActivateLv: "recover", RenameLv: "recover", RemoveLv: "recover", StartDomain: "start",
}


def step_group(step: Step) -> str:
    """The failure step a plan step belongs to (one of ``FAILURE_STEPS``)."""
    return _STEP_GROUPS[type(step)]


def failure_reason(message: str, step: str, error: str) -> str:
    """The ``failed`` element's reason: the message on one line, never empty."""
    text = " ".join(message.split())
    return text or f"the {step} step failed ({error}, without a message)"


def rule_fields(policies: PolicySet, rule: DomainRule) -> dict[str, object]:
    """Log fields naming ``rule``: its glob, its index in the merged policies, its origin."""
    index = next((i for i, candidate in enumerate(policies.rules) if candidate is rule),
                 None)
    if index is None:  # a copy equal to one of them (tests, explain)
        index = next((i for i, candidate in enumerate(policies.rules) if candidate == rule),
                     None)
    return {"rule": rule.match, "rule_index": index, "rule_origin": rule.origin or None}
