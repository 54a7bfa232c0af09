"""Errors say what they are: a failed write is permanent or temporary from the start."""

from __future__ import annotations

import pytest

from watcher.core.errors import (
    ImageWriteError,
    PermanentError,
    PermanentImageWriteError,
    TemporaryError,
    TemporaryImageWriteError,
)


@pytest.mark.parametrize(
    ("temporary", "kind", "family"),
    [
        pytest.param(False, PermanentImageWriteError, PermanentError, id="permanent"),
        pytest.param(True, TemporaryImageWriteError, TemporaryError, id="temporary"),
    ],
)
def test_a_write_error_is_built_as_its_kind(temporary: bool, kind: type[ImageWriteError],
                                            family: type[Exception]) -> None:
    error = ImageWriteError.build("/dev/vg0/web1", 1, "warning\nDevice or resource busy\n",
                                  temporary=temporary)
    assert type(error) is kind
    assert isinstance(error, family) and isinstance(error, ImageWriteError)
    assert error.temporary is temporary
    assert str(error) == "writing /dev/vg0/web1 failed (exit 1): Device or resource busy"
    assert (error.device, error.exit_code) == ("/dev/vg0/web1", 1)


def test_a_temporary_write_error_has_no_delay_of_its_own() -> None:
    error = ImageWriteError.build("/dev/x", None, "", temporary=True)
    assert isinstance(error, TemporaryError) and error.delay is None
    assert str(error) == "writing /dev/x failed (exit None): no error output"
