"""Listen addresses: the one parser that both config validation and the HTTP server use.

Why it exists: ``check`` must accept exactly what the server can bind, so the two never
disagree on an address such as ``:9700``. Pure: text in, ``(host, port)`` out.
"""

from __future__ import annotations


def parse_listen(listen: str) -> tuple[str | None, int]:
    """``host:port``, ``[v6addr]:port`` or ``:port`` (every interface) → ``(host, port)``.

    The host is None for every interface; the port is 0-65535 (0 = any free port). Raises
    ``ValueError`` naming the expected form for anything else, e.g. ``9700``, ``host:http``
    or an IPv6 address without brackets.
    """
    host, colon, port = listen.rpartition(":")
    if not colon or not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise ValueError(f"listen address must be host:port, got {listen!r}")
    if host.startswith("["):
        if not host.endswith("]") or len(host) <= 2:
            raise ValueError(f"listen address must be host:port or [v6addr]:port, got {listen!r}")
        host = host[1:-1]
    elif ":" in host or "[" in host or "]" in host:
        raise ValueError(f"listen address must be host:port, with an IPv6 address in "
                         f"brackets, got {listen!r}")
    if any(c.isspace() for c in host):
        raise ValueError(f"listen address must be host:port, got {listen!r}")
    return (host or None), int(port)
