"""The libvirt hook as libvirtd runs it: its own executable file, started through its
shebang (isolated Python), with the domain XML on stdin."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from watcher import libvirt_hook
from watcher.adapters.write_markers import marked_writing


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    path = tmp_path / "root.img"
    path.write_bytes(b"\0" * 4096)
    return path


@pytest.fixture
def markers(tmp_path: Path) -> Path:
    return tmp_path / "writing"


def domain_on(path: Path) -> str:
    return (f"<domain><name>web-1</name><devices><disk type='file' device='disk'>"
            f"<source file='{path}'/></disk></devices></domain>")


@pytest.fixture
def installed_hook(tmp_path: Path) -> Path:
    """The hook copied and made executable, as install-hook.sh does."""
    target = tmp_path / "hooks" / "libvirt-volume-watcher"
    target.parent.mkdir()
    target.write_bytes(Path(libvirt_hook.__file__).read_bytes())
    target.chmod(0o755)
    return target


def run_hook(hook_file: Path, markers: Path, operation: str, sub_operation: str,
             stdin: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", libvirt_hook.WRITING_DIR_ENV: str(markers),
           "PYTHONPATH": "/nonexistent-poison"}  # ignored: the shebang runs Python isolated
    return subprocess.run([str(hook_file), "web-1", operation, sub_operation, "-"],
                          input=stdin, capture_output=True, text=True, env=env, timeout=30,
                          check=False)


def test_the_installed_hook_refuses_a_marked_disk_through_its_shebang(
        installed_hook: Path, disk: Path, markers: Path) -> None:
    assert Path(libvirt_hook.__file__).read_text().startswith("#!/usr/bin/python3 -IS\n")
    with marked_writing(str(disk), pool="api", volume="root.img", job_id="job-7",
                        directory=markers):
        done = run_hook(installed_hook, markers, "prepare", "begin", domain_on(disk))
    assert (done.returncode, done.stdout) == (1, "")
    assert "web-1: libvirt-volume-watcher is writing volume root.img of pool api" in done.stderr
    done = run_hook(installed_hook, markers, "prepare", "begin", domain_on(disk))
    assert (done.returncode, done.stderr) == (0, "")


@pytest.mark.parametrize(("operation", "sub_operation"), [
    ("start", "begin"), ("started", "begin"), ("stopped", "end"), ("release", "end"),
    ("reconnect", "begin"), ("migrate", "begin"),
])
def test_the_installed_hook_lets_every_other_operation_through_unread(
        installed_hook: Path, disk: Path, markers: Path, operation: str,
        sub_operation: str) -> None:
    with marked_writing(str(disk), pool="api", volume="root.img", job_id="job-7",
                        directory=markers):
        done = run_hook(installed_hook, markers, operation, sub_operation, "<not xml")
    assert (done.returncode, done.stderr) == (0, "")


