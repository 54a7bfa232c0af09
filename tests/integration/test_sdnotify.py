"""The notify protocol against real datagram sockets, as systemd's manager would receive it."""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from watcher.runtime.sdnotify import SystemdNotifier

pytestmark = pytest.mark.integration


def _receiver(address: str | bytes) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(2.0)
    return sock


@pytest.fixture
def path_socket(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    path = str(tmp_path / "notify")
    assert len(path) < 100, "AF_UNIX paths are limited to 108 bytes"
    sock = _receiver(path)
    yield path, sock
    sock.close()


@pytest.fixture
def abstract_socket() -> Iterator[tuple[str, socket.socket]]:
    name = f"lvw-notify-{uuid.uuid4().hex[:12]}"
    sock = _receiver(b"\0" + name.encode())
    yield "@" + name, sock
    sock.close()


def _messages(sock: socket.socket, count: int) -> list[list[str]]:
    return [sock.recv(4096).decode().split("\n") for _ in range(count)]


def test_ready_status_and_watchdog_reach_a_socket_bound_to_a_path(
    path_socket: tuple[str, socket.socket],
) -> None:
    address, sock = path_socket
    notifier = SystemdNotifier({"NOTIFY_SOCKET": address})
    assert notifier.enabled
    assert notifier.ready(status="consuming minio-events")
    assert notifier.status("reprovisioning web-1\n(2 queued)")
    assert notifier.watchdog()
    notifier.close()
    assert _messages(sock, 3) == [
        ["READY=1", "STATUS=consuming minio-events"],
        ["STATUS=reprovisioning web-1 (2 queued)"],
        ["WATCHDOG=1"],
    ]


def test_notifications_reach_an_abstract_socket(
    abstract_socket: tuple[str, socket.socket],
) -> None:
    address, sock = abstract_socket
    notifier = SystemdNotifier({"NOTIFY_SOCKET": address})
    assert notifier.ready()
    assert notifier.stopping()
    notifier.close()
    assert _messages(sock, 2) == [["READY=1"], ["STOPPING=1"]]


def test_reloading_carries_a_monotonic_timestamp_of_now(
    abstract_socket: tuple[str, socket.socket],
) -> None:
    address, sock = abstract_socket
    notifier = SystemdNotifier({"NOTIFY_SOCKET": address})
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notifier.reloading()
    notifier.close()
    [[reloading, monotonic]] = _messages(sock, 1)
    assert reloading == "RELOADING=1"
    key, value = monotonic.split("=")
    assert key == "MONOTONIC_USEC" and 0 <= int(value) - before < 5_000_000


def test_the_notifier_reads_notify_socket_from_the_process_environment(
    abstract_socket: tuple[str, socket.socket], monkeypatch: pytest.MonkeyPatch,
) -> None:
    address, sock = abstract_socket
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    notifier = SystemdNotifier()
    assert notifier.extend_timeout(30)
    notifier.close()
    assert _messages(sock, 1) == [["EXTEND_TIMEOUT_USEC=30000000"]]


def test_without_notify_socket_every_call_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = SystemdNotifier()
    assert not notifier.enabled
    assert [notifier.ready(), notifier.reloading(), notifier.stopping(), notifier.status("x"),
            notifier.watchdog()] == [False] * 5
    assert notifier.watchdog_interval() is None


def test_a_send_error_is_logged_once_and_never_raised(tmp_path: Path) -> None:
    with structlog.testing.capture_logs() as events:
        notifier = SystemdNotifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
        assert notifier.ready() is False
        assert notifier.watchdog() is False
        notifier.close()
    warnings = [e for e in events if e["log_level"] == "warning"]
    assert len(warnings) == 1
    assert warnings[0]["event"] == "cannot notify the service manager"


@pytest.mark.parametrize(("env", "interval"), [
    ({"WATCHDOG_USEC": "60000000"}, 30.0),
    ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": str(os.getpid())}, 30.0),
    ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "1"}, None),
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
    ({}, None),
], ids=["unset-pid", "our-pid", "another-pid", "zero", "not-a-number", "no-watchdog"])
def test_the_watchdog_interval_is_half_the_deadline_when_the_watchdog_is_ours(
    env: dict[str, str], interval: float | None,
) -> None:
    notifier = SystemdNotifier({"NOTIFY_SOCKET": "@lvw-unused", **env})
    assert notifier.watchdog_interval() == interval
