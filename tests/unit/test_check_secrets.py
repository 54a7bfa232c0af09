"""``check`` and secrets: inline ones in a file others can read warn, URLs never carry them.

A warning is shown but does not fail the check (the daemon runs fine with it); an S3
endpoint with credentials in it is an error at its line, and neither shows the secret.
"""

from __future__ import annotations

from pathlib import Path
from textwrap import dedent

import pytest

from watcher.config import check_config

ACCESS = "AKIA-access-0123"
SECRET = "s3cr3t-value-9876"


def config_at(tmp_path: Path, text: str, mode: int) -> Path:
    (tmp_path / "policies").mkdir()
    path = tmp_path / "config.yaml"
    path.write_text("policies: {dir: policies}\n" + dedent(text))
    path.chmod(mode)
    return path


INLINE = f"""\
s3:
  access_key: {ACCESS}
  secret_key: {SECRET}
amqp:
  url: amqp://watcher:pw-1234@mq.example:5672/
"""


@pytest.mark.parametrize(("text", "mode", "expected"), [
    pytest.param(INLINE, 0o644, [
        (3, "s3.access_key", "group and others (mode 0644)"),
        (4, "s3.secret_key", "group and others (mode 0644)"),
        (6, "amqp.url", "group and others (mode 0644)"),
    ], id="world-readable"),
    pytest.param(INLINE, 0o640, [
        (3, "s3.access_key", "group (mode 0640)"),
        (4, "s3.secret_key", "group (mode 0640)"),
        (6, "amqp.url", "group (mode 0640)"),
    ], id="group-readable"),
    pytest.param(INLINE, 0o600, [], id="owner-only"),
    pytest.param("amqp: {url: 'amqp://watcher@mq.example/'}\n", 0o644, [],
                 id="amqp-url-without-password"),
    pytest.param("s3: {access_key: '', secret_key: ''}\n", 0o644, [], id="empty-keys"),
    pytest.param("s3: {secret_key_file: secret}\n", 0o644, [], id="secret-in-its-own-file"),
])
def test_inline_secrets_in_a_file_others_can_read_are_warnings_only(
        tmp_path: Path, text: str, mode: int, expected: list[tuple[int, str, str]]) -> None:
    (tmp_path / "secret").write_text(SECRET)
    path = config_at(tmp_path, text, mode)
    report = check_config(path, {})
    assert report.problems == []
    found = [(w.line, w.message.split(" ", 2)[1], w.message) for w in report.warnings]
    assert [(line, label) for line, label, _ in found] == [(at, key) for at, key, _ in expected]
    for (_, _, message), (_, _, readers) in zip(found, expected, strict=True):
        assert message.startswith("warning: ") and f"readable by {readers}" in message
        assert SECRET not in message and "pw-1234" not in message and ACCESS not in message


def test_an_inline_secret_overridden_by_the_environment_still_warns(tmp_path: Path) -> None:
    path = config_at(tmp_path, f"s3: {{secret_key: {SECRET}}}\n", 0o604)
    report = check_config(path, {"LVW_S3_SECRET_KEY": "from-env"})
    assert [(w.file, w.line) for w in report.warnings] == [(str(path), 2)]


@pytest.mark.parametrize("endpoint", [
    "https://AKIA:s3cr3t-value-9876@s3.example:9000",
    "http://AKIA@s3.example",
    "http://:s3cr3t-value-9876@s3.example",
])
def test_credentials_inside_the_s3_endpoint_are_an_error_at_its_line(
        tmp_path: Path, endpoint: str) -> None:
    path = config_at(tmp_path, f"s3:\n  region: us-east-1\n  endpoint: '{endpoint}'\n", 0o600)
    report = check_config(path, {})
    assert [(p.file, p.line) for p in report.problems] == [(str(path), 4)]
    message = report.problems[0].message
    assert message.startswith("s3.endpoint: credentials do not belong in the URL")
    assert SECRET not in message and "AKIA" not in message


def test_a_plain_s3_endpoint_with_a_port_is_fine(tmp_path: Path) -> None:
    path = config_at(tmp_path, "s3: {endpoint: 'https://s3.example:9000/'}\n", 0o644)
    report = check_config(path, {})
    assert (report.problems, report.warnings) == ([], [])
