"""The daemon as operators run it: a process, signals, the CLI, its HTTP endpoints."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.integration.harness import Env
from testsupport.polling import wait_for
from testsupport.services import free_port, make_qcow2, minio_event, publish

pytestmark = pytest.mark.integration
CLI = [sys.executable, "-m", "watcher"]


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()
    except urllib.error.URLError:
        return 0, ""  # not listening (yet)


class Process:
    def __init__(self, env: Env, port: int) -> None:
        self.port = port
        self.log = env.root / "watcher.log"
        with open(self.log, "wb") as out:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [*CLI, "run", "--config", str(env.config_path), "--log-format", "json"],
                stdout=out, stderr=subprocess.STDOUT)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def lines(self) -> list[dict[str, object]]:
        out = []
        for raw in self.log.read_text().splitlines():
            try:
                out.append(json.loads(raw))
            except ValueError:
                continue
        return out


@pytest.fixture
def port() -> int:
    return free_port()


def test_check_reports_every_policy_problem_with_file_and_line(env: Env) -> None:
    env.write_config()
    (env.policies_dir / "10-bad.yaml").write_text(
        "images:\n"
        "  base:\n"
        "    bucket: b\n"
        "    key: k\n"
        "    prefix: p/\n"
        "    format: qcow3\n"
        "domains:\n"
        "  - match: 'web-*'\n"
        "    image: nope\n"
        "    colour: blue\n")
    result = subprocess.run([*CLI, "check", "--config", str(env.config_path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stdout == ""  # errors go to stderr, all of them
    lines = result.stderr.splitlines()
    path = str(env.policies_dir / "10-bad.yaml")
    assert any(line.startswith(f"{path}:6:") and "qcow3" in line for line in lines), lines
    assert any(line.startswith(f"{path}:10:") and "colour" in line for line in lines), lines
    assert any(line.startswith(f"{path}:9:") and "nope" in line for line in lines), lines
    assert any("key" in line and "prefix" in line for line in lines), lines


def test_a_failed_reload_keeps_the_previous_policies_and_sigterm_exits_cleanly(
        env: Env, tmp_path: Path, port: int) -> None:
    key = "images/base.qcow2"
    env.write_config(http={"listen": f"127.0.0.1:{port}"})
    env.write_policy({"base": {"bucket": env.bucket, "key": key, "format": "qcow2"}},
                     [{"match": "*", "image": "base"}])
    daemon = Process(env, port)
    try:
        asyncio.run(wait_for(lambda: get(daemon.url("/readyz"))[0] == 200, timeout=60,
                             what="readiness"))
        # Break the policies, reload: the old ones stay in force.
        (env.policies_dir / "10-test.yaml").write_text("images: [oops\n")
        daemon.proc.send_signal(signal.SIGHUP)
        asyncio.run(wait_for(
            lambda: 'volume_watcher_policy_reloads_total{result="failed"} 1.0'
            in get(daemon.url("/metrics"))[1], what="failed reload counted"))
        assert daemon.proc.poll() is None
        status, body = get(daemon.url("/readyz"))
        assert status == 200, body

        digest = env.upload_with_sidecar(key, make_qcow2(tmp_path / "v1.qcow2"))
        asyncio.run(publish(env.exchange, minio_event(env.bucket, key)))
        # The record lands on disk a moment before the store's counts are updated.
        entries = "volume_watcher_cache_entries 1.0"
        asyncio.run(wait_for(lambda: (env.cache_dir / "objects" / f"{digest}.json").exists()
                             and entries in get(daemon.url("/metrics"))[1],
                             what="image warmed under the previous policies"))
        metrics = get(daemon.url("/metrics"))[1]
        for line in ('volume_watcher_events_received_total{source="amqp",'
                     'type="s3:ObjectCreated:Put"} 1.0',
                     'volume_watcher_downloads_total{result="ok"} 1.0',
                     "volume_watcher_cache_entries 1.0",
                     'volume_watcher_connection_up{service="libvirt"} 1.0'):
            assert line in metrics, line
    finally:
        daemon.proc.send_signal(signal.SIGTERM)
        code = daemon.proc.wait(60)
    assert code == 0
    events = [line.get("event") for line in daemon.lines()]
    assert "policy error" in events and "stopped" in events
