"""The daemon under test, two ways: in the caller's event loop, or as a child process.

In the loop (``running_daemon``) a test reaches into the daemon's objects and its
``/metrics``; as a process (``DaemonProcess``) it is what systemd runs, which a test
kills, restarts and signals, and whose memory a benchmark reads.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from testsupport.polling import wait_for, wait_for_sync
from watcher.config import load_config
from watcher.runtime.supervisor import Daemon

WATCHER = (sys.executable, "-m", "watcher")


@dataclass
class RunningDaemon:
    """A daemon running in the caller's event loop (without libvirt unless asked)."""

    daemon: Daemon
    task: asyncio.Task[int]

    def entries(self) -> list[str]:
        return [e.digest for e in self.daemon.cache.entries()]

    @property
    def exit_code(self) -> int:
        """What ``run`` returned; only once the daemon has stopped."""
        return self.task.result()


@asynccontextmanager
async def running_daemon(config_path: Path, daemon_class: type[Daemon] = Daemon, *,
                         with_libvirt: bool = False) -> AsyncIterator[RunningDaemon]:
    """The daemon in this loop, consuming; stopped afterwards (see ``exit_code``)."""
    daemon = daemon_class(load_config(config_path), drain_timeout=5, with_libvirt=with_libvirt)
    task = asyncio.create_task(daemon.run(handle_signals=False))
    try:
        await wait_for(lambda: daemon.consumer.consuming or task.done(), interval=0.02,
                       what="the consumer")
        assert not task.done(), f"daemon exited early: {task.result()}"
        yield RunningDaemon(daemon, task)
    finally:
        daemon.stop_requested.set()
        await asyncio.wait_for(task, 60)


class DaemonProcess:
    """``libvirt-volume-watcher run --config PATH`` as a child process.

    Without ``log`` its JSON log lines are read as they arrive and kept with their arrival
    time (``records``, ``find``). With ``log`` the output goes straight to that file,
    appended across restarts, so a daemon left running outlives this process; ``find``
    then reads the file back.
    """

    def __init__(self, config: Path, *, log: Path | None = None,
                 command: Sequence[str] = WATCHER, env: Mapping[str, str] | None = None) -> None:
        self.config = config
        self.log = log
        self.command = tuple(command)
        self.env = dict(env) if env is not None else None
        self.records: list[tuple[float, dict[str, Any]]] = []
        self.proc: subprocess.Popen[str] | None = None
        self.started = 0.0
        """``time.monotonic()`` when the current process was started."""
        self._reader: threading.Thread | None = None

    def start(self) -> DaemonProcess:
        """Start the process (again, after ``kill`` or ``stop``: a restart)."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.started = time.monotonic()
        argv = [*self.command, "run", "--config", str(self.config), "--log-format", "json"]
        if self.log is not None:
            with open(self.log, "ab") as out:
                self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                             text=True, env=self.env)
            self._reader = None
            return self
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True, env=self.env)
        self._reader = threading.Thread(target=self._read, args=(self.proc,), daemon=True)
        self._reader.start()
        return self

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stderr is not None
        with proc.stderr:
            for line in proc.stderr:
                self._keep(time.monotonic(), line, self.records)

    @staticmethod
    def _keep(when: float, line: str, into: list[tuple[float, dict[str, Any]]]) -> None:
        try:
            record = json.loads(line)
        except ValueError:
            return
        if isinstance(record, dict):
            into.append((when, record))

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def find(self, event: str) -> tuple[float, dict[str, Any]] | None:
        """The first log record with this ``event`` and when it arrived (with ``log``:
        when it was read back), or None."""
        records = self.records
        if self.log is not None:
            now, records = time.monotonic(), []
            with open(self.log, errors="replace") as text:
                for line in text:
                    self._keep(now, line, records)
        for when, record in list(records):
            if record.get("event") == event:
                return when, record
        return None

    def wait(self, predicate: Callable[[], Any], timeout: float, what: str) -> Any:
        """``wait_for_sync``, failing at once if the process exits first."""
        def holds() -> Any:
            if not self.running:
                tail = [r for _, r in self.records][-5:]
                code = self.proc.returncode if self.proc is not None else None
                raise AssertionError(f"watcher exited with {code} before {what}: {tail}")
            return predicate()

        return wait_for_sync(holds, timeout=timeout, interval=0.01, what=what)

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def kill(self) -> None:
        """SIGKILL, as a crash or the OOM killer would."""
        self.signal(signal.SIGKILL)
        self._reap(10)

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM and the exit code; killed (and TimeoutError raised) if it does not exit."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self._reap(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self._reap(10)
            raise TimeoutError(
                f"watcher {self.proc.pid} ignored SIGTERM for {timeout}s") from None
        return self.proc.returncode

    def _reap(self, timeout: float) -> None:
        assert self.proc is not None
        self.proc.wait(timeout)
        if self._reader is not None:
            self._reader.join(5)
