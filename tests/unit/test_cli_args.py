"""The command line's common options: --version, -c/--config anywhere, usage errors exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from watcher import __version__, cli


@pytest.mark.parametrize("argv", [
    ["--version"], ["run", "--version"], ["check", "--version"], ["status", "--version"],
    ["reprovision", "--version"], ["cache", "--version"], ["cache", "list", "--version"],
    ["fleet", "status", "--version"], ["explain", "--version"],
])
def test_version_is_printed_on_stdout_with_exit_0_by_every_command(
        argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        cli.main(argv)
    assert stopped.value.code == 0
    assert capsys.readouterr().out.strip() == f"libvirt-volume-watcher {__version__}"


@pytest.mark.parametrize("argv", [
    ["-c", "{path}", "check"], ["--config", "{path}", "check"],
    ["check", "-c", "{path}"], ["check", "--config", "{path}"],
    ["cache", "-c", "{path}", "list"], ["cache", "list", "-c", "{path}"],
    ["-c", "{path}", "cache", "verify"], ["fleet", "-c", "{path}", "status"],
    ["status", "--config", "{path}"], ["explain", "web-1", "-c", "{path}"],
])
def test_config_is_taken_before_or_after_the_subcommand_and_errors_go_to_stderr(
        argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nowhere.yaml"
    assert cli.main([a.format(path=missing) for a in argv]) == 1
    captured = capsys.readouterr()
    assert f"{missing}:0: config file not found" in captured.err and captured.out == ""


def test_the_config_after_the_subcommand_wins(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before, after = tmp_path / "before.yaml", tmp_path / "after.yaml"
    assert cli.main(["-c", str(before), "cache", "-c", str(after), "list"]) == 1
    assert f"{after}:0:" in capsys.readouterr().err


def test_an_unknown_subcommand_is_a_usage_error_with_exit_2(
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        cli.main(["bogus"])
    assert stopped.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize("image", ["../../x", "ubuntu/24.04", ""])
def test_reprovision_refuses_an_image_that_is_not_an_identifier_before_touching_libvirt(
        image: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        cli.main(["reprovision", "web-1", "--image", image])
    assert stopped.value.code == 2
    captured = capsys.readouterr()
    assert "is not an image name" in captured.err and captured.out == ""


@pytest.mark.parametrize("extra", [["--cancel", "--wait"], ["--cancel", "--image", "base"],
                                   ["--shutdown"]])
def test_reprovision_options_that_do_not_go_together_are_a_usage_error(
        extra: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        cli.main(["reprovision", "web-1", *extra])
    assert stopped.value.code == 2
    assert "goes with" in capsys.readouterr().err
