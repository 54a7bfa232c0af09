"""libvirt's refusals, sorted into temporary and permanent ones by ``translate``."""

from __future__ import annotations

import libvirt
import pytest

from watcher.adapters.hypervisor.base import HypervisorError, PoolBusy, translate
from watcher.core.errors import PermanentError, TemporaryError


def test_a_busy_pool_is_temporary_so_the_job_engine_retries_it() -> None:
    busy = libvirt.libvirtError("internal error: pool 'p' has asynchronous jobs running.")
    error = translate(busy)
    assert isinstance(error, PoolBusy) and isinstance(error, TemporaryError)
    assert "asynchronous jobs running" in str(error)


@pytest.mark.parametrize("message", ["Storage volume not found: no volume with matching name",
                                     "internal error: no space left"])
def test_other_refusals_stay_permanent(message: str) -> None:
    error = translate(libvirt.libvirtError(message))
    assert isinstance(error, HypervisorError) and isinstance(error, PermanentError)
