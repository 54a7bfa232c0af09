"""The LVM edge: recognise a root disk as a logical volume, grow it, discard it, protect
it, and clone thin LVs.

Why it exists: most operators point a domain's disk straight at ``/dev/VG/LV``, often
with no libvirt pool, so the jobs need LVM's own view of the device before they write.
``report`` reads (``lvs``) and runs every command, ``changes`` grows, discards, guards
and creates, ``clones`` makes golden LVs and swaps clones in. Callers use this package's
names; the LVM suite (inside a User-Mode Linux guest, where device-mapper exists) runs
exactly these functions.
"""

from watcher.adapters.lvm.changes import (
    MERGE_TIMEOUT,
    ROLLBACK_SUFFIX,
    create_lv,
    discard,
    extend,
    grow,
    remove_lv,
    rename_lv,
    rollback_snapshot,
    vg_exists,
)
from watcher.adapters.lvm.clones import (
    CloneSwap,
    activate,
    clone_lv,
    create_golden,
    extend_to,
    find_golden,
    goldens,
    swap_state,
    swapping_in,
)
from watcher.adapters.lvm.report import (
    LvmError,
    LvRefused,
    lv_at,
    lv_for_device,
    lv_info,
    lv_with_neighbours,
    recognise,
    vg_lvs,
)
from watcher.core.lvm_rules import LvInfo, refusal_reason

__all__ = [
    "MERGE_TIMEOUT", "ROLLBACK_SUFFIX", "CloneSwap", "LvInfo", "LvRefused", "LvmError",
    "activate", "clone_lv", "create_golden", "create_lv", "discard", "extend", "extend_to",
    "find_golden", "goldens", "grow", "lv_at", "lv_for_device", "lv_info",
    "lv_with_neighbours", "recognise", "refusal_reason", "remove_lv", "rename_lv",
    "rollback_snapshot", "swap_state", "swapping_in", "vg_exists", "vg_lvs",
]
