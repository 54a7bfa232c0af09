"""Say every new problem, and repeats of the same one only now and then.

An image that fails is retried at every notification and every reconcile; logging each
attempt floods the journal, while logging only the first hides the next, different
failure (a checksum mismatch after a download error, a full disk after a rejection).
So a problem is keyed by what it is about and why (object version and reason): a new
key is always said, the same key again at most once per interval, with the number of
repeats left unsaid in between. Pure: the caller passes the clock.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

REPEAT_INTERVAL = 600.0
"""Seconds between two lines for the same problem: two reconcile intervals by default."""


@dataclass
class RepeatFilter:
    """Decides which occurrences of keyed problems are worth a log line."""

    interval: float = REPEAT_INTERVAL
    max_keys: int = 4096
    """Problems remembered; the least recently said is forgotten first."""
    _said: dict[Hashable, tuple[float, int]] = field(default_factory=dict)

    def admit(self, key: Hashable, now: float) -> int | None:
        """None to stay quiet; else say it, with this many repeats unsaid since the last line."""
        said = self._said.get(key)
        if said is not None and now - said[0] < self.interval:
            self._said[key] = (said[0], said[1] + 1)
            return None
        self._said.pop(key, None)
        self._said[key] = (now, 0)  # re-inserted: the newest key, the last to be forgotten
        while len(self._said) > self.max_keys:
            del self._said[next(iter(self._said))]
        return 0 if said is None else said[1]

    def forget(self, key: Hashable) -> None:
        """The problem is gone; if it comes back it is new again."""
        self._said.pop(key, None)
