"""Thin clones of golden LVs: the clone path's LVM commands and the swap that undoes itself.

Why it exists: on a thin pool a reprovision can snapshot a read-only golden LV of the
image instead of writing the whole image. A golden is written as ``<name>-part`` and
renamed only when complete; a clone replaces the root LV by renames that
``swapping_in`` rolls back on any failure, and ``swap_state`` recognises what a crash
in between left.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass

from watcher.adapters.lvm import report
from watcher.adapters.lvm.changes import remove_lv, rename_lv
from watcher.core.lvm_rules import (
    PARTIAL_SUFFIX,
    LvInfo,
    SwapLeftover,
    digest_tag,
    golden_name,
    golden_tags,
    prev_name,
    swap_leftover,
)


async def swap_state(vg: str, lv: str) -> SwapLeftover | None:
    """What an interrupted clone swap of ``vg/lv`` left behind (None: nothing)."""
    return swap_leftover(vg, lv, [row.info for row in await report.lvs_rows(vg)])


async def find_golden(vg: str, pool: str, digest: str) -> LvInfo | None:
    """The complete golden LV of ``digest`` in ``vg``'s thin pool ``pool``, if there is one."""
    name = golden_name(digest, pool)
    for row in await report.lvs_rows(vg):
        info = row.info
        if info.lv == name and info.is_golden and digest_tag(digest) in info.tags:
            return info
    return None


async def goldens(*, partial: bool = False) -> list[LvInfo]:
    """Every golden LV on this host: complete ones, and with ``partial`` those being
    written (or left half-written by a crash) too."""
    return [row.info for row in await report.lvs_rows() if row.info.is_golden
            and (partial or not row.info.lv.endswith(PARTIAL_SUFFIX))]


async def create_golden(vg: str, pool: str, digest: str, size: int,
                        write: Callable[[str], Awaitable[None]]) -> LvInfo:
    """Make the golden LV of ``digest`` in thin pool ``vg/pool``: ``size`` bytes, written by
    ``write(path)`` (a fresh thin LV reads as zeroes, so a sparse write allocates only the
    image's data), then read-only, inactive and skipped by ``vgchange -ay``.

    It is written as ``<name>-part`` and renamed only when complete, so a crash never
    leaves something that looks like a golden; a partial one found here is removed first.
    """
    name = golden_name(digest, pool)
    partial = f"{name}{PARTIAL_SUFFIX}"
    if any(row.info.lv == partial for row in await report.lvs_rows(vg)):
        await remove_lv(f"{vg}/{partial}")
    sectors = math.ceil(size / 512)
    argv = ["lvcreate", "--yes", "--type", "thin", "--virtualsize", f"{sectors * 512}b",
            "--thinpool", pool, "--name", partial, "--activate", "y",
            "--setactivationskip", "n"]
    for tag in golden_tags(digest):
        argv += ["--addtag", tag]
    await report.run([*argv, vg])
    try:
        info = await report.lv_info(f"{vg}/{partial}")
        await write(info.path)
        await report.run(["lvchange", "--permission", "r", "--setactivationskip", "y", info.name])
        await report.run(["lvchange", "--activate", "n", info.name])
        await rename_lv(vg, partial, name)
    except BaseException:
        with contextlib.suppress(report.LvmError):
            await remove_lv(f"{vg}/{partial}")
        raise
    return await report.lv_info(f"{vg}/{name}")


async def clone_lv(golden: str, clone: str, tags: Sequence[str]) -> None:
    """Create ``clone`` (``VG/LV``) as a thin snapshot of ``golden``, with ``tags``.

    Active, writable and without the activation-skip flag LVM gives thin snapshots by
    default (lvcreate fails rather than leave it otherwise), so the host activates it at
    boot like the LV it replaces. One command: the clone path's cost is its LVM commands.
    """
    name = clone.partition("/")[2]
    argv = ["lvcreate", "--snapshot", "--name", name, "--setactivationskip", "n",
            "--activate", "y", "--ignoreactivationskip"]
    for tag in tags:
        argv += ["--addtag", tag]
    await report.run([*argv, golden])


async def activate(name: str) -> None:
    """Activate ``VG/LV``, activation-skip flag or not."""
    await report.run(["lvchange", "--activate", "y", "--ignoreactivationskip", name])


async def extend_to(name: str, size: int) -> None:
    """``lvextend`` ``VG/LV`` to ``size`` bytes, a whole number of extents (another LV's
    size), in one command."""
    await report.run(["lvextend", "--size", f"{size}b", name])


@dataclass
class CloneSwap:
    """A clone on its way to replacing ``vg/lv`` (see ``swapping_in``)."""

    vg: str
    lv: str
    renamed: bool = False
    """The old LV is ``<lv>-vw-prev`` now."""
    cloned: bool = False
    """The clone exists under the LV's name."""

    @property
    def name(self) -> str:
        return f"{self.vg}/{self.lv}"

    @property
    def previous(self) -> str:
        return prev_name(self.lv)

    async def rename_old(self) -> None:
        """Rename the old LV to ``<lv>-vw-prev``, freeing its name for the clone."""
        await rename_lv(self.vg, self.lv, self.previous)
        self.renamed = True

    async def clone(self, golden: str, tags: Sequence[str]) -> None:
        """Create the clone of ``golden`` under the LV's name."""
        assert self.renamed and not self.cloned
        try:
            await clone_lv(golden, self.name, tags)
        except BaseException:
            # lvcreate may have committed the LV and failed to activate it.
            with contextlib.suppress(report.LvmError):
                if any(row.info.lv == self.lv for row in await report.lvs_rows(self.vg)):
                    self.cloned = True
            raise
        self.cloned = True

    async def grow(self, size: int) -> None:
        """Extend the clone to ``size`` bytes, the old LV's size."""
        assert self.cloned
        await extend_to(self.name, size)

    async def roll_back(self) -> None:
        """Remove the clone and give the old LV its name back."""
        if self.cloned:
            await remove_lv(self.name)
            self.cloned = False
        if self.renamed:
            await rename_lv(self.vg, self.previous, self.lv)
            self.renamed = False


@contextlib.asynccontextmanager
async def swapping_in(vg: str, lv: str) -> AsyncIterator[CloneSwap]:
    """Yield the swap of ``vg/lv`` for a clone; the body renames, clones and grows.

    If the body raises (or is cancelled) the clone is removed and the old LV is back under
    its name, however far the body came; a failed roll-back raises ``report.LvmError`` chained to
    the failure. When the body ends normally the old LV (``<lv>-vw-prev``) is removed:
    only after the body recorded the result. A crash anywhere in between leaves what
    ``swap_state`` recognises.
    """
    swap = CloneSwap(vg, lv)
    try:
        yield swap
    except GeneratorExit:
        raise
    except BaseException as failure:
        try:
            await swap.roll_back()
        except report.LvmError as undo_failure:
            raise report.LvmError(undo_failure.argv, undo_failure.exit_code,
                           f"putting {vg}/{lv} back failed after {failure!r}: "
                           f"{undo_failure.stderr}") from failure
        raise
    if swap.cloned and swap.renamed:
        await remove_lv(f"{vg}/{swap.previous}")
    elif swap.renamed:
        await swap.roll_back()  # never cloned: the old LV is the domain's again
