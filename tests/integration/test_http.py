"""The HTTP face on a real socket, queried by a real HTTP client (the standard library's)."""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.http_attacker import raise_nofile
from watcher import __version__, telemetry
from watcher.core.address import parse_listen
from watcher.http import HttpServer

pytestmark = pytest.mark.integration


class Checks:
    """Readiness the test flips, as the daemon would when a dependency comes and goes."""

    def __init__(self) -> None:
        self.state = {"libvirt": True, "amqp": False, "policies": True}

    def __call__(self) -> dict[str, bool]:
        return dict(self.state)


@pytest.fixture
def checks() -> Checks:
    return Checks()


@pytest.fixture
async def server(checks: Checks) -> AsyncIterator[HttpServer]:
    srv = HttpServer("127.0.0.1:0", checks, header_timeout=0.5, max_header_bytes=1024)
    await srv.start()
    yield srv
    await srv.stop()


async def _get(
    port: int, path: str, method: str = "GET"
) -> tuple[int, dict[str, str], bytes]:
    def request() -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            conn.request(method, path)
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()

    return await asyncio.to_thread(request)


async def _raw(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), timeout=5)
    finally:
        writer.close()
        await writer.wait_closed()


def _sample(text: str, name: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    raise AssertionError(f"{name} not in /metrics")


def _assert_error_shape(reply: bytes, status: int) -> None:
    """aiohttp's own refusals too: JSON in the predecessor's error shape, with a request id."""
    head, _, body = reply.partition(b"\r\n\r\n")
    assert b"\r\nContent-Type: application/json" in head, head
    assert b"\r\nX-Request-ID: " in head, head
    answer = json.loads(body)
    assert set(answer) == {"error", "message", "code"} and answer["code"] == status, answer


async def test_metrics_serves_the_registry_and_reflects_a_new_count(server: HttpServer) -> None:
    status, headers, body = await _get(server.port, "/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=")
    assert b"\nvolume_watcher_" in body
    before = _sample(body.decode(), "volume_watcher_cache_hits_total")

    telemetry.cache_hits.inc(3)
    _, _, body = await _get(server.port, "/metrics")
    assert _sample(body.decode(), "volume_watcher_cache_hits_total") == before + 3


async def test_readyz_is_503_naming_the_failing_check_until_all_checks_pass(
    server: HttpServer, checks: Checks,
) -> None:
    status, headers, body = await _get(server.port, "/readyz")
    assert status == 503
    assert headers["Content-Type"] == "application/json"
    assert json.loads(body) == {
        "error": "not ready", "message": "failing: amqp", "code": 503,
        "ready": False,
        "checks": {"libvirt": True, "amqp": False, "policies": True},
        "failing": ["amqp"],
    }
    # Alive all the same, but not healthy: a deploy script's grep for "healthy" fails.
    status, _, body = await _get(server.port, "/healthz")
    assert (status, json.loads(body)["status"]) == (200, "degraded")

    checks.state["amqp"] = True
    status, _, body = await _get(server.port, "/readyz")
    assert status == 200
    assert json.loads(body)["ready"] is True and json.loads(body)["failing"] == []


async def test_readyz_is_503_when_the_readiness_callable_raises() -> None:
    def broken() -> dict[str, bool]:
        raise RuntimeError("supervisor not started")

    srv = HttpServer("127.0.0.1:0", broken)
    await srv.start()
    try:
        status, _, body = await _get(srv.port, "/readyz")
    finally:
        await srv.stop()
    assert status == 503
    answer = json.loads(body)
    assert (answer["error"], answer["code"], answer["ready"]) == ("not ready", 503, False)
    assert "supervisor not started" in answer["message"]


async def test_healthz_answers_healthy_in_the_predecessors_shape(
    server: HttpServer, checks: Checks,
) -> None:
    checks.state["amqp"] = True
    for path in ("/health", "/livez"):  # the predecessor's names answer the same
        status, _, body = await _get(server.port, path)
        assert (status, json.loads(body)["status"]) == (200, "healthy"), path
    status, _, body = await _get(server.port, "/healthz?verbose=1")
    health = json.loads(body)
    assert status == 200 and list(health) == ["status", "timestamp", "version", "uptime"]
    assert (health["status"], health["version"]) == ("healthy", __version__)
    assert re.fullmatch(r"[0-9]+s", health["uptime"]), health  # a fresh server: seconds
    stamp = datetime.fromisoformat(health["timestamp"].replace("Z", "+00:00"))
    assert abs((datetime.now(UTC) - stamp).total_seconds()) < 60


async def test_head_gets_the_headers_without_a_body(server: HttpServer) -> None:
    status, headers, body = await _get(server.port, "/healthz", method="HEAD")
    assert status == 200 and body == b""
    assert int(headers["Content-Length"]) > 0


async def test_unknown_paths_are_404_and_other_methods_405(server: HttpServer) -> None:
    status, _, body = await _get(server.port, "/admin")
    assert (status, json.loads(body)["code"]) == (404, 404)
    status, headers, body = await _get(server.port, "/metrics", method="POST")
    assert status == 405
    assert headers["Allow"] == "GET, HEAD"
    assert json.loads(body) == {"error": "method not allowed",
                                "message": "POST is not allowed on /metrics", "code": 405}


async def test_garbage_gets_400_and_the_server_keeps_serving(server: HttpServer) -> None:
    reply = await _raw(server.port, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 400 ")
    _assert_error_shape(reply, 400)
    assert await _raw(server.port, b"") == b""  # connect and hang up at once
    assert (await _get(server.port, "/healthz"))[0] == 200


async def test_an_oversized_request_head_is_refused_with_431(server: HttpServer) -> None:
    reply = await _raw(server.port, b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 4096 + b"\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 431 ")
    _assert_error_shape(reply, 431)
    # A head within the line limit but over the whole-head limit: the middleware's 431.
    many = b"".join(b"X-H%d: %s\r\n" % (n, b"a" * 1000) for n in range(3))
    reply = await _raw(server.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n")
    assert reply.startswith(b"HTTP/1.1 431 ")
    _assert_error_shape(reply, 431)
    assert (await _get(server.port, "/healthz"))[0] == 200


async def test_a_client_that_never_finishes_its_request_is_disconnected(
    server: HttpServer,
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # no blank line, ever
        await writer.drain()
        # The server's read deadline is 0.5 s: it hangs up without answering.
        assert await asyncio.wait_for(reader.read(), timeout=5) == b""
    finally:
        writer.close()
        await writer.wait_closed()
    assert (await _get(server.port, "/healthz"))[0] == 200


Attack = Callable[..., Awaitable[asyncio.subprocess.Process]]
_ATTACKER = Path(__file__).with_name("http_attacker.py")


@pytest.fixture
async def attack() -> AsyncIterator[Attack]:
    """Starts attackers in other processes; stops them at the end of the test."""
    procs: list[asyncio.subprocess.Process] = []

    async def start(port: int, *, idle: int, slow: int) -> asyncio.subprocess.Process:
        raise_nofile(idle + slow + 256)  # their peers on the server side live here
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(_ATTACKER), str(port), f"--idle={idle}", f"--slow={slow}",
            stdout=asyncio.subprocess.PIPE)
        procs.append(proc)
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), timeout=30)
        assert line == b"ready\n", "the attacker did not get all its connections open"
        return proc

    yield start
    await _stop_attackers(procs)


async def _stop_attackers(procs: list[asyncio.subprocess.Process]) -> None:
    for proc in procs:
        if proc.returncode is None:
            proc.terminate()
        await proc.wait()


async def _stop_after_the_attack(srv: HttpServer, *attackers: asyncio.subprocess.Process) -> None:
    """End the attack first: a connection still being accepted while the server stops is
    closed only by the garbage collector, which warns in whatever test runs then."""
    await _stop_attackers(list(attackers))
    await srv.stop()


async def _timed_get(port: int, path: str) -> tuple[int | str, float]:
    """(status or the error's name, seconds): a failed probe is a result, not a crash."""
    started = time.monotonic()
    try:
        status = (await _get(port, path))[0]
    except (OSError, http.client.HTTPException) as exc:
        return type(exc).__name__, time.monotonic() - started
    return status, time.monotonic() - started


async def test_probes_are_answered_while_another_process_holds_500_idle_and_slow_connections(
    checks: Checks, attack: Attack,
) -> None:
    srv = HttpServer("127.0.0.1:0", checks)  # the daemon's defaults
    await srv.start()
    attackers: list[asyncio.subprocess.Process] = []
    try:
        attacker = await attack(srv.port, idle=250, slow=250)
        attackers.append(attacker)
        # Spread over more than one header deadline, so probes also meet the churn of
        # attackers being cut off and connecting again.
        results: dict[str, list[tuple[int | str, float]]] = {"/healthz": [], "/metrics": []}
        for _ in range(20):
            for path, seen in results.items():
                seen.append(await _timed_get(srv.port, path))
            await asyncio.sleep(0.15)
        assert attacker.returncode is None, "the attack stopped before the probes did"
    finally:
        await _stop_after_the_attack(srv, *attackers)
    # Under 1.9 s: answered, not held until an attacker's 2 s head deadline freed a slot.
    for path, seen in results.items():
        assert all(status == 200 and took < 1.9 for status, took in seen), (path, seen)


async def test_a_full_server_admits_a_probe_by_dropping_the_oldest_unfinished_connection(
    checks: Checks, attack: Attack,
) -> None:
    srv = HttpServer("127.0.0.1:0", checks, max_connections=8)
    await srv.start()
    attackers: list[asyncio.subprocess.Process] = []
    try:
        # Every slot taken, and taken again when freed.
        attackers.append(await attack(srv.port, idle=8, slow=0))
        seen = [await _timed_get(srv.port, "/healthz") for _ in range(10)]
    finally:
        await _stop_after_the_attack(srv, *attackers)
    assert all(status == 200 and took < 1.9 for status, took in seen), seen


async def test_a_request_head_trickling_in_is_cut_at_the_two_second_deadline(
    checks: Checks,
) -> None:
    srv = HttpServer("127.0.0.1:0", checks)  # the daemon's defaults
    await srv.start()
    try:
        started = time.monotonic()
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)

        async def trickle() -> None:
            # A valid request, but at this pace it would take 12 s to arrive.
            for byte in b"GET /healthz HTTP/1.1\r\n\r\n":
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0.5)

        sender = asyncio.create_task(trickle())
        try:
            reply = await asyncio.wait_for(reader.read(), timeout=10.0)
        finally:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
            writer.close()
        took = time.monotonic() - started
    finally:
        await srv.stop()
    assert reply == b""
    # Cut at its deadline (the request itself would take 12 s), with room for a busy machine.
    assert 1.95 <= took <= 5.0, took


async def test_stop_closes_the_listening_socket(checks: Checks) -> None:
    srv = HttpServer("127.0.0.1:0", checks)
    await srv.start()
    port = srv.port
    await srv.stop()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)
    with pytest.raises(RuntimeError):
        _ = srv.port


@pytest.mark.parametrize(("listen", "parsed"), [
    ("127.0.0.1:9700", ("127.0.0.1", 9700)),
    ("[::1]:9700", ("::1", 9700)),
    (":9700", (None, 9700)),
])
def test_listen_addresses_parse_into_host_and_port(
    listen: str, parsed: tuple[str | None, int],
) -> None:
    assert parse_listen(listen) == parsed


@pytest.mark.parametrize("listen", ["9700", "localhost:http", "127.0.0.1:70000"])
def test_a_bad_listen_address_is_refused(listen: str) -> None:
    with pytest.raises(ValueError, match="host:port"):
        parse_listen(listen)
