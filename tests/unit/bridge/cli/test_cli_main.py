"""The one map from an unhandled error to an exit code and a one-line message (bridge/cli/__init__.py)."""

from __future__ import annotations

import pytest

from adapters.errors import AdapterError
from bridge.cli import exit_code
from bridge.errors import ConfigError
from ledger.errors import StorageUnavailable


@pytest.mark.parametrize(
    "exc", [ConfigError("no broker"), AdapterError("bad option"), StorageUnavailable("down")]
)
def test_every_packages_errors_are_a_failed_run_with_their_message(
    exc: Exception, capsys: pytest.CaptureFixture[str]
) -> None:
    assert exit_code(exc) == 1
    err = capsys.readouterr().err
    assert err == f"fhirbridge: error: {exc}\n"


def test_anything_else_is_one_line_naming_its_class_without_the_message(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert exit_code(RuntimeError("DOE^JANE 1980-02-14")) == 1
    err = capsys.readouterr().err
    assert "RuntimeError" in err and "DOE" not in err and "Traceback" not in err and err.count("\n") == 1
