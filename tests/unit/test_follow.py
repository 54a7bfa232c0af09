"""Following a write: its progress out of /metrics, and how it is drawn.

On a terminal the status is one line redrawn with a carriage return; anywhere else no
control character may appear, and progress is a plain line per tenth.
"""

from __future__ import annotations

import io

from watcher.follow import Console, RateMeter, WriteProgress, bar, progress_in, writing_line

MiB = 1024 * 1024
METRICS = """\
# HELP volume_watcher_write_progress_ratio Progress of the volume write running for a domain.
# TYPE volume_watcher_write_progress_ratio gauge
volume_watcher_write_progress_ratio{domain="web-1"} 0.42
volume_watcher_write_progress_ratio{domain="web-10"} 0.9
# HELP volume_watcher_write_size_bytes Virtual bytes of the volume write running for a domain.
# TYPE volume_watcher_write_size_bytes gauge
volume_watcher_write_size_bytes{domain="web-1"} 2.147483648e+09
"""


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_progress_of_the_domain_asked_for_is_read_with_its_size() -> None:
    assert progress_in(METRICS, "web-1") == WriteProgress(0.42, 2 * 1024 * MiB)
    assert progress_in(METRICS, "web-10") == WriteProgress(0.9, None)


def test_no_series_or_not_metrics_at_all_is_no_progress() -> None:
    assert progress_in(METRICS, "db-1") is None
    assert progress_in("<html>not metrics</html>{", "web-1") is None


def test_the_bar_fills_with_the_ratio() -> None:
    assert bar(0.5, width=10) == "[#####-----]  50.0%"
    assert bar(1.5, width=4) == "[####] 150.0%"


def test_the_writing_line_shows_percent_bytes_and_rate_when_known() -> None:
    now = WriteProgress(0.5, 200 * MiB)
    assert writing_line("web-1", now, 25 * MiB) == (
        f"web-1: writing {bar(0.5)}  100.0MiB / 200.0MiB  25.0MiB/s")
    assert writing_line("web-1", WriteProgress(0.5, None), None) == f"web-1: writing {bar(0.5)}"


def test_the_rate_is_the_average_since_the_first_sample_and_restarts_with_a_new_write() -> None:
    meter = RateMeter()
    assert meter.update(10.0, 0) is None
    assert meter.update(12.0, 20 * MiB) == 10 * MiB
    assert meter.update(14.0, 60 * MiB) == 15 * MiB
    assert meter.update(15.0, 1 * MiB) is None  # smaller: another write began
    assert meter.update(15.0, None) is None


def test_on_a_terminal_the_status_is_redrawn_in_place_and_cleared_before_a_lasting_line() -> None:
    out = Terminal()
    console = Console(out, columns=lambda: 80)
    assert console.live
    console.say("web-1: requested")
    console.status("web-1: writing 10%", step=1)
    console.status("web-1: writing 10%", step=1)  # unchanged: not redrawn
    console.status("web-1: writing 20%", step=2)
    console.say("web-1: provisioned")
    console.close()
    assert out.getvalue() == (
        "web-1: requested\n"
        "\rweb-1: writing 10%\x1b[K"
        "\rweb-1: writing 20%\x1b[K"
        "\r\x1b[Kweb-1: provisioned\n")


def test_on_a_terminal_the_status_is_cut_to_the_width_and_close_ends_its_line() -> None:
    out = Terminal()
    console = Console(out, columns=lambda: 11)
    console.status("0123456789abcdef", step=0)
    console.close()
    assert out.getvalue() == "\r0123456789\x1b[K\n"


def test_elsewhere_progress_is_a_plain_line_per_step_and_no_control_character() -> None:
    out = io.StringIO()
    console = Console(out, columns=lambda: 11)
    assert not console.live
    for percent in (0, 3, 12, 15, 27):
        console.status(f"web-1: writing {percent}% of a long line", step=percent // 10)
    console.say("web-1: provisioned")
    console.close()
    assert out.getvalue() == (
        "web-1: writing 0% of a long line\n"
        "web-1: writing 12% of a long line\n"
        "web-1: writing 27% of a long line\n"
        "web-1: provisioned\n")
