"""Say once that a tagged domain is not this watcher's, not at every event and sweep.

A request no rule matches is looked at again at each of its metadata events, each stop and
each reconcile sweep; a line each time would flood the journal of a host where another
instance owns the domain. So each domain is said once per request. A request lasts while
the domain stays tagged: ``reprovision``, then ``provisioning`` while its owner writes it
(the owner taking it up is not a new request). It is said again when the domain is tagged
anew after leaving those states (the job calls ``forget`` when it sees the domain
provisioned, failed or untagged), when the reason changes (a policy reload scoped or
unscoped a rule), after a rule matched it in between, and after a restart.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class UnmatchedNotes:
    """Which unmatched domains were said already, by UUID, with the reason said."""

    max_domains: int = 16384
    """Domains remembered; the oldest is forgotten first (and said again if seen)."""
    _said: dict[str, str] = field(default_factory=dict)

    def first(self, uuid: str, why: str) -> bool:
        """True when this request of the domain, unmatched for this reason, is new."""
        if self._said.get(uuid) == why:
            return False
        self._said.pop(uuid, None)
        self._said[uuid] = why
        while len(self._said) > self.max_domains:
            del self._said[next(iter(self._said))]
        return True

    def forget(self, uuid: str) -> None:
        """The request ended, the domain is gone, or a rule matches it: the next time it is
        unmatched is a new request."""
        self._said.pop(uuid, None)

    def __contains__(self, uuid: object) -> bool:
        return uuid in self._said

    def __len__(self) -> int:
        return len(self._said)
