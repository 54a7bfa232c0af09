"""The shipped alert rules and dashboard: valid for Prometheus, and about metrics that exist.

A renamed or misspelt metric would leave an alert silent forever, so every name the rules
and the dashboard use is looked up in what a running daemon serves on ``/metrics``.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.harness import Env
from testsupport.daemon import running_daemon
from testsupport.metrics import metric_async, metric_grows
from testsupport.services import make_qcow2, minio_event, publish
from watcher import __version__
from watcher.core.errors import REJECTION_REASONS

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "contrib" / "prometheus" / "alerts.yaml"
ALERT_TESTS = ROOT / "contrib" / "prometheus" / "alerts.test.yaml"
DASHBOARD = ROOT / "contrib" / "grafana" / "libvirt-volume-watcher.json"
METRIC_NAME = re.compile(r"\b(?:volume_watcher|process)_[a-z_]+\b")

needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool is not installed (Debian package prometheus; scripts/setup.sh installs it)")


def _alert_expressions() -> list[str]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


def _dashboard_expressions() -> list[str]:
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("expr", "definition") and isinstance(value, str):
                    found.append(value)
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(json.loads(DASHBOARD.read_text()))
    return found


def _names_in(expressions: list[str]) -> set[str]:
    return {name for expr in expressions for name in METRIC_NAME.findall(expr)}


def _exposed(text: str) -> set[str]:
    """Sample names, plus the names declared by ``# TYPE`` (a labelled metric with no
    series yet, such as a domain's write progress before the first write, has only those)."""
    samples = {sample.name for family in text_string_to_metric_families(text)
               for sample in family.samples}
    declared = set(re.findall(r"^# TYPE (\S+) ", text, re.MULTILINE))
    return samples | declared


@needs_promtool
def test_promtool_accepts_the_alert_rules() -> None:
    result = subprocess.run(["promtool", "check", "rules", str(ALERTS)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(_alert_expressions())} rules found" in result.stdout


@needs_promtool
def test_the_alert_rules_fire_when_and_only_when_their_tests_say() -> None:
    result = subprocess.run(["promtool", "test", "rules", str(ALERT_TESTS)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_readme_alert_is_a_rule() -> None:
    expressions = " ".join(_alert_expressions())
    for metric in ("volume_watcher_connection_up", "volume_watcher_reprovisions_total",
                   "volume_watcher_last_amqp_message_timestamp_seconds",
                   "volume_watcher_images_rejected_total", "volume_watcher_policy_reloads_total",
                   "volume_watcher_unexpected_errors_total"):
        assert metric in expressions, metric
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    for rule in (rule for group in groups for rule in group["rules"]):
        assert "for" in rule and {"summary", "description"} <= set(rule["annotations"]), rule


async def test_every_metric_the_alerts_and_the_dashboard_use_is_served(
        env: Env, tmp_path: Path) -> None:
    key = "images/base.qcow2"
    env.write_config()
    env.write_policy({"base": {"bucket": env.bucket, "key": key, "format": "qcow2"}})
    used = _names_in(_alert_expressions()) | _names_in(_dashboard_expressions())
    # The lookup is not vacuous: both files name the new metrics.
    assert {"volume_watcher_domains", "volume_watcher_download_duration_seconds_bucket",
            "volume_watcher_build_info", "volume_watcher_process_resident_memory_bytes"} <= used

    async with running_daemon(env.config_path) as daemon:
        assert daemon.daemon.http is not None
        url = f"http://127.0.0.1:{daemon.daemon.http.port}/metrics"

        def scrape() -> str:
            with urllib.request.urlopen(url, timeout=5) as response:
                return str(response.read().decode())

        # The connection gauge appears with the watchdog's first round.
        await metric_grows(daemon, "volume_watcher_connection_up", 0, 1, service="amqp")
        text = await asyncio.to_thread(scrape)

        downloads = await metric_async(daemon, "volume_watcher_download_duration_seconds_count")
        env.upload_with_sidecar(key, make_qcow2(tmp_path / "v1.qcow2"))
        await publish(env.exchange, minio_event(env.bucket, key))
        await metric_grows(daemon, "volume_watcher_download_duration_seconds_count",
                           downloads, 1)

    missing = sorted(used - _exposed(text))
    assert missing == [], f"used by the alerts or the dashboard but not served: {missing}"
    assert f'volume_watcher_build_info{{version="{__version__}"}} 1.0' in text
    for state in ("reprovision", "provisioning", "provisioned", "failed", "none", "malformed",
                  "unmatched"):
        assert f'volume_watcher_domains{{state="{state}"}} ' in text, state
    # The counters the increase() alerts watch have their series before the first event
    # (the daemon runs in this process: other tests may have counted some already).
    for reason in REJECTION_REASONS:
        assert f'volume_watcher_images_rejected_total{{reason="{reason}"}} ' in text, reason
    assert "\nvolume_watcher_written_bytes_total " in text
    # Every series carries the daemon's prefix, the process metrics too.
    unprefixed = sorted(name for name in _exposed(text) if not name.startswith("volume_watcher_"))
    assert unprefixed == [], unprefixed
    assert "volume_watcher_process_open_fds" in _exposed(text)
