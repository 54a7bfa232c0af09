"""``scripts/services.sh --env`` as ``demo.sh`` uses it: its stdout is evaluated by a shell.

The shared services already run here, so the test asks for an S3 server on a port and in a
directory of its own: services.sh really starts one, which is the case that used to print
progress on stdout. The test stops that server, and only that one, afterwards.
"""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.integration

LISTENERS = 11
"""Ports the S3 server takes: LVW_S3_PORT and the ten just above it."""
ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=\S*")


def free_port_range() -> int:
    """A port whose ``LISTENERS - 1`` successors are free too."""
    for _ in range(100):
        base = random.randrange(20000, 40000)
        try:
            for port in range(base, base + LISTENERS):
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise AssertionError("no free range of ports found")


def stop(pid_file: Path, s3_dir: Path) -> None:
    """Stop the S3 server services.sh started for this test, after checking it is that one."""
    if not pid_file.exists():
        return
    pid = int(pid_file.read_text())
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except FileNotFoundError:
        return
    if f"-dir={s3_dir}".encode() not in cmdline:
        return  # the pid was reused: not ours
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    if Path(f"/proc/{pid}").exists():
        os.kill(pid, signal.SIGKILL)


@pytest.fixture
def own_s3(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A port and a directory no S3 server uses yet; whatever starts there is stopped."""
    port, s3_dir = free_port_range(), tmp_path / "s3"
    yield port, s3_dir
    stop(Path(f"{s3_dir}.pid"), s3_dir)


def test_env_output_is_only_assignments_a_shell_can_eval_when_it_starts_a_service(
    own_s3: tuple[int, Path],
) -> None:
    port, s3_dir = own_s3
    result = subprocess.run(
        [str(ROOT / "scripts" / "services.sh"), "--env"], capture_output=True, text=True,
        timeout=300, env={**os.environ, "LVW_S3_PORT": str(port), "LVW_S3_DIR": str(s3_dir)},
    )
    assert result.returncode == 0, result.stderr
    assert f"starting the S3 server on 127.0.0.1:{port}" in result.stderr  # really started
    lines = result.stdout.splitlines()
    assert [line for line in lines if not ASSIGNMENT.fullmatch(line)] == []
    assert sorted(line.split("=", 1)[0] for line in lines) == [
        "LVW_S3_ACCESS_KEY", "LVW_S3_ENDPOINT", "LVW_S3_SECRET_KEY"]

    evaluated = subprocess.run(
        ["bash", "-c", 'set -eu; eval "$1"; echo "$LVW_S3_ENDPOINT $LVW_S3_ACCESS_KEY"',
         "bash", result.stdout], capture_output=True, text=True, timeout=10, check=True)
    assert evaluated.stderr == ""
    endpoint, access_key = evaluated.stdout.split()
    assert endpoint == f"http://127.0.0.1:{port}"
    assert access_key == "watcher"
    assert Path(f"{s3_dir}.pid").exists()
