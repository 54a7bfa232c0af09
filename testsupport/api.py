"""A daemon process serving the HTTP job API on a libvirt dir pool of its own.

Tests of the API's contract and the API benchmark need the same scene: a dir pool named
uniquely on the shared libvirtd, a tokens file, a config with ``api`` and ``state`` set,
and the daemon started as systemd would start it. ``api_daemon`` sets it up and removes
the pool afterwards, also when the caller fails.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from testsupport.daemon import DaemonProcess
from testsupport.services import free_port

LIBVIRT_URI = "qemu:///system"


@dataclass
class ApiDaemon:
    """The API's address and credentials, its pool, and the process serving it."""

    pool: str
    pool_dir: Path
    port: int
    token: str
    daemon: DaemonProcess
    probe_port: int
    """The daemon's ``http.listen`` port: ``/readyz`` and ``/metrics``."""
    tls: bool = False

    @property
    def base_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def auth_header(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def virsh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["virsh", "-q", "-c", LIBVIRT_URI, *args], check=check,
                          capture_output=True, text=True, timeout=60)


def answers(port: int) -> bool:
    """True when something accepts TCP connections on 127.0.0.1:``port``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def ready(probe_port: int) -> bool:
    """True when ``/readyz`` says libvirt is connected, AMQP consuming, policies loaded."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{probe_port}/readyz", timeout=2) as got:
            return bool(json.loads(got.read()).get("ready"))
    except OSError:  # refused while starting, or 503 (an HTTPError) while not ready
        return False


@contextlib.contextmanager
def api_daemon(root: Path, pool: str, write_config: Callable[..., Path], *, token: str,
               tls: dict[str, str] | None = None) -> Iterator[ApiDaemon]:
    """The daemon with ``api`` on a free port and dir pool ``pool`` under ``root/pool``.

    ``write_config(**overrides)`` writes the rest of the config (S3, AMQP, cache) and
    returns its path; the daemon logs to ``root/watcher.log``. Returns once ``/readyz``
    says ready. ``tls`` adds ``api`` keys (``tls_cert``, ``tls_key``, ``client_ca``) and
    the API speaks HTTPS; with an empty ``token`` there is no tokens file, so only a
    client certificate gets in.
    """
    pool_dir = root / "pool"
    pool_dir.mkdir(mode=0o755)
    api: dict[str, str] = {"pool": pool, **(tls or {})}
    if token:
        tokens = root / "tokens"
        tokens.write_text(token + "\n")
        tokens.chmod(0o600)
        api["tokens_file"] = str(tokens)
    port, probe_port = free_port(), free_port()
    config = write_config(api={"listen": f"127.0.0.1:{port}", **api},
                          http={"listen": f"127.0.0.1:{probe_port}"},
                          state={"dir": str(root / "state")})
    virsh("pool-define-as", pool, "dir", "--target", str(pool_dir))
    try:
        virsh("pool-start", pool)
        daemon = DaemonProcess(config, log=root / "watcher.log").start()
        try:
            # Ready, not just listening: before libvirt is connected the API answers 503.
            daemon.wait(lambda: answers(port) and ready(probe_port), 60, "the daemon to be ready")
            yield ApiDaemon(pool, pool_dir, port, token, daemon, probe_port, tls=bool(tls))
        finally:
            daemon.stop()
    finally:
        virsh("pool-destroy", pool, check=False)
        virsh("pool-undefine", pool, check=False)
