"""Retry delays: capped exponential backoff with full jitter.

The watcher's own retry loops (S3, libvirt, reprovision jobs) draw their delays here so
that many hosts recovering from one outage do not hammer a service in lockstep. AMQP
reconnects run in aio-pika's loop, which jitters its fixed interval instead
(``adapters/amqp/``).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """A retry schedule: ``attempts`` tries in all, delays doubling from ``base`` up to ``cap``."""

    base: float = 0.5
    """First delay in seconds, before jitter."""
    cap: float = 30.0
    """Largest delay in seconds; keeps a long outage from growing waits without bound."""
    attempts: int = 6
    """Tries in all, the first included; ``0`` means retry forever."""

    def delays(self, rng: random.Random | None = None) -> Iterator[float]:
        """Yield the sleep before each retry (one fewer than ``attempts``)."""
        rand = rng or random.Random()
        step = 0
        while self.attempts == 0 or step < self.attempts - 1:
            ceiling = min(self.cap, self.base * (2**step))
            # Full jitter, but never below a tenth of the ceiling so retries are not instant.
            yield rand.uniform(ceiling / 10, ceiling)
            step += 1
