"""Metrics read the way Prometheus reads them: from the ``/metrics`` text, by name and labels.

Tests look at what an operator's scraper sees, never at the client library's internals.
Counters live as long as the process (in-process daemons share one registry), so a test
reads a value first and compares against it.
"""

from __future__ import annotations

import asyncio
import urllib.request

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from testsupport.daemon import RunningDaemon
from testsupport.polling import wait_for
from watcher import telemetry


def samples_sum(text: str, name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels``."""
    return sum(float(sample.value) for family in text_string_to_metric_families(text)
               for sample in family.samples
               if sample.name == name and all(sample.labels.get(k) == v
                                              for k, v in labels.items()))


def scrape(port: int, name: str, **labels: str) -> float:
    """``samples_sum`` of ``http://127.0.0.1:PORT/metrics``; blocks the calling thread."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return samples_sum(response.read().decode(), name, **labels)


def metric(daemon: RunningDaemon, name: str, **labels: str) -> float:
    """The value an in-process daemon's ``/metrics`` serves; call it from another thread."""
    assert daemon.daemon.http is not None, "the daemon serves no /metrics (http.listen is off)"
    return scrape(daemon.daemon.http.port, name, **labels)


async def metric_async(daemon: RunningDaemon, name: str, **labels: str) -> float:
    # In a thread: the daemon's HTTP server runs on this very loop.
    return await asyncio.to_thread(metric, daemon, name, **labels)


async def metric_grows(daemon: RunningDaemon, name: str, since: float, by: float,
                       timeout: float = 30.0, **labels: str) -> None:
    """Wait until the metric is at least ``since + by``."""
    deadline = asyncio.get_running_loop().time() + timeout
    while (seen := await metric_async(daemon, name, **labels)) < since + by:
        assert asyncio.get_running_loop().time() < deadline, (
            f"{name}{labels} stayed at {seen}, expected {since + by}")
        await asyncio.sleep(0.05)


def metric_now(name: str, **labels: str) -> float:
    """The same sum from the text the registry would serve now, with no daemon serving it."""
    return samples_sum(generate_latest(telemetry.REGISTRY).decode(), name, **labels)


RECEIVED = "volume_watcher_events_received_total"


async def messages_handled(daemon: RunningDaemon, since: float, count: int,
                           timeout: float = 30.0) -> None:
    """Wait until ``count`` more bucket events than ``since`` (a ``RECEIVED`` reading with
    ``source="amqp"``) have arrived and every AMQP handler has finished.

    A handler counts its events before the consumer tracks its task, so once the count
    is reached an idle consumer means those messages were handled, not merely delivered.
    """
    await metric_grows(daemon, RECEIVED, since, count, timeout, source="amqp")
    await wait_for(lambda: daemon.daemon.consumer.messages_in_flight == 0, timeout=timeout,
                   what="the AMQP handlers to finish")
