"""Reading a domain's write progress out of the daemon's /metrics text."""

from __future__ import annotations

from watcher.follow import bar, progress_in

METRICS = """\
# HELP volume_watcher_write_progress_ratio Progress of the volume write running for a domain.
# TYPE volume_watcher_write_progress_ratio gauge
volume_watcher_write_progress_ratio{domain="web-1"} 0.42
volume_watcher_write_progress_ratio{domain="web-10"} 0.9
"""


def test_the_progress_of_the_domain_asked_for_is_read() -> None:
    assert progress_in(METRICS, "web-1") == 0.42
    assert progress_in(METRICS, "web-10") == 0.9


def test_no_series_or_not_metrics_at_all_is_no_progress() -> None:
    assert progress_in(METRICS, "db-1") is None
    assert progress_in("<html>not metrics</html>{", "web-1") is None


def test_the_bar_fills_with_the_ratio() -> None:
    assert bar(0.5, width=10) == "[#####-----]  50.0%"
    assert bar(1.5, width=4) == "[####] 150.0%"
