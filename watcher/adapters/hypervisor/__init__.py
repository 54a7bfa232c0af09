"""The libvirt edge, in three parts that share ``base`` (errors, metadata, typed rows):

- ``events``: the connection kept open, with keepalive, event callbacks, reconnects and
  sweeps (``EventConnection``);
- ``jobcalls``: the calls a reprovision job and the daemon's reconcile make on that live
  connection (``DomainCalls``);
- ``queries``: the command line's one-shots, each on a short-lived connection
  (``request_reprovision``, ``domain_overview``).

``DomainWatcher`` (``domain_watcher``) puts the first two together for the job. Errors are
``HypervisorUnavailable`` (temporary: the connection is down) and ``HypervisorError``
(permanent: libvirt refused the operation). This package names what callers import.
"""

from watcher.adapters.hypervisor.base import (
    DomainFacts,
    DomainGone,
    DomainRow,
    HypervisorError,
    HypervisorUnavailable,
    VolumeFacts,
)
from watcher.adapters.hypervisor.domain_watcher import DomainWatcher

__all__ = [
    "DomainFacts", "DomainGone", "DomainRow", "DomainWatcher", "HypervisorError",
    "HypervisorUnavailable", "VolumeFacts",
]
