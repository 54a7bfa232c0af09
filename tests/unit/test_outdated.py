"""The outdated rule that ``status`` and the daemon's gauge share, as a table."""

from __future__ import annotations

import pytest

from watcher.core.triage import is_outdated

OLD = "a" * 64
NEW = "b" * 64


@pytest.mark.parametrize(("provisioned", "current", "expected"), [
    pytest.param(OLD, NEW, True, id="provisioned-with-an-older-digest"),
    pytest.param(NEW, NEW, False, id="provisioned-with-the-current-digest"),
    pytest.param(None, NEW, False, id="never-provisioned"),
    pytest.param("", NEW, False, id="provisioned-without-a-digest"),
    pytest.param(OLD, None, False, id="image-not-cached"),
    pytest.param(None, None, False, id="nothing-known"),
])
def test_a_domain_is_outdated_only_when_both_digests_are_known_and_differ(
    provisioned: str | None, current: str | None, expected: bool,
) -> None:
    assert is_outdated(provisioned, current) is expected
