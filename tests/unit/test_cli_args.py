"""The command line's common options: --version, and -c/--config on either side."""

from __future__ import annotations

from pathlib import Path

import pytest

from watcher import __version__, cli


def test_version_is_printed_on_stdout_with_exit_0(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        cli.main(["--version"])
    assert stopped.value.code == 0
    assert capsys.readouterr().out.strip() == f"libvirt-volume-watcher {__version__}"


@pytest.mark.parametrize("argv", [
    ["-c", "{path}", "check"], ["--config", "{path}", "check"],
    ["check", "-c", "{path}"], ["check", "--config", "{path}"],
])
def test_config_is_taken_before_or_after_the_subcommand(
        argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nowhere.yaml"
    assert cli.main([a.format(path=missing) for a in argv]) == 1
    assert f"{missing}:0: config file not found" in capsys.readouterr().out


def test_an_unknown_subcommand_is_a_usage_error_with_exit_2(
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        cli.main(["bogus"])
    assert stopped.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize("image", ["../../x", "ubuntu/24.04", ""])
def test_reprovision_refuses_an_image_that_is_not_an_identifier_before_touching_libvirt(
        image: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["reprovision", "web-1", "--image", image]) == 1
    captured = capsys.readouterr()
    assert "is not an image name" in captured.err and captured.out == ""
