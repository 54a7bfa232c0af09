"""The policy model: which images exist and which domains get which image.

Policies are declarative YAML files an operator edits; this module holds the validated,
immutable model and the pure questions asked of it (which rule matches a domain, which
images an uploaded object belongs to). Parsing with line numbers lives in
``watcher.core.policy_load``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from watcher.core.fleet import host_matches

ImageFormat = Literal["qcow2", "raw"]
CloneMode = Literal["auto", "never"]
CLONE_MODES: tuple[CloneMode, ...] = ("auto", "never")
SIDECAR_SUFFIX = ".sha256"


@dataclass(frozen=True)
class ImageSpec:
    """One image an operator publishes in a bucket."""

    name: str
    bucket: str
    key: str | None
    """Exact object key; exactly one of ``key`` and ``prefix`` is set."""
    prefix: str | None
    """The newest non-sidecar object under this prefix is the current version."""
    format: ImageFormat
    """Declared format; verified against the file before it is cached."""
    checksum_required: bool = True
    """Without a sidecar the image is refused; when False it is cached under its computed digest."""
    origin: str = ""
    """``file:line`` where the image was defined, for messages."""
    hosts: tuple[str, ...] = ()
    """Globs on the host name of the hosts that pre-warm it; empty = every host."""

    def refers_to(self, bucket: str, key: str) -> bool:
        """True when ``bucket/key`` is this image or one of its versions (sidecars excluded)."""
        if bucket != self.bucket or key.endswith(SIDECAR_SUFFIX):
            return False
        if self.key is not None:
            return key == self.key
        assert self.prefix is not None
        return key.startswith(self.prefix)

    def refers_to_sidecar(self, bucket: str, key: str) -> bool:
        """True when ``bucket/key`` is the checksum sidecar of a version of this image."""
        return key.endswith(SIDECAR_SUFFIX) and self.refers_to(bucket, key[: -len(SIDECAR_SUFFIX)])


@dataclass(frozen=True)
class DomainRule:
    """Maps domains (by name glob) to an image and says how their root disk is handled."""

    match: str
    image: str
    root_disk: str | None = None
    """Target dev (``vda``); None = the first ``<disk device='disk'>``."""
    grow: bool = False
    """Grow the volume to the image's virtual size when it is smaller."""
    start: bool = False
    """Start the domain after a successful reprovision."""
    snapshot: int | None = None
    """Size in bytes of an LVM rollback snapshot taken before writing; None = no snapshot."""
    clone: CloneMode = "auto"
    """``auto``: a thin-LV root disk becomes a thin snapshot of the image's golden LV;
    ``never``: always write (copy) the image onto the volume."""
    origin: str = ""
    hosts: tuple[str, ...] = ()
    """Globs on the host name of the hosts where the rule applies; empty = every host."""

    def matches(self, domain_name: str, host: str | None = None) -> bool:
        """The domain's name matches, on a host the rule applies to (None: any host)."""
        return fnmatch.fnmatchcase(domain_name, self.match) and (
            host is None or host_matches(self.hosts, host))


@dataclass(frozen=True)
class PolicySet:
    """Every policy file, merged; rules keep file order then in-file order."""

    images: Mapping[str, ImageSpec] = field(default_factory=dict)
    rules: tuple[DomainRule, ...] = ()
    host: str | None = None
    """The host these policies run on, for ``hosts:`` globs; None = scoping off (all apply)."""

    def on_host(self, host: str) -> PolicySet:
        """The same policies as they apply on ``host``."""
        return PolicySet(images=self.images, rules=self.rules, host=host)

    def rule_for(self, domain_name: str) -> DomainRule | None:
        """The first rule for this host whose glob matches the domain, or None."""
        return next((r for r in self.rules if r.matches(domain_name, self.host)), None)

    def why_unmatched(self, domain_name: str) -> str:
        """Why no rule for this host matches the domain, for logs, ``status`` and ``explain``."""
        elsewhere = next((r for r in self.rules if r.matches(domain_name)), None)
        if elsewhere is not None and self.host is not None:
            return (f"rule {elsewhere.match!r} matches it only on hosts "
                    f"{', '.join(elsewhere.hosts)}, not on {self.host}")
        return "no rule of this watcher matches it (another instance may own it)"

    def images_for_object(self, bucket: str, key: str) -> list[ImageSpec]:
        """Images of this host for which ``bucket/key`` is a version or the sidecar of one."""
        return [
            img for img in self.images.values()
            if (img.refers_to(bucket, key) or img.refers_to_sidecar(bucket, key))
            and self.is_for_host(img)
        ]

    def is_for_host(self, image: ImageSpec) -> bool:
        """True when this host pre-warms ``image`` (its ``hosts:`` globs match)."""
        return self.host is None or host_matches(image.hosts, self.host)

    def images_to_keep_warm(self) -> list[ImageSpec]:
        """Every image defined for this host, in name order.

        An image defined in a policy file is one this host expects to need, whether or not a
        rule names it yet, so reconcile keeps all of them warm and eviction pins them all.
        An image whose ``hosts:`` leave this host out is fetched only when a reprovision
        here asks for it.
        """
        return [self.images[n] for n in sorted(self.images) if self.is_for_host(self.images[n])]
