"""Error types shared by every floor.

The split between permanent and temporary errors drives retries: a temporary error
is retried with backoff, a permanent one is reported once and never retried.
"""

from __future__ import annotations

from dataclasses import dataclass


class WatcherError(Exception):
    """Base class of every error the watcher raises on purpose."""


class PermanentError(WatcherError):
    """Retrying cannot help: bad input, a corrupt or hostile image, a refused volume."""


class Refused(PermanentError):
    """A job will not (go on to) write a volume: the message is why, a domain's ``failed``
    reason or an API job's error. ``touched`` says the volume was changed before it."""

    def __init__(self, reason: str, *, touched: bool = False) -> None:
        super().__init__(reason)
        self.touched = touched


class TemporaryError(WatcherError):
    """May succeed later: a network failure, a service that is down, a busy device."""

    def __init__(self, message: str, *, delay: float | None = None) -> None:
        super().__init__(message)
        self.delay = delay


@dataclass(frozen=True)
class Problem:
    """One validation problem, located in a source file."""

    file: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}"


class ConfigError(PermanentError):
    """The daemon config or a policy file is invalid; carries every problem found."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems) or "invalid configuration")


class MalformedEvent(PermanentError):
    """A notification that cannot be parsed; it is dead-lettered, never retried."""


REJECTION_REASONS = (
    "checksum_mismatch", "format_mismatch", "bad_header", "backing_file", "data_file",
    "encrypted", "corrupt", "unknown_features", "virtual_size", "inconsistent_info",
    "qemu_img_failed", "not_a_file",
)
"""Every ``ImageRejected.reason``: the metric's label values, present from the start."""


class ImageRejected(PermanentError):
    """An image failed verification or inspection and must never be cached or written.

    ``reason`` is a short stable code used as a metrics label, one of
    ``REJECTION_REASONS``.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class UnsafeName(PermanentError):
    """A name from outside data would not stay inside the directory it is meant for."""


class NotUploadedYet(WatcherError):
    """An image's object or sidecar does not exist yet: normal, as either may come first.

    Neither permanent nor temporary: nothing is wrong, and the missing object's own
    notification (or the next reconcile) starts the work again.
    """


class SidecarUnavailable(NotUploadedYet):
    """The image's ``.sha256`` sidecar does not exist yet; its own event will retrigger."""


class ObjectUnavailable(NotUploadedYet):
    """The image's object (or, for a prefix, any version of it) does not exist yet."""


class ImageWriteError(WatcherError):
    """Writing an image onto a volume failed; says where, how and what qemu-img said.

    Never raised itself: ``build`` picks ``PermanentImageWriteError`` or
    ``TemporaryImageWriteError`` when the failure is known, so whoever catches it can
    tell at once whether a retry may help.
    """

    def __init__(self, device: str, exit_code: int | None, stderr: str) -> None:
        detail = stderr.strip().splitlines()[-1] if stderr.strip() else "no error output"
        super().__init__(f"writing {device} failed (exit {exit_code}): {detail}")
        self.device = device
        self.exit_code = exit_code
        self.stderr = stderr

    @staticmethod
    def build(device: str, exit_code: int | None, stderr: str, *,
              temporary: bool) -> ImageWriteError:
        """The error for a failed write; ``temporary`` for a busy device."""
        kind = TemporaryImageWriteError if temporary else PermanentImageWriteError
        return kind(device, exit_code, stderr)

    @property
    def temporary(self) -> bool:
        """Whether the same write may succeed later."""
        return isinstance(self, TemporaryError)


class PermanentImageWriteError(ImageWriteError, PermanentError):
    """The write failed in a way a retry repeats (a target too small, an I/O error)."""


class TemporaryImageWriteError(ImageWriteError, TemporaryError):
    """The device was busy; the same write may succeed later."""
