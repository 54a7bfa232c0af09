"""libvirt's refusals, sorted into temporary and permanent ones by ``translate``."""

from __future__ import annotations

import libvirt
import pytest

from watcher.adapters.hypervisor.base import HypervisorError, PoolBusy, translate
from watcher.core.errors import PermanentError, TemporaryError


def refusal(message: str) -> libvirt.libvirtError:
    """A storage driver's refusal with exactly these fields (a new libvirtError otherwise
    takes the thread's last libvirt error, whatever an earlier call left there)."""
    error = libvirt.libvirtError(message)
    error.err = (libvirt.VIR_ERR_INTERNAL_ERROR, libvirt.VIR_FROM_STORAGE, message,
                 libvirt.VIR_ERR_ERROR, None, None, None, 0, 0)
    return error


def test_a_busy_pool_is_temporary_so_the_job_engine_retries_it() -> None:
    busy = refusal("internal error: pool 'p' has asynchronous jobs running.")
    error = translate(busy)
    assert isinstance(error, PoolBusy) and isinstance(error, TemporaryError)
    assert "asynchronous jobs running" in str(error)


@pytest.mark.parametrize("message", ["Storage volume not found: no volume with matching name",
                                     "internal error: no space left"])
def test_other_refusals_stay_permanent(message: str) -> None:
    error = translate(refusal(message))
    assert isinstance(error, HypervisorError) and isinstance(error, PermanentError)
