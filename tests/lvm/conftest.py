"""Fixtures for tests that need real LVM: a fresh volume group on loop devices.

These tests run inside the User-Mode Linux guest started by ``scripts/test-lvm.sh``
(``scripts/uml-run`` sets ``LVW_UML_GUEST=1``), where device-mapper exists and we are
root. Anywhere else they are skipped. Each test gets its own VG on a freshly created
sparse PV file, so no LVM metadata survives from one run to the next.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
IN_GUEST = os.environ.get("LVW_UML_GUEST") == "1"

LVM_ENV = {**os.environ, "LC_ALL": "C", "LVM_SUPPRESS_FD_WARNINGS": "1"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip = pytest.mark.skip(reason="needs real device-mapper: run scripts/test-lvm.sh")
    for item in items:
        if HERE not in item.path.parents:
            continue
        if item.get_closest_marker("lvm") is None:
            raise pytest.UsageError(f"{item.nodeid}: every test in tests/lvm must be marked lvm")
        if not IN_GUEST:
            item.add_marker(skip)


def sh(*argv: str) -> str:
    """Run a command the test needs as a given, failing loudly with its stderr."""
    done = subprocess.run(argv, capture_output=True, text=True, env=LVM_ENV, timeout=300)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr}")
    return done.stdout


@dataclass(frozen=True)
class VolumeGroup:
    """A VG made for one test; ``create_lv`` returns the new LV's ``/dev/VG/LV`` path."""

    name: str
    pv: str

    def create_lv(self, lv: str, size: str) -> str:
        sh("lvcreate", "--yes", "--quiet", "--name", lv, "--size", size, self.name)
        return f"/dev/{self.name}/{lv}"

    def create_thin_pool(self, pool: str, size: str) -> str:
        sh("lvcreate", "--yes", "--quiet", "--type", "thin-pool", "--name", pool,
           "--size", size, self.name)
        return f"/dev/mapper/{self.name}-{pool}"

    def create_thin_lv(self, lv: str, size: str, pool: str) -> str:
        sh("lvcreate", "--yes", "--quiet", "--name", lv, "--virtualsize", size,
           "--thinpool", pool, self.name)
        return f"/dev/{self.name}/{lv}"

    def lv_names(self) -> list[str]:
        out = sh("lvs", "--all", "--noheadings", "--options", "lv_name", self.name)
        return [line.strip().strip("[]") for line in out.splitlines() if line.strip()]


@pytest.fixture
def vg(tmp_path: Path) -> Iterator[VolumeGroup]:
    """A fresh 512 MiB volume group (4 MiB extents) on a loop device, removed afterwards."""
    backing = tmp_path / "pv.img"
    with backing.open("wb") as handle:
        handle.truncate(512 * 1024**2)
    loop = sh("losetup", "--find", "--show", str(backing)).strip()
    name = f"vwtest_{uuid.uuid4().hex[:8]}"
    try:
        sh("pvcreate", "--yes", "--quiet", loop)
        sh("vgcreate", "--yes", "--quiet", name, loop)
        yield VolumeGroup(name, loop)
    finally:
        subprocess.run(["vgremove", "--yes", "--force", "--quiet", name],
                       capture_output=True, env=LVM_ENV, check=False, timeout=300)
        subprocess.run(["pvremove", "--yes", "--quiet", loop],
                       capture_output=True, env=LVM_ENV, check=False, timeout=300)
        subprocess.run(["losetup", "--detach", loop], capture_output=True, check=False)
