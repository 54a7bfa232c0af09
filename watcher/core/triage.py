"""Decisions for bucket notifications and about domains: what to warm, what is outdated.

Pure: events and policies in, warm requests out. Anything not about an image a policy
defines (or its sidecar) is ignored here, cheaply, which keeps the event path fast for
the busy buckets most hosts share. ``is_outdated`` is the one rule that ``status`` and
the daemon's outdated-domains gauge both apply; ``listed_state`` and ``count_by_state``
say which domains ``status`` and the domains gauge show, and in which state.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from watcher.core.domain import REQUEST_KINDS
from watcher.core.events import ObjectEvent
from watcher.core.policy import PolicySet

UNMATCHED = "unmatched"
"""The listed state of a tagged domain that no rule of this watcher matches."""


@dataclass(frozen=True)
class WarmRequest:
    """Warm the current version of one policy image, because of ``trigger``."""

    image: str
    trigger: str
    """``bucket/key`` of the object whose event asked for it, for logs."""


def plan_warms(events: Iterable[ObjectEvent], policies: PolicySet) -> list[WarmRequest]:
    """One request per image named by any created object (image or sidecar), in event order."""
    seen: set[str] = set()
    plan: list[WarmRequest] = []
    for event in events:
        if not event.created:
            continue
        for image in policies.images_for_object(event.bucket, event.key):
            if image.name not in seen:
                seen.add(image.name)
                plan.append(WarmRequest(image.name, f"{event.bucket}/{event.key}"))
    return plan


def is_outdated(provisioned_sha256: str | None, current_digest: str | None) -> bool:
    """Whether a domain's disk holds an older image than the current cached version.

    Only a domain provisioned with a known digest, whose image has a cached current
    version with another digest, is outdated; without either there is nothing to compare.
    """
    return bool(provisioned_sha256 and current_digest and provisioned_sha256 != current_digest)


def count_by_state(states: Iterable[str], known: Iterable[str]) -> dict[str, int]:
    """How many domains are in each state; every ``known`` state is present, at 0 if none.

    A gauge set from this goes back to 0 for a state no domain is in any more, instead of
    keeping the count of an earlier sweep.
    """
    counts = dict.fromkeys(known, 0)
    for state in states:
        counts[state] = counts.get(state, 0) + 1
    return counts


def listed_state(domain: str, kind: str, policies: PolicySet) -> str | None:
    """The state ``status`` and the domains gauge give a domain, or None to leave it out.

    A domain a rule matches shows its metadata element (``kind``). A tagged one no rule
    matches (a request, or a write under way) is ``unmatched``: another instance on the
    host may own it. Any other domain is none of this watcher's business.
    """
    if policies.rule_for(domain) is not None:
        return kind
    return UNMATCHED if kind in REQUEST_KINDS else None
