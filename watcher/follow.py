"""``reprovision DOMAIN --wait``: follow one request to its end, as automation needs.

A script that tags a domain wants to know when it may start it again, and whether the
write worked. So this optionally shuts the domain down (ACPI, then a hard stop after the
timeout, since a guest that ignores ACPI would otherwise block the rebuild forever), then
polls the domain's watcher state until it is ``provisioned`` (exit 0) or ``failed``
(exit 1), printing each change. While the daemon writes, its
``volume_watcher_write_progress_ratio{domain}`` gauge (read from ``http.listen`` when a
config names it) draws a progress bar. Nothing here writes a volume; the daemon does.
"""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable

from prometheus_client.parser import text_string_to_metric_families

from watcher.adapters.hypervisor.queries import progress, shut_down

POLL = 0.5
"""Seconds between two looks at the domain: a person sees every state change."""
NO_DAEMON_HINT = 60.0
"""Seconds a shut-off domain may keep an untaken request before we suggest the watcher is
not running (a job normally starts within a second of the shut-off)."""


def write_progress(metrics_url: str | None, domain: str) -> float | None:
    """The daemon's write progress of ``domain`` (0..1), or None when unknown."""
    if metrics_url is None:
        return None
    try:
        with urllib.request.urlopen(metrics_url, timeout=2) as response:
            text = response.read().decode()
    except OSError:
        return None
    return progress_in(text, domain)


def progress_in(text: str, domain: str) -> float | None:
    """``domain``'s write progress in a ``/metrics`` text, or None when it has none."""
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if (sample.name == "volume_watcher_write_progress_ratio"
                        and sample.labels.get("domain") == domain):
                    return float(sample.value)
    except ValueError:
        return None  # not the exposition format: not our daemon
    return None


def bar(ratio: float, width: int = 30) -> str:
    done = max(0, min(width, round(ratio * width)))
    return f"[{'#' * done}{'-' * (width - done)}] {ratio * 100:5.1f}%"


def follow(uri: str, domain: str, *, shutdown: bool, timeout: float, metrics_url: str | None,
           say: Callable[[str], None], clock: Callable[[], float] = time.monotonic) -> int:
    """Shut down if asked, then wait for the request's end; returns the exit code."""
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
            ratio = write_progress(metrics_url, domain)
            line = f"{domain}: writing {bar(ratio)}" if ratio is not None else \
                f"{domain}: writing"
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
