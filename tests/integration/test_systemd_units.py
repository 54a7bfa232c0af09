"""The shipped unit, tmpfiles rules and default config, checked by systemd's own tools."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from watcher.config import load_config
from watcher.settings import Config

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "libvirt-volume-watcher.service"
TMPFILES = ROOT / "systemd" / "libvirt-volume-watcher.tmpfiles"
CONFIG = ROOT / "systemd" / "config.yaml"
INSTALLED_BINARY = "/opt/libvirt-volume-watcher/venv/bin/libvirt-volume-watcher"

needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")


def _unit_settings() -> list[tuple[str, str]]:
    pairs = []
    for line in UNIT.read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            pairs.append((key, value))
    return pairs


@pytest.fixture
def testable_unit(tmp_path: Path) -> Path:
    """A copy of the unit whose ExecStart is this checkout's console script (verify wants it)."""
    console_script = Path(sys.executable).parent / "libvirt-volume-watcher"
    assert console_script.exists(), "the project is not installed in this virtualenv"
    text = UNIT.read_text()
    assert INSTALLED_BINARY in text
    copy = tmp_path / UNIT.name
    copy.write_text(text.replace(INSTALLED_BINARY, str(console_script)))
    return copy


@needs_systemd_analyze
def test_systemd_analyze_verify_accepts_the_unit_without_warnings(testable_unit: Path) -> None:
    result = subprocess.run(["systemd-analyze", "verify", str(testable_unit)],
                            capture_output=True, text=True, timeout=60)
    ours = [line for line in result.stderr.splitlines() if "libvirt-volume-watcher" in line]
    assert result.returncode == 0, result.stderr
    assert ours == []


@needs_systemd_analyze
def test_the_sandbox_keeps_the_exposure_score_low(testable_unit: Path) -> None:
    # 0 is fully locked down, 100 unprotected; a root daemon writing block devices
    # cannot reach the bottom, but regressions in the hardening must show.
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--threshold=40", "--no-pager",
         str(testable_unit)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr


def test_the_unit_runs_the_daemon_as_the_contract_says() -> None:
    settings = dict(_unit_settings())
    assert settings["Type"] == "notify"
    assert settings["ExecStart"] == (
        f"{INSTALLED_BINARY} run --config /etc/libvirt-volume-watcher/config.yaml")
    reload = [value for key, value in _unit_settings() if key == "ExecReload"]
    assert reload == [  # check first: a broken policy fails the reload before any SIGHUP
        f"{INSTALLED_BINARY} check --config /etc/libvirt-volume-watcher/config.yaml",
        "/bin/kill -HUP $MAINPID",
    ]
    assert int(settings["TimeoutStopSec"]) > int(settings["WatchdogSec"]) / 2


def test_every_loaded_credential_has_a_fallback_so_a_missing_file_is_not_fatal() -> None:
    pairs = _unit_settings()
    loaded = {v.split(":", 1)[0] for k, v in pairs if k == "LoadCredential"}
    defaults = {v.split(":", 1)[0] for k, v in pairs if k == "SetCredential"}
    assert loaded == {"s3-access-key", "s3-secret-key", "amqp-url"}
    assert defaults == loaded


@pytest.mark.skipif(shutil.which("systemd-tmpfiles") is None, reason="no systemd-tmpfiles")
@pytest.mark.skipif(os.geteuid() != 0, reason="tmpfiles rules set root ownership")
def test_tmpfiles_creates_the_cache_policies_and_credentials_directories(tmp_path: Path) -> None:
    subprocess.run(["systemd-tmpfiles", "--create", f"--root={tmp_path}", str(TMPFILES)],
                   check=True, capture_output=True, timeout=60)
    modes = {path: (tmp_path / path.lstrip("/")).stat().st_mode & 0o7777 for path in (
        "/var/lib/libvirt-volume-watcher/cache",
        "/etc/libvirt-volume-watcher/policies",
        "/etc/libvirt-volume-watcher/credentials",
    )}
    assert modes == {
        "/var/lib/libvirt-volume-watcher/cache": 0o750,
        "/etc/libvirt-volume-watcher/policies": 0o755,
        "/etc/libvirt-volume-watcher/credentials": 0o700,
    }


SECRETS = {("s3", "access_key"), ("s3", "secret_key"), ("amqp", "url")}
COMMENTED = {*SECRETS, ("log", "level")}
"""Documented but commented out: secrets, so credentials apply; the log level, so
``run --log-level`` decides until an operator sets one."""


def _fields(cls: Any) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def test_the_default_config_has_every_setting_except_the_secrets() -> None:
    data = yaml.safe_load(CONFIG.read_text())
    assert set(data) == _fields(Config) - {"source"}
    for section in data:
        default = getattr(Config(), section)
        if dataclasses.is_dataclass(default):
            expected = _fields(default) - {key for sec, key in COMMENTED if sec == section}
            assert set(data[section]) == expected, section
    text = CONFIG.read_text()
    for _, key in COMMENTED:
        assert re.search(rf"^\s*# {key}: ", text, re.MULTILINE), key


def test_the_default_config_loads_with_the_built_in_defaults() -> None:
    config = load_config(CONFIG, environ={})
    assert dataclasses.replace(config, source=None) == Config()


def test_the_default_config_takes_its_secrets_from_systemd_credentials(tmp_path: Path) -> None:
    (tmp_path / "s3-access-key").write_text("watcher\n")
    (tmp_path / "s3-secret-key").write_text("watcher-secret\n")
    (tmp_path / "amqp-url").write_text("amqp://lvw:pw@rabbit.example:5672/\n")
    config = load_config(CONFIG, environ={"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert (config.s3.access_key, config.s3.secret_key) == ("watcher", "watcher-secret")
    assert config.amqp.url == "amqp://lvw:pw@rabbit.example:5672/"


def test_a_credential_holding_only_the_units_fallback_newline_counts_as_unset(
    tmp_path: Path,
) -> None:
    for name in ("s3-access-key", "s3-secret-key", "amqp-url"):
        (tmp_path / name).write_text("\n")  # what SetCredential=NAME:\n delivers
    config = load_config(CONFIG, environ={"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert config.amqp.url == Config().amqp.url
    assert config.s3.access_key == ""


def test_the_cache_directory_is_writable_under_the_unit_sandbox() -> None:
    cache_dir = yaml.safe_load(CONFIG.read_text())["cache"]["dir"]
    writable = [p.lstrip("-") for k, v in _unit_settings() if k == "ReadWritePaths"
                for p in v.split()]
    state = [f"/var/lib/{d}" for k, v in _unit_settings() if k == "StateDirectory"
             for d in v.split()]
    assert any(cache_dir == p or cache_dir.startswith(p.rstrip("/") + "/")
               for p in writable + state)
    assert re.fullmatch(r"/var/lib/libvirt-volume-watcher/.+", cache_dir)
