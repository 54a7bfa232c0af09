"""Labelled counters exist at 0 for every label value the code can give.

An alert on ``increase(counter[1h]) > 0`` needs a series before the first event: a series
born at 1 has no increase to see, so the first failure after a restart would go unnoticed.
The label values are read out of the source, so a new rejection reason or unit of work
that is not declared up front fails here instead of leaving an alert blind.
"""

from __future__ import annotations

import ast
from pathlib import Path

from watcher import telemetry
from watcher.core.errors import REJECTION_REASONS

PACKAGE = Path(__file__).resolve().parents[2] / "watcher"


def _calls(name: str) -> list[ast.Call]:
    found: list[ast.Call] = []
    for source in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(source.read_text(), str(source))):
            if isinstance(node, ast.Call):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if called == name:
                    found.append(node)
    return found


def _literal(node: ast.expr) -> str:
    assert isinstance(node, ast.Constant) and isinstance(node.value, str), ast.dump(node)
    return node.value


def _series(metric: str, label: str) -> dict[str, float]:
    return {sample.labels[label]: sample.value
            for family in telemetry.REGISTRY.collect() for sample in family.samples
            if sample.name == metric and label in sample.labels}


def test_every_rejection_reason_raised_is_declared() -> None:
    raised = {_literal(call.args[0]) for call in _calls("ImageRejected") if call.args}
    assert raised, "no ImageRejected(...) found: the scan is broken"
    assert raised <= set(REJECTION_REASONS), sorted(raised - set(REJECTION_REASONS))


def test_every_rejection_reason_has_a_series_from_the_start() -> None:
    series = _series("volume_watcher_images_rejected_total", "reason")
    assert set(REJECTION_REASONS) <= set(series)


def test_every_unit_of_work_reported_has_a_series_from_the_start() -> None:
    units = {_literal(call.args[1]) for call in _calls("report_unexpected")
             if len(call.args) > 1 and isinstance(call.args[1], ast.Constant)}
    units |= {_literal(keyword.value) for call in _calls("KeyedWorker") + _calls("labels")
              for keyword in call.keywords
              if keyword.arg == "unit" and isinstance(keyword.value, ast.Constant)}
    assert {"warm", "reprovision", "api"} <= units
    assert units <= set(_series("volume_watcher_unexpected_errors_total", "unit"))


def test_written_bytes_ends_in_its_unit() -> None:
    names = {family.name for family in telemetry.REGISTRY.collect()}
    assert "volume_watcher_written_bytes" in names
    assert "volume_watcher_bytes_written" not in names
