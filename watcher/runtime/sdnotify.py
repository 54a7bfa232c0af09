"""The systemd notify protocol, so ``Type=notify`` and ``WatchdogSec=`` mean something.

systemd learns from these datagrams when the daemon is really ready (connected and
policies loaded, not merely started), when it reloads or drains, what it is doing (the
``STATUS=`` line in ``systemctl status``), and that its event loop is still turning
(the watchdog). The protocol is a few ``KEY=value`` lines sent to the datagram socket
named by ``NOTIFY_SOCKET``; it is small enough that a dependency would cost more than it
saves. Outside systemd (``NOTIFY_SOCKET`` unset) every call does nothing, and a send
error never stops the daemon: it is logged once and the daemon carries on.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

from watcher import telemetry


class SystemdNotifier:
    """Sends state changes to the service manager; cheap to call, never raises."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._address = _socket_address(env.get("NOTIFY_SOCKET", ""))
        self._watchdog_usec = env.get("WATCHDOG_USEC", "")
        self._watchdog_pid = env.get("WATCHDOG_PID", "")
        self._socket: socket.socket | None = None
        self._send_error_logged = False
        self._log = telemetry.get_logger(component="sdnotify")
        if env.get("NOTIFY_SOCKET") and self._address is None:
            self._log.warning("unsupported NOTIFY_SOCKET address, notifications disabled",
                              notify_socket=env.get("NOTIFY_SOCKET"))

    @property
    def enabled(self) -> bool:
        """Whether a service manager listens (``NOTIFY_SOCKET`` is set and usable)."""
        return self._address is not None

    def notify(self, *fields: str) -> bool:
        """Send ``KEY=value`` fields in one datagram; returns whether it was sent."""
        if self._address is None or not fields:
            return False
        payload = "\n".join(fields).encode("utf-8", "replace")
        try:
            if self._socket is None:
                self._socket = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                # A full receive queue must not block the event loop.
                self._socket.setblocking(False)
            self._socket.sendto(payload, self._address)
        except OSError as exc:
            if not self._send_error_logged:
                self._send_error_logged = True
                self._log.warning("cannot notify the service manager",
                                  error=str(exc), fields=[f.split("=", 1)[0] for f in fields])
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Start-up (or a reload) is complete; systemd finishes ``start``/``reload`` now."""
        return self.notify("READY=1", *([_status_field(status)] if status is not None else []))

    def reloading(self) -> bool:
        """A reload (SIGHUP) has begun; send ``ready()`` when it is done."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> bool:
        """Shutdown has begun: the daemon drains in-flight work before it exits."""
        return self.notify("STOPPING=1")

    def status(self, text: str) -> bool:
        """A one-line description of what the daemon does, shown by ``systemctl status``."""
        return self.notify(_status_field(text))

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for ``seconds`` more before a start, reload or stop timeout kills the daemon."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={max(0, round(seconds * 1_000_000))}")

    def watchdog(self) -> bool:
        """Proof of life; must arrive at least every ``WatchdogSec=``."""
        return self.notify("WATCHDOG=1")

    def watchdog_interval(self) -> float | None:
        """Seconds between ``watchdog()`` pings (half the deadline), or None if unwatched.

        ``WATCHDOG_PID`` names the process the watchdog is meant for; when it names
        another one (a child that inherited the environment), this process is unwatched.
        """
        if self._address is None:
            return None
        if self._watchdog_pid and self._watchdog_pid != str(os.getpid()):
            return None
        try:
            usec = int(self._watchdog_usec)
        except ValueError:
            return None
        return usec / 2 / 1_000_000 if usec > 0 else None

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def _socket_address(value: str) -> str | bytes | None:
    """``NOTIFY_SOCKET`` as a ``sendto`` address: a path, or ``@name`` in the abstract namespace."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()
    return None  # empty, or a vsock: address this daemon has no use for


def _status_field(text: str) -> str:
    # One line: a newline would start a new (unintended) field.
    return "STATUS=" + " ".join(text.split())
