"""The reprovision job: write a policy's current image onto a shut-off domain's root volume.

An operator asks by tagging the domain's metadata and shutting it down; libvirt events
(and sweeps) make the hypervisor adapter report the domain, and the runtime's keyed
worker hands it to ``Reprovisioner`` (``job``), one run per domain at a time. A job
gathers its facts once (``facts``), decides once (``watcher.core.plan``), and runs the
plan step by step in the one executor (``watcher.executor``).

The job refuses rather than guesses: the root disk must resolve to an allowed path, the
image must fit (or the volume may be grown), and the domain must be shut off right
before and right after the write. While writing, the metadata says ``provisioning`` so
the libvirt hook refuses to start the domain. Volumes are never deleted, shrunk or
recreated.
"""

from watcher.reprovision.job import RETRY_BACKOFF, ImageSource, Reprovisioner

__all__ = ["RETRY_BACKOFF", "ImageSource", "Reprovisioner"]
