"""The API listener on a real socket: auth (tokens, mTLS), TLS, errors, request ids, limits.

Queried with the standard library's HTTP client; certificates are made per test session
with the ``openssl`` command line.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import signal
import ssl
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

import pytest
from aiohttp import web

from tests.integration.harness import Env
from tests.integration.test_daemon import CLI
from testsupport.polling import wait_for
from testsupport.services import free_port
from watcher import __version__
from watcher.config import check_all
from watcher.http.api import ApiServer, streams_body
from watcher.settings import HTTP_TUNING, ApiSettings, HttpTuning

pytestmark = pytest.mark.integration

GOOD = "tok-" + "a" * 32
Reply = tuple[int, dict[str, str], bytes]


# --- certificates ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path
    """Signed by another CA."""
    stranger_key: Path


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def _ca(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return cert, key


def _leaf(directory: Path, name: str, ca: tuple[Path, Path], extension: str) -> tuple[Path, Path]:
    cert, key, csr = (directory / f"{name}.pem", directory / f"{name}.key",
                      directory / f"{name}.csr")
    ext = directory / f"{name}.ext"
    ext.write_text(extension)
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]),
             "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext))
    return cert, key


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca, other_ca = _ca(directory, "api-ca"), _ca(directory, "other-ca")
    server = _leaf(directory, "server", ca, "subjectAltName=IP:127.0.0.1\n"
                                            "extendedKeyUsage=serverAuth\n")
    client = _leaf(directory, "client", ca, "extendedKeyUsage=clientAuth\n")
    stranger = _leaf(directory, "stranger", other_ca, "extendedKeyUsage=clientAuth\n")
    return Pki(ca[0], *server, *client, *stranger)


# --- the server and a client -----------------------------------------------------------------


@pytest.fixture
def tokens_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.write_text(f"# automation\n{GOOD}\n\n  tok-second  \n")
    return path


async def _serve(settings: ApiSettings, routes: list[web.RouteDef] | None = None,
                 tuning: HttpTuning = HTTP_TUNING) -> ApiServer:
    server = ApiServer(settings, tuning=tuning)
    server.add_routes(routes or [])
    await server.start()
    return server


@pytest.fixture
async def api(tokens_file: Path) -> AsyncIterator[ApiServer]:
    async def boom(_request: web.Request) -> web.Response:
        raise RuntimeError("secret internals")

    @streams_body
    async def upload(request: web.Request) -> web.Response:
        size = 0
        async for chunk in request.content.iter_chunked(65536):
            size += len(chunk)
        return web.json_response({"bytes": size})

    server = await _serve(
        ApiSettings(listen="127.0.0.1:0", tokens_file=tokens_file, pool="default"),
        [web.get("/api/v1/boom", boom), web.put("/volumes/upload-content", upload)])
    yield server
    await server.stop()


@pytest.fixture
async def tls_api(pki: Pki) -> AsyncIterator[ApiServer]:
    server = await _serve(ApiSettings(
        listen="127.0.0.1:0", tls_cert=pki.server_cert, tls_key=pki.server_key,
        client_ca=pki.ca, pool="default"))
    yield server
    await server.stop()


def _client_context(pki: Pki, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=pki.ca)
    if cert is not None:
        context.load_cert_chain(cert, key)
    return context


async def request(port: int, path: str, *, method: str = "GET", headers: dict[str, str] | None
                  = None, body: bytes | None = None, tls: ssl.SSLContext | None = None) -> Reply:
    def send() -> Reply:
        conn: http.client.HTTPConnection
        if tls is None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        else:
            conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=tls)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()

    return await asyncio.to_thread(send)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def error_of(reply: Reply) -> tuple[int, str]:
    """(status, error) of an error answer, after checking its shape: the predecessor's
    ``{"error", "message", "code"}`` with the status repeated, and a request id."""
    status, headers, body = reply
    assert headers["Content-Type"] == "application/json"
    assert headers.get("X-Request-ID"), headers
    document = json.loads(body)
    assert set(document) == {"error", "message", "code"} and document["message"], document
    assert document["code"] == status, document
    return status, document["error"]


# --- auth ------------------------------------------------------------------------------------


async def test_without_credentials_the_api_is_401_in_the_error_shape(api: ApiServer) -> None:
    reply = await request(api.port, "/api/v1/openapi.json")
    assert error_of(reply) == (401, "unauthorized")
    assert reply[1]["WWW-Authenticate"] == "Bearer"
    # An empty bearer is no credential either.
    assert error_of(await request(api.port, "/api/v1/openapi.json",
                                  headers={"Authorization": "Bearer "})) == (401, "unauthorized")


@pytest.mark.parametrize("headers", [
    pytest.param(bearer("tok-wrong"), id="bearer"),
    pytest.param({"X-API-Token": GOOD[:-1]}, id="x-api-token-prefix"),
    pytest.param({"X-API-Token": GOOD + "x"}, id="x-api-token-longer"),
])
async def test_a_wrong_token_is_401_with_the_bearer_challenge_as_the_predecessor_answers(
    api: ApiServer, headers: dict[str, str],
) -> None:
    reply = await request(api.port, "/api/v1/openapi.json", headers=headers)
    assert error_of(reply) == (401, "unauthorized")
    assert reply[1]["WWW-Authenticate"] == "Bearer"


@pytest.mark.parametrize("headers", [
    pytest.param(bearer(GOOD), id="bearer"),
    pytest.param({"Authorization": f"bearer {GOOD}"}, id="bearer-lowercase"),
    pytest.param({"X-API-Token": GOOD}, id="x-api-token"),
    pytest.param({"X-API-Token": "tok-second"}, id="second-token-trimmed"),
])
async def test_a_good_token_in_either_header_gets_the_openapi_document(
    api: ApiServer, headers: dict[str, str],
) -> None:
    status, reply_headers, body = await request(api.port, "/api/v1/openapi.json", headers=headers)
    assert status == 200 and reply_headers["Content-Type"] == "application/json"
    document = json.loads(body)
    assert document["openapi"].startswith("3.0")
    assert {"/health", "/healthz", "/livez", "/metrics"} <= set(document["paths"])
    assert document["components"]["schemas"]["Error"]["required"] == ["error", "message", "code"]


@pytest.mark.parametrize("path", ["/health", "/healthz", "/livez", "/metrics"])
async def test_health_routes_and_metrics_need_no_credentials(api: ApiServer, path: str) -> None:
    status, _, body = await request(api.port, path)
    assert status == 200
    if path == "/metrics":
        assert b"volume_watcher_" in body
    else:
        health = json.loads(body)
        assert set(health) == {"status", "timestamp", "version", "uptime"}, health
        assert health["status"] == "healthy" and health["version"] == __version__
        assert re.fullmatch(r"([0-9]+h[0-9]+m|[0-9]+m)?[0-9]+s", health["uptime"]), health
        assert datetime.fromisoformat(health["timestamp"]).tzinfo is not None


async def test_a_reload_puts_the_rewritten_tokens_file_in_force(
    api: ApiServer, tokens_file: Path,
) -> None:
    tokens_file.write_text("tok-new\n")
    # Not before the reload: the file is read at start and on SIGHUP only.
    assert (await request(api.port, "/api/v1/openapi.json", headers=bearer(GOOD)))[0] == 200
    assert api.reload_tokens() is True
    assert error_of(await request(api.port, "/api/v1/openapi.json", headers=bearer(GOOD))) == (
        401, "unauthorized")
    assert (await request(api.port, "/api/v1/openapi.json", headers=bearer("tok-new")))[0] == 200


async def test_a_reload_that_cannot_read_the_file_keeps_the_tokens_in_force(
    api: ApiServer, tokens_file: Path,
) -> None:
    tokens_file.unlink()
    assert api.reload_tokens() is False
    assert (await request(api.port, "/api/v1/openapi.json", headers=bearer(GOOD)))[0] == 200


# --- TLS and client certificates -------------------------------------------------------------


async def test_a_client_certificate_signed_by_the_ca_authenticates_without_a_token(
    tls_api: ApiServer, pki: Pki,
) -> None:
    tls = _client_context(pki, pki.client_cert, pki.client_key)
    status, _, body = await request(tls_api.port, "/api/v1/openapi.json", tls=tls)
    assert status == 200 and json.loads(body)["openapi"].startswith("3.0")


async def test_over_tls_without_a_certificate_or_token_the_api_is_401(
    tls_api: ApiServer, pki: Pki,
) -> None:
    reply = await request(tls_api.port, "/api/v1/openapi.json", tls=_client_context(pki))
    assert error_of(reply) == (401, "unauthorized")
    # The server's certificate verified against the CA: the health route over HTTPS.
    assert (await request(tls_api.port, "/healthz", tls=_client_context(pki)))[0] == 200


async def test_a_certificate_from_another_ca_fails_the_handshake(
    tls_api: ApiServer, pki: Pki,
) -> None:
    tls = _client_context(pki, pki.stranger_cert, pki.stranger_key)
    # TLS 1.3: the client's handshake ends before the server checks its certificate, so the
    # refusal (an alert) arrives on the first read; either way no HTTP answer comes back.
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await request(tls_api.port, "/api/v1/openapi.json", tls=tls)
    # The listener goes on serving the good ones.
    tls = _client_context(pki, pki.client_cert, pki.client_key)
    assert (await request(tls_api.port, "/api/v1/openapi.json", tls=tls))[0] == 200


async def test_the_tls_listener_does_not_speak_plain_http(tls_api: ApiServer) -> None:
    with pytest.raises((http.client.HTTPException, ConnectionError)):
        await request(tls_api.port, "/healthz")


# --- shape of every answer -------------------------------------------------------------------


async def test_the_clients_sane_request_id_is_echoed_and_any_other_replaced(
    api: ApiServer,
) -> None:
    _, headers, _ = await request(api.port, "/healthz", headers={"X-Request-ID": "job-42.a:b"})
    assert headers["X-Request-ID"] == "job-42.a:b"
    for given in ({}, {"X-Request-ID": "has spaces/and slashes"}, {"X-Request-ID": "x" * 129}):
        _, headers, _ = await request(api.port, "/healthz", headers=given)
        assert uuid.UUID(headers["X-Request-ID"]).version == 4
    # Errors carry one too.
    _, headers, _ = await request(api.port, "/api/v1/openapi.json")
    assert uuid.UUID(headers["X-Request-ID"]).version == 4


async def test_unknown_routes_are_404_in_the_error_shape(api: ApiServer) -> None:
    assert error_of(await request(api.port, "/nothing")) == (404, "not found")
    assert error_of(await request(api.port, "/api/v1/nothing", headers=bearer(GOOD))) == (
        404, "not found")
    # Under /api/ credentials come first: an unknown route tells nothing to a stranger.
    assert error_of(await request(api.port, "/api/v1/nothing")) == (401, "unauthorized")


async def test_a_wrong_method_is_405_in_the_error_shape_with_allow(api: ApiServer) -> None:
    reply = await request(api.port, "/api/v1/openapi.json", method="DELETE",
                          headers=bearer(GOOD))
    assert error_of(reply) == (405, "method not allowed")
    assert "GET" in reply[1]["Allow"]


async def test_an_unexpected_exception_is_a_500_without_the_traceback(api: ApiServer) -> None:
    status, headers, body = await request(api.port, "/api/v1/boom", headers=bearer(GOOD))
    assert error_of((status, headers, body)) == (500, "internal error")
    assert b"secret internals" not in body and b"Traceback" not in body
    assert headers["X-Request-ID"].encode() in body  # the log line to look for


async def test_a_body_over_one_mib_is_413_and_a_streaming_route_takes_it(
    api: ApiServer,
) -> None:
    big = b"x" * (2 * 1024**2)
    reply = await request(api.port, "/api/v1/jobs", method="POST", body=big,
                          headers={**bearer(GOOD), "Content-Type": "application/json"})
    assert error_of(reply) == (413, "request entity too large")
    status, _, body = await request(api.port, "/volumes/upload-content", method="PUT", body=big,
                                    headers=bearer(GOOD))
    assert (status, json.loads(body)) == (200, {"bytes": len(big)})


# --- connection limits -----------------------------------------------------------------------


async def test_a_full_listener_admits_a_newcomer_by_closing_its_oldest_idle_connection(
    tokens_file: Path,
) -> None:
    server = await _serve(ApiSettings(listen="127.0.0.1:0", tokens_file=tokens_file, pool="p"),
                          tuning=replace(HTTP_TUNING, max_connections=4))
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        for _ in range(4):
            idle.append(await asyncio.open_connection("127.0.0.1", server.port))
            await asyncio.sleep(0.05)  # accepted in this order
        started = time.monotonic()
        assert (await request(server.port, "/healthz"))[0] == 200
        # The oldest was closed to let the probe in, well before its 2 s head deadline.
        assert await asyncio.wait_for(idle[0][0].read(), timeout=1.5) == b""
        assert time.monotonic() - started < 1.5
    finally:
        for _, writer in idle:
            writer.close()
        await server.stop()


# --- configuration and the daemon ------------------------------------------------------------


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(("text", "expected"), [
    pytest.param('api:\n  listen: "127.0.0.1:8080"\n',
                 [(2, "api.pool: required"), (2, "tokens_file or client_ca is required")],
                 id="listen-alone"),
    pytest.param('api:\n  listen: "8080"\n  pool: p\n  tokens_file: tokens\n',
                 [(2, "api.listen: expected host:port")], id="bad-listen"),
    pytest.param('api:\n  listen: ":8080"\n  pool: p\n  tokens_file: absent\n',
                 [(4, "api.tokens_file: no such file")], id="missing-tokens-file"),
    pytest.param('api:\n  listen: ":8080"\n  pool: p\n  tokens_file: tokens\n'
                 '  tls_cert: tokens\n',
                 [(5, "api.tls_cert: needs api.tls_key")], id="cert-without-key"),
    pytest.param('api:\n  listen: ":8080"\n  pool: p\n  client_ca: tokens\n',
                 [(4, "api.client_ca: needs api.tls_cert")], id="client-ca-without-tls"),
    pytest.param('api:\n  listen: ":8080"\n  pool: a/b\n  tokens_file: tokens\n',
                 [(3, "api.pool: expected a libvirt pool name")], id="pool-with-slash"),
    pytest.param('api:\n  colour: blue\nstate:\n  dir: 5\n',
                 [(2, "colour"), (4, "state.dir: expected a string")], id="unknown-and-bad"),
])
def test_check_reports_bad_api_settings_at_their_line(
    tmp_path: Path, text: str, expected: list[tuple[int, str]],
) -> None:
    (tmp_path / "tokens").write_text(f"{GOOD}\n")
    (tmp_path / "policies").mkdir()
    path = _config(tmp_path, text + "policies: {dir: policies}\n")
    problems = [p for p in check_all(path, {}) if p.file == str(path)]
    assert [(p.line, any(want in p.message for _, want in expected)) for p in problems] == [
        (line, True) for line, _ in expected], [str(p) for p in problems]


def test_a_complete_api_section_loads(tmp_path: Path, pki: Pki) -> None:
    (tmp_path / "tokens").write_text(f"{GOOD}\n")
    (tmp_path / "policies").mkdir()
    path = _config(tmp_path, f'api: {{listen: "127.0.0.1:8080", tokens_file: tokens, '
                             f'tls_cert: {pki.server_cert}, tls_key: {pki.server_key}, '
                             f'client_ca: {pki.ca}, pool: default}}\n'
                             f'state: {{dir: state}}\npolicies: {{dir: policies}}\n')
    assert check_all(path, {}) == []


def _listening_ports(pid: int) -> set[int]:
    """TCP ports process ``pid`` listens on, from /proc."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink().name
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            fields = row.split()
            if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


@pytest.fixture
def daemon_env(env: Env, tmp_path: Path) -> Iterator[tuple[Env, int, int, Path]]:
    tokens = tmp_path / "api-tokens"
    tokens.write_text("tok-first\n")
    probe_port, api_port = free_port(), free_port()
    env.write_config(http={"listen": f"127.0.0.1:{probe_port}"},
                     api={"listen": f"127.0.0.1:{api_port}", "tokens_file": str(tokens),
                          "pool": "default"},
                     state={"dir": str(tmp_path / "state")})  # never the host's own
    env.write_policy({})
    yield env, probe_port, api_port, tokens


def _status(port: int, path: str, token: str | None = None) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path, headers=bearer(token) if token else {})
        return conn.getresponse().status
    except OSError:
        return 0  # not listening (yet)
    finally:
        conn.close()


def test_the_daemon_serves_the_api_and_rereads_its_tokens_on_sighup(
    daemon_env: tuple[Env, int, int, Path],
) -> None:
    env, probe_port, api_port, tokens = daemon_env
    proc = subprocess.Popen([*CLI, "run", "--config", str(env.config_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        asyncio.run(wait_for(lambda: _status(api_port, "/livez") == 200, timeout=60,
                             what="the API listener"))
        assert _listening_ports(proc.pid) == {probe_port, api_port}
        assert _status(api_port, "/api/v1/openapi.json", "tok-first") == 200
        tokens.write_text("tok-second\n")
        proc.send_signal(signal.SIGHUP)
        asyncio.run(wait_for(
            lambda: _status(api_port, "/api/v1/openapi.json", "tok-second") == 200,
            what="the new token in force"))
        assert _status(api_port, "/api/v1/openapi.json", "tok-first") == 401
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_without_api_listen_the_daemon_listens_on_the_probe_port_only(
    daemon_env: tuple[Env, int, int, Path],
) -> None:
    env, probe_port, _, _ = daemon_env
    env.write_config(http={"listen": f"127.0.0.1:{probe_port}"}, api={"listen": ""})
    proc = subprocess.Popen([*CLI, "run", "--config", str(env.config_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        asyncio.run(wait_for(lambda: _status(probe_port, "/healthz") == 200, timeout=60,
                             what="the probe listener"))
        assert _listening_ports(proc.pid) == {probe_port}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
