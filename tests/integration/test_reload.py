"""``systemctl reload`` as the unit runs it: check first, then SIGHUP to the daemon.

The unit's ExecReload= lines are run here in order, the way systemd runs them (stopping at
the first that fails), against a daemon process, with this checkout's console script in
place of the installed one.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.harness import Env
from testsupport.daemon import DaemonProcess
from testsupport.metrics import scrape
from testsupport.services import free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "libvirt-volume-watcher.service"
INSTALLED_BINARY = "/opt/libvirt-volume-watcher/venv/bin/libvirt-volume-watcher"
INSTALLED_CONFIG = "/etc/libvirt-volume-watcher/config.yaml"
RELOADS = "volume_watcher_policy_reloads_total"
CONFIG_CHANGED = ("the config file changed since start; SIGHUP applies only its log level "
                  "(and reloads the policies): restart the service to apply the rest")
LEVEL_CHANGED = "log level changed"


def reload_commands(config: Path, pid: int) -> list[list[str]]:
    console_script = str(Path(sys.executable).parent / "libvirt-volume-watcher")
    commands = []
    for line in UNIT.read_text().splitlines():
        if line.startswith("ExecReload="):
            command = line.partition("=")[2].replace(INSTALLED_BINARY, console_script)
            command = command.replace(INSTALLED_CONFIG, str(config))
            commands.append(shlex.split(command.replace("$MAINPID", str(pid))))
    return commands


def systemctl_reload(config: Path, pid: int) -> tuple[int, list[str], str]:
    """Exit code, the programs that ran, and their output: systemd's order and stop rule."""
    ran, output = [], ""
    for command in reload_commands(config, pid):
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
        ran.append(Path(command[0]).name)
        output += result.stdout + result.stderr
        if result.returncode != 0:
            return result.returncode, ran, output
    return 0, ran, output


def events(daemon: DaemonProcess, event: str) -> list[dict[str, object]]:
    return [record for _, record in list(daemon.records) if record.get("event") == event]


def test_reload_fails_on_a_broken_policy_and_applies_a_good_one(env: Env) -> None:
    port = free_port()
    env.write_config(http={"listen": f"127.0.0.1:{port}"})
    env.write_policy({"base": {"bucket": env.bucket, "key": "images/base.qcow2",
                               "format": "qcow2"}})
    daemon = DaemonProcess(env.config_path).start()
    try:
        daemon.wait(lambda: daemon.find("ready"), 60, "readiness")
        loaded = scrape(port, RELOADS, result="ok")

        broken = env.policies_dir / "20-broken.yaml"
        broken.write_text("images: [oops\n")
        code, ran, output = systemctl_reload(env.config_path, daemon.pid)
        assert (code, ran) == (1, ["libvirt-volume-watcher"]), output  # no SIGHUP sent
        assert f"{broken}:" in output

        broken.unlink()
        code, ran, output = systemctl_reload(env.config_path, daemon.pid)
        assert (code, ran) == (0, ["libvirt-volume-watcher", "kill"]), output
        daemon.wait(lambda: scrape(port, RELOADS, result="ok") >= loaded + 1, 30,
                    "the policies reloaded")
        assert scrape(port, RELOADS, result="failed") == 0
        # The log is read in order and the warning comes before the load it belongs to:
        # once the second "policies loaded" line is in, a warning would be too.
        daemon.wait(lambda: len(events(daemon, "policies loaded")) == 2, 30, "the reload line")
        assert events(daemon, CONFIG_CHANGED) == []

        # A comment changes no setting: nothing to warn about.
        with env.config_path.open("a") as config:
            config.write("# edited after the start\n")
        code, ran, output = systemctl_reload(env.config_path, daemon.pid)
        assert code == 0, output
        daemon.wait(lambda: len(events(daemon, "policies loaded")) == 3, 30, "the reload line")
        assert events(daemon, CONFIG_CHANGED) == []

        # Another setting: the daemon keeps running with the old one and says so.
        env.write_config(http={"listen": f"127.0.0.1:{port}"}, reconcile_interval=77)
        code, ran, output = systemctl_reload(env.config_path, daemon.pid)
        assert code == 0, output
        daemon.wait(lambda: daemon.find(CONFIG_CHANGED), 30, "the restart warning")
        _, record = daemon.find(CONFIG_CHANGED) or (0, {})
        assert record["level"] == "warning" and record["path"] == str(env.config_path)
        assert events(daemon, LEVEL_CHANGED) == []
    finally:
        assert daemon.stop() == 0


def loads_once_up(port: int) -> float:
    """Successful policy loads; -1 while the daemon's metrics listener is not up yet."""
    try:
        return scrape(port, RELOADS, result="ok")
    except OSError:
        return -1


def test_reload_applies_a_changed_log_level_and_nothing_else_of_the_config(env: Env) -> None:
    port = free_port()
    env.write_config(http={"listen": f"127.0.0.1:{port}"}, log={"level": "warning"})
    env.write_policy({"base": {"bucket": env.bucket, "key": "images/base.qcow2",
                               "format": "qcow2"}})
    daemon = DaemonProcess(env.config_path).start()  # no --log-level: the config's applies
    try:
        daemon.wait(lambda: loads_once_up(port) >= 1, 60, "the first load")
        assert events(daemon, "policies loaded") == []  # an info line, below warning

        env.write_config(http={"listen": f"127.0.0.1:{port}"}, log={"level": "debug"})
        code, ran, output = systemctl_reload(env.config_path, daemon.pid)
        assert (code, ran) == (0, ["libvirt-volume-watcher", "kill"]), output
        daemon.wait(lambda: daemon.find(LEVEL_CHANGED), 30, "the level change")
        _, record = daemon.find(LEVEL_CHANGED) or (0, {})
        assert (record["level"], record["new_level"]) == ("warning", "debug")
        assert record["path"] == str(env.config_path)
        daemon.wait(lambda: events(daemon, "policies loaded"), 30, "info lines again")
        assert events(daemon, CONFIG_CHANGED) == []

        # The file as it was at start: its level applies again.
        env.write_config(http={"listen": f"127.0.0.1:{port}"}, log={"level": "warning"})
        code, ran, output = systemctl_reload(env.config_path, daemon.pid)
        assert code == 0, output
        daemon.wait(lambda: len(events(daemon, LEVEL_CHANGED)) == 2, 30, "the level back")
        assert events(daemon, LEVEL_CHANGED)[-1]["new_level"] == "warning"

        # A level the config does not allow: check refuses it, no signal is sent.
        env.write_config(http={"listen": f"127.0.0.1:{port}"}, log={"level": "loud"})
        code, ran, output = systemctl_reload(env.config_path, daemon.pid)
        assert (code, ran) == (1, ["libvirt-volume-watcher"]), output
        assert "log.level: expected one of debug, info, warning, error, critical" in output
    finally:
        assert daemon.stop() == 0
