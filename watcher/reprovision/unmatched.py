"""Say once that a tagged domain is not this watcher's, not at every event and sweep.

A request no rule matches is looked at again at each of its metadata events, each stop and
each reconcile sweep; a line each time would flood the journal of a host where another
instance owns the domain. So each domain is said once per request: again only when its
state element changes (a new request, another image, a write under way), when the reason
it is unmatched changes (a policy reload scoped or unscoped a rule), or after a rule
matched it in between. A domain that is gone, or matched, is forgotten.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class UnmatchedNotes:
    """Which unmatched domains were said already, by UUID, with what was said."""

    max_domains: int = 16384
    """Domains remembered; the oldest is forgotten first (and said again if seen)."""
    _said: dict[str, tuple[str | None, str]] = field(default_factory=dict)

    def first(self, uuid: str, element: str | None, why: str) -> bool:
        """True when this request of the domain, unmatched for this reason, is new."""
        key = (element, why)
        if self._said.get(uuid) == key:
            return False
        self._said.pop(uuid, None)
        self._said[uuid] = key
        while len(self._said) > self.max_domains:
            del self._said[next(iter(self._said))]
        return True

    def forget(self, uuid: str) -> None:
        """The domain is gone or a rule matches it: next time it is unmatched is new."""
        self._said.pop(uuid, None)

    def __len__(self) -> int:
        return len(self._said)
