"""``reprovision DOMAIN --wait``: follow one request to its end, as automation needs.

A script that tags a domain wants to know when it may start it again, and whether the
write worked. So this optionally shuts the domain down (ACPI, then a hard stop after the
timeout, since a guest that ignores ACPI would otherwise block the rebuild forever), then
polls the domain's watcher state until it is ``provisioned`` (exit 0) or ``failed``
(exit 1), printing each change. While the daemon writes, its
``volume_watcher_write_progress_ratio{domain}`` and ``write_size_bytes{domain}`` gauges
(read from ``http.listen`` when a config names it) give the progress: on a terminal one
line redrawn in place (bar, percent, bytes, rate), elsewhere a plain line every tenth, so
a log stays readable. Nothing here writes a volume; the daemon does. A domain that no rule
of the config's policies matches is refused up front (``unmatched_here``): this watcher
would leave the request as it is, so the wait could only time out.
"""

from __future__ import annotations

import os
import shutil
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

from prometheus_client.parser import text_string_to_metric_families

from watcher.adapters.hypervisor.queries import progress, shut_down
from watcher.config import load_policy_dir
from watcher.core.errors import ConfigError
from watcher.core.units import format_size
from watcher.settings import Config

POLL = 0.5
"""Seconds between two looks at the domain: a person sees every state change."""
NO_DAEMON_HINT = 60.0
"""Seconds a shut-off domain may keep an untaken request before we suggest the watcher is
not running (a job normally starts within a second of the shut-off)."""


@dataclass(frozen=True)
class WriteProgress:
    """How far the daemon's write of one domain's volume is."""

    ratio: float
    """0..1, as qemu-img reports it."""
    size: int | None
    """Virtual bytes of the whole write; None from a daemon that does not say."""

    @property
    def written(self) -> int | None:
        return None if self.size is None else round(self.ratio * self.size)


def write_progress(metrics_url: str | None, domain: str) -> WriteProgress | None:
    """The daemon's write progress of ``domain``, or None when unknown."""
    if metrics_url is None:
        return None
    try:
        with urllib.request.urlopen(metrics_url, timeout=2) as response:
            text = response.read().decode()
    except OSError:
        return None
    return progress_in(text, domain)


def progress_in(text: str, domain: str) -> WriteProgress | None:
    """``domain``'s write progress in a ``/metrics`` text, or None when it has none."""
    ratio: float | None = None
    size: int | None = None
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.labels.get("domain") != domain:
                    continue
                if sample.name == "volume_watcher_write_progress_ratio":
                    ratio = float(sample.value)
                elif sample.name == "volume_watcher_write_size_bytes":
                    size = int(sample.value)
    except ValueError:
        return None  # not the exposition format: not our daemon
    return None if ratio is None else WriteProgress(ratio, size)


class RateMeter:
    """Bytes per second of one write, averaged since its first sample (steady to read)."""

    def __init__(self) -> None:
        self._first: tuple[float, int] | None = None
        self._last = 0

    def update(self, now: float, written: int | None) -> float | None:
        if written is None:
            return None
        restarted = written < self._last
        self._last = written
        if self._first is None or restarted:
            self._first = (now, written)  # first sample, or a new write started
            return None
        seconds = now - self._first[0]
        return (written - self._first[1]) / seconds if seconds > 0 else None


def bar(ratio: float, width: int = 30) -> str:
    done = max(0, min(width, round(ratio * width)))
    return f"[{'#' * done}{'-' * (width - done)}] {ratio * 100:5.1f}%"


def writing_line(domain: str, now: WriteProgress, rate: float | None) -> str:
    """``web-1: writing [###---] 50.0%  1.0GiB / 2.0GiB  110.2MiB/s`` (what is known)."""
    parts = [f"{domain}: writing {bar(now.ratio)}"]
    if now.size is not None and now.written is not None:
        parts.append(f"{format_size(now.written)} / {format_size(now.size)}")
    if rate is not None:
        parts.append(f"{format_size(round(rate))}/s")
    return "  ".join(parts)


class Console:
    """Where ``follow`` writes: lines that stay, and one status line that changes.

    On a terminal the status line is redrawn in place with a carriage return, cut to the
    terminal's width so it never wraps, and cleared before a line that stays. Anywhere
    else (a pipe, a file, the journal) no control character is written: a status line is
    printed only when its ``step`` changes.
    """

    def __init__(self, stream: TextIO, *, live: bool | None = None,
                 columns: Callable[[], int] = lambda: shutil.get_terminal_size().columns,
                 ) -> None:
        self.stream = stream
        self.live = (stream.isatty() and os.environ.get("TERM") != "dumb"
                     if live is None else live)
        self._columns = columns
        self._drawn = ""
        self._step: object = None

    def say(self, line: str) -> None:
        """A line that stays: a state change or the result."""
        self._clear()
        self.stream.write(line + "\n")
        self.stream.flush()
        self._step = None

    def status(self, line: str, *, step: object) -> None:
        """The current progress; a plain stream sees it once per ``step``."""
        if not self.live:
            if step != self._step:
                self._step = step
                self.stream.write(line + "\n")
                self.stream.flush()
            return
        line = line[:max(1, self._columns() - 1)]
        if line != self._drawn:
            self.stream.write("\r" + line + "\x1b[K")
            self.stream.flush()
            self._drawn = line

    def close(self) -> None:
        """Leave the cursor on a fresh line (after Ctrl-C too)."""
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = ""

    def _clear(self) -> None:
        if self._drawn:
            self.stream.write("\r\x1b[K")
            self._drawn = ""


def unmatched_here(config: Config | None, domain: str) -> str | None:
    """Why no rule of ``config``'s policies matches ``domain`` on this host; None when one
    does, or when there is no config, its policies do not load or hold no rule (nothing to
    judge by)."""
    if config is None:
        return None
    try:
        policies = load_policy_dir(config.policies.dir).on_host(config.host.resolved)
    except ConfigError:
        return None
    if not policies.rules or policies.rule_for(domain) is not None:
        return None  # no rules at all says nothing of this domain
    return policies.why_unmatched(domain)


def follow(uri: str, domain: str, *, shutdown: bool, timeout: float, metrics_url: str | None,
           console: Console, clock: Callable[[], float] = time.monotonic) -> int:
    """Shut down if asked, then wait for the request's end; returns the exit code."""
    try:
        return _follow(uri, domain, shutdown=shutdown, timeout=timeout,
                       metrics_url=metrics_url, console=console, clock=clock)
    finally:
        console.close()


def _follow(uri: str, domain: str, *, shutdown: bool, timeout: float, metrics_url: str | None,
            console: Console, clock: Callable[[], float]) -> int:
    say = console.say
    started = clock()
    if shutdown and not progress(uri, domain).shut_off:
        say(f"{domain}: shutting down (ACPI; a hard stop after {timeout:g} s)")
        shut_down(uri, domain, force=False)
        while not progress(uri, domain).shut_off:
            if clock() - started > timeout:
                say(f"{domain}: no shutdown after {timeout:g} s; stopping it hard")
                shut_down(uri, domain, force=True)
                break
            time.sleep(POLL)
    last = ""
    hinted = False
    rate = RateMeter()
    while True:
        now = progress(uri, domain)
        state = now.state
        kind = state.kind if state is not None else "none"
        if kind == "provisioned":
            say(f"{domain}: provisioned with {state.image if state else '?'} "
                f"({(state.sha256 or '')[:12] if state else ''}) after {clock() - started:.1f} s")
            return 0
        if kind == "failed":
            say(f"{domain}: failed: {state.reason if state else ''}")
            return 1
        if kind == "none":
            say(f"{domain}: the request is gone (cancelled); nothing was written")
            return 1
        if kind == "provisioning":
            written = write_progress(metrics_url, domain)
            if written is None:
                line = f"{domain}: writing"
            else:
                console.status(writing_line(domain, written, rate.update(clock(), written.written)),
                               step=min(10, int(written.ratio * 10)))
                time.sleep(POLL)
                continue
        elif now.shut_off:
            line = f"{domain}: requested; waiting for the watcher to take it up"
            if not hinted and clock() - started > NO_DAEMON_HINT:
                hinted = True
                say(f"{domain}: still not taken up after {NO_DAEMON_HINT:g} s; is the "
                    "watcher running (systemctl status libvirt-volume-watcher)?")
        else:
            line = f"{domain}: requested; waiting until the domain is shut off"
        if line != last:
            say(line)
            last = line
        time.sleep(POLL)
