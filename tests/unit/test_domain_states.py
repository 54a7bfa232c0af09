"""The domains-by-state gauge's counts: every known state present, gone states back to 0."""

from __future__ import annotations

import pytest

from watcher.core.triage import count_by_state
from watcher.telemetry import DOMAIN_STATES

ZEROS = dict.fromkeys(DOMAIN_STATES, 0)


@pytest.mark.parametrize(("states", "expected"), [
    pytest.param([], ZEROS, id="no-domains"),
    pytest.param(["provisioned", "provisioned", "failed"],
                 {**ZEROS, "provisioned": 2, "failed": 1}, id="some"),
    pytest.param(["none"] * 3 + ["malformed", "reprovision", "provisioning"],
                 {**ZEROS, "none": 3, "malformed": 1, "reprovision": 1, "provisioning": 1},
                 id="every-kind"),
    pytest.param(["odd"], {**ZEROS, "odd": 1}, id="unknown-state-still-counted"),
])
def test_count_by_state(states: list[str], expected: dict[str, int]) -> None:
    assert count_by_state(states, DOMAIN_STATES) == expected
