"""Decisions for bucket notifications: which images an event asks us to warm.

Pure: events and policies in, warm requests out. Anything not about an image a policy
defines (or its sidecar) is ignored here, cheaply, which keeps the event path fast for
the busy buckets most hosts share.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from watcher.core.events import ObjectEvent
from watcher.core.policy import PolicySet


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
    """Whether a domain written with ``provisioned_sha256`` lags its image's current version.

    ``current_digest`` is the digest the cache holds as the image's current version. A
    domain never provisioned, or an image not cached yet, is not outdated: there is
    nothing to compare.
    """
    return bool(provisioned_sha256 and current_digest and provisioned_sha256 != current_digest)
