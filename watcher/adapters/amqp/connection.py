"""The broker connection: reconnects spread out, and a URL fit for logs."""

from __future__ import annotations

import random

import aio_pika


class JitteredRobustConnection(aio_pika.RobustConnection):
    """A robust connection whose reconnect attempts are spread out.

    After a broker restart every host of a fleet would otherwise retry in lockstep, all
    ``reconnect_interval`` seconds apart. Each wait is drawn anew between half and one and
    a half times the configured interval (aio-pika reads the attribute before each wait).
    """

    @property
    def reconnect_interval(self) -> float:
        return self._base_reconnect_interval * random.uniform(0.5, 1.5)

    @reconnect_interval.setter
    def reconnect_interval(self, seconds: float) -> None:
        self._base_reconnect_interval = seconds


def redacted(url: str) -> str:
    """The broker URL without its password, fit for messages and logs."""
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not sep or not at:
        return url
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"
