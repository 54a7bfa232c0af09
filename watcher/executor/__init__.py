"""The one engine that changes volumes: it runs any plan's steps.

A tag-triggered reprovision (``watcher.reprovision``) and an HTTP API job
(``watcher.jobs``) each gather their facts and decide in the core; both then hand the
plan to ``Executor`` (``run``), which owns every way a volume is created, grown, guarded,
written or swapped, and the golden LVs a clone needs (``goldens``).
"""

from watcher.executor.calls import PlanCalls, users_of
from watcher.executor.goldens import Goldens
from watcher.executor.run import (
    Deferred,
    DomainRef,
    Executor,
    GoldenFailed,
    Target,
    WriteFailed,
)

__all__ = ["Deferred", "DomainRef", "Executor", "GoldenFailed", "Goldens", "PlanCalls",
           "Target", "WriteFailed", "users_of"]
