"""Listen addresses: one parser for ``check`` and the HTTP server, so they agree."""

from __future__ import annotations

import pytest

from watcher.core.address import parse_listen


@pytest.mark.parametrize(("listen", "parsed"), [
    pytest.param("127.0.0.1:9700", ("127.0.0.1", 9700), id="ipv4"),
    pytest.param("localhost:80", ("localhost", 80), id="hostname"),
    pytest.param("[::1]:9700", ("::1", 9700), id="ipv6-in-brackets"),
    pytest.param("[::]:9700", ("::", 9700), id="ipv6-any"),
    pytest.param(":9700", (None, 9700), id="every-interface"),
    pytest.param("0.0.0.0:0", ("0.0.0.0", 0), id="any-free-port"),
    pytest.param("h:65535", ("h", 65535), id="highest-port"),
])
def test_a_listen_address_parses_into_host_and_port(
    listen: str, parsed: tuple[str | None, int],
) -> None:
    assert parse_listen(listen) == parsed


@pytest.mark.parametrize("listen", [
    pytest.param("9700", id="port-only"),
    pytest.param("localhost", id="host-only"),
    pytest.param("localhost:http", id="service-name"),
    pytest.param("h:65536", id="port-too-large"),
    pytest.param("h:-1", id="negative-port"),
    pytest.param("h:", id="no-port"),
    pytest.param("h:\uff19\uff17\uff10\uff10", id="non-ascii-digits"),
    pytest.param("::1:9700", id="ipv6-without-brackets"),
    pytest.param("[::1:9700", id="unclosed-bracket"),
    pytest.param("[]:9700", id="empty-brackets"),
    pytest.param("::1]:9700", id="stray-bracket"),
    pytest.param("my host:9700", id="space-in-host"),
    pytest.param("", id="empty"),
])
def test_anything_else_is_refused_naming_the_expected_form(listen: str) -> None:
    with pytest.raises(ValueError, match="host:port"):
        parse_listen(listen)
