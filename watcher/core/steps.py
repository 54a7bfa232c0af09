"""The one step vocabulary of a volume write, and the plan and refusal a decision returns.

Why it exists: a decision (``watcher.core.plan`` for a tag, ``watcher.core.volume_plan``
for an API job) returns steps that one executor (``watcher.executor``) runs in order;
naming every step once, here, keeps what is decided and what is done apart, and what logs,
traces and tests read (``Plan.describe``) the same for both. Nothing here does I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class MarkProvisioning:
    """Set ``<provisioning>``: from here on the libvirt hook refuses to start the domain."""

    image: str
    digest: str

    def __str__(self) -> str:
        return f"mark provisioning {self.image} {self.digest[:12]}"


@dataclass(frozen=True)
class CheckShutOff:
    """Confirm the domain is still shut off.

    Before the write, a running domain defers the job (the request is put back); after
    it, the job fails, because the volume content is undefined.
    """

    when: Literal["before write", "after write"]

    def __str__(self) -> str:
        return f"check shut off {self.when}"


@dataclass(frozen=True)
class GrowVolume:
    """Grow a libvirt storage volume (a 'logical' pool's included) to ``size`` bytes."""

    path: str
    size: int

    def __str__(self) -> str:
        return f"grow volume {self.path} to {self.size} bytes"


@dataclass(frozen=True)
class ExtendLv:
    """``lvextend`` an LV no libvirt pool holds to at least ``size`` bytes."""

    lv: str
    size: int

    def __str__(self) -> str:
        return f"extend lv {self.lv} to {self.size} bytes"


@dataclass(frozen=True)
class Snapshot:
    """Take a rollback snapshot of the LV (at least ``min_size`` bytes for a thick one).

    A failure until ``DropSnapshot`` merges it back, so the LV reads as before.
    """

    lv: str
    min_size: int

    def __str__(self) -> str:
        return f"snapshot {self.lv} (at least {self.min_size} bytes)"


@dataclass(frozen=True)
class Discard:
    """Return a thin LV's blocks to its pool, so a sparse write allocates only data."""

    path: str

    def __str__(self) -> str:
        return f"discard {self.path}"


@dataclass(frozen=True)
class WriteImage:
    """Write the image onto ``path`` as raw data (None: the job's own volume, whose path
    is known once it exists)."""

    path: str | None
    target_is_zero: bool
    """The target reads as zeroes (a discarded thin LV): zero ranges need not be written."""

    def __str__(self) -> str:
        return (f"write {self.path or 'volume'}"
                + (" (target is zero)" if self.target_is_zero else ""))


@dataclass(frozen=True)
class DropSnapshot:
    """The write is confirmed: remove the rollback snapshot."""

    lv: str

    def __str__(self) -> str:
        return f"drop snapshot of {self.lv}"


@dataclass(frozen=True)
class MarkProvisioned:
    """Set ``<provisioned>``: the job is done."""

    image: str
    digest: str

    def __str__(self) -> str:
        return f"mark provisioned {self.image} {self.digest[:12]}"


@dataclass(frozen=True)
class StartDomain:
    """Start the domain (``start: true``); a failure is logged, the job stays done."""

    def __str__(self) -> str:
        return "start domain"


@dataclass(frozen=True)
class MakeGolden:
    """Write the image once onto a new read-only thin LV ``vg/name`` in ``pool``.

    Pre-warming usually made it already; then the plan has no such step.
    """

    vg: str
    pool: str
    name: str
    digest: str
    size: int
    """The image's virtual size: the golden's size (rounded up to whole extents)."""

    def __str__(self) -> str:
        return f"make golden {self.vg}/{self.name} in pool {self.pool} ({self.size} bytes)"


@dataclass(frozen=True)
class SwapOut:
    """Rename the domain's LV ``vg/lv`` to ``previous``: the rollback, until the clone is
    recorded. From here until ``MarkProvisioned`` a failure removes the clone and renames
    the old LV back."""

    vg: str
    lv: str
    previous: str

    def __str__(self) -> str:
        return f"rename {self.vg}/{self.lv} to {self.vg}/{self.previous} (the rollback)"


@dataclass(frozen=True)
class CloneGolden:
    """Create ``clone`` (the domain's LV name) as a thin snapshot of ``golden``: active, no
    activation skip, with ``tags`` (the old LV's), all in one ``lvcreate``."""

    golden: str
    """``VG/LV``."""
    clone: str
    """``VG/LV``: the domain's LV, same name and path as before."""
    tags: tuple[str, ...]

    def __str__(self) -> str:
        carried = f" with tags {','.join(self.tags)}" if self.tags else ""
        return f"clone {self.golden} as {self.clone}{carried}"


@dataclass(frozen=True)
class GrowClone:
    """``lvextend`` the clone to ``size`` bytes: the old LV's size, when larger."""

    lv: str
    size: int

    def __str__(self) -> str:
        return f"extend clone {self.lv} to {self.size} bytes"


@dataclass(frozen=True)
class ActivateLv:
    """Recovery: activate a clone whose creation was interrupted before its activation."""

    lv: str

    def __str__(self) -> str:
        return f"activate lv {self.lv}"


@dataclass(frozen=True)
class DropPrevious:
    """The clone is recorded (the domain may run already): remove the old LV; a failure
    leaves it for the next run of the job."""

    lv: str

    def __str__(self) -> str:
        return f"remove previous lv {self.lv}"


@dataclass(frozen=True)
class RenameLv:
    """Recovery: rename ``vg/old`` to ``vg/new``."""

    vg: str
    old: str
    new: str

    def __str__(self) -> str:
        return f"rename lv {self.vg}/{self.old} to {self.vg}/{self.new}"


@dataclass(frozen=True)
class RemoveLv:
    """Recovery: remove the LV ``lv`` an interrupted swap left."""

    lv: str
    why: str

    def __str__(self) -> str:
        return f"remove lv {self.lv} ({self.why})"


@dataclass(frozen=True)
class CreateVolume:
    """Create the volume: through libvirt's storage API, or ``lvcreate`` in a bare VG."""

    pool: str
    volume: str
    size: int
    via: Literal["libvirt", "lvcreate"]

    def __str__(self) -> str:
        return f"create volume {self.pool}/{self.volume} of {self.size} bytes ({self.via})"


@dataclass(frozen=True)
class CheckUnused:
    """No domain that is not shut off uses the volume and no process has it open.

    Before the write a user means the job fails with the volume untouched; after the
    write it means the volume's content is undefined, and the job says so.
    """

    when: Literal["before write", "after write"]

    def __str__(self) -> str:
        return f"check unused {self.when}"


Step = (MarkProvisioning | CheckShutOff | CreateVolume | CheckUnused | GrowVolume | ExtendLv
        | Snapshot | Discard | WriteImage | DropSnapshot | MarkProvisioned | StartDomain
        | MakeGolden | SwapOut | CloneGolden | GrowClone | DropPrevious | ActivateLv | RenameLv
        | RemoveLv)


@dataclass(frozen=True)
class Plan:
    """The steps of one job, in order: a reprovision's or an API job's."""

    steps: tuple[Step, ...]
    notes: tuple[str, ...] = ()
    """Things worth a warning that do not stop the job."""
    recovery: bool = False
    """Only puts an interrupted swap right; the job then gathers its facts and plans again."""

    @property
    def clones(self) -> bool:
        """The image is cloned from a golden LV, not written onto the volume."""
        return any(isinstance(step, CloneGolden) for step in self.steps)

    def describe(self) -> list[str]:
        return [str(step) for step in self.steps]


@dataclass(frozen=True)
class Refusal:
    """Nothing is written; ``reason`` becomes the ``failed`` element's reason."""

    reason: str
