"""Golden LVs: one read-only thin LV per (image digest, thin pool), cloned at every reprovision.

Why it exists: a thin-LV root disk is reprovisioned by a thin snapshot of its image's
golden LV, which costs the same for a 1 GiB image as for a 100 GiB one, but only once
the golden exists. Pre-warming makes it as soon as an image is cached for the pools its
policy's domains live in (``prepare``), so a reprovision normally never writes; one that
finds none makes it first. Goldens are derived from cache entries and go with them
(``remove``, ``remove_orphans``): their clones do not need them to stay.

One lock per golden in this process keeps a clone from racing the golden's creation or
its removal. Nothing here decides which domain gets what: the plan does.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Collection, Iterable
from pathlib import Path
from typing import Any

from watcher import telemetry
from watcher.adapters import lvm
from watcher.adapters.qemu_img import WriteImageFunction
from watcher.core.lvm_rules import PARTIAL_SUFFIX, golden_digest, golden_name


class Goldens:
    """Makes, finds and removes golden LVs, one at a time per golden."""

    def __init__(self, write_image: WriteImageFunction, log: Any = None) -> None:
        self.write_image = write_image
        self.log = log if log is not None else telemetry.get_logger(component="goldens")
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}

    @contextlib.asynccontextmanager
    async def held(self, vg: str, name: str) -> AsyncIterator[None]:
        """Hold the lock of golden ``vg/name`` (creating, cloning or removing it)."""
        lock = self._locks.setdefault((vg, name), asyncio.Lock())
        async with lock:
            yield

    async def ensure(self, vg: str, pool: str, digest: str, virtual_size: int,
                     source: Path, image_format: str) -> lvm.LvInfo:
        """The golden of ``digest`` in ``vg/pool``: found, or written now from ``source``."""
        name = golden_name(digest, pool)
        async with self.held(vg, name):
            found = await lvm.find_golden(vg, pool, digest)
            if found is not None:
                return found

            async def write(path: str) -> None:
                await self.write_image(source, image_format, Path(path), target_is_zero=True)

            self.log.info("writing golden lv", lv=f"{vg}/{name}", pool=pool, digest=digest,
                          bytes=virtual_size)
            made = await lvm.create_golden(vg, pool, digest, virtual_size, write)
            telemetry.written_bytes.inc(virtual_size)
            self.log.info("golden lv ready", lv=made.name, digest=digest)
            return made

    async def remove(self, digest: str) -> list[str]:
        """Remove the goldens of ``digest`` (its cache entry is gone), half-written ones too;
        returns their ``VG/LV`` names."""
        removed: list[str] = []
        for info in await lvm.goldens(partial=True):
            if golden_digest(info) != digest:
                continue
            name = info.lv.removesuffix(PARTIAL_SUFFIX)
            async with self.held(info.vg, name):
                # Under the lock a write in progress has ended: look again at what is there.
                for current in await lvm.goldens(partial=True):
                    if current.vg == info.vg and current.lv in (name, name + PARTIAL_SUFFIX):
                        await lvm.remove_lv(current.name)
                        removed.append(current.name)
                        self.log.info("golden lv removed with its cache entry",
                                      lv=current.name, digest=digest)
        return sorted(set(removed))

    async def remove_many(self, digests: Iterable[str]) -> list[str]:
        """``remove`` for each digest; for the cache's eviction."""
        removed: list[str] = []
        for digest in digests:
            removed += await self.remove(digest)
        return removed

    async def remove_orphans(self, cached: Collection[str]) -> list[str]:
        """Remove every golden whose digest is not in ``cached`` (removed by another process,
        ``cache prune`` for one, or evicted while this process did not run)."""
        orphans = {d for info in await lvm.goldens()
                   if (d := golden_digest(info)) is not None and d not in cached}
        return await self.remove_many(sorted(orphans))
