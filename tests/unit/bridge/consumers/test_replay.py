"""Replay requests refused before anything is read (the broker-backed behaviour is in tests/integration)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge.config import ConfigError, Settings
from bridge.consumers.replay import parse_time_ms, replay


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"to_topic": "fhir.bundles"}, "is the topic being read"),
        (
            {"dry_run": True, "from_time": "2026-02-01T00:00:00Z", "to_time": "2026-01-01T00:00:00Z"},
            "before --from-time",
        ),
        ({"dry_run": True, "from_time": "1960-01-01T00:00:00Z"}, "before 1970"),
        ({"dry_run": True, "from_time": "2026-01-01T00:00:00"}, "needs a UTC offset"),
    ],
)
def test_inconsistent_requests_are_refused_clearly(tmp_path: Path, kwargs: dict, message: str) -> None:  # type: ignore[type-arg]
    settings = Settings.from_env({"FHIRBRIDGE_DATA_DIR": str(tmp_path)})
    with pytest.raises(ConfigError, match=message):
        replay(settings, "127.0.0.1:1", **kwargs)


def test_parse_time_ms() -> None:
    assert parse_time_ms("1970-01-01T00:00:01Z", "--from-time") == 1000
    with pytest.raises(ConfigError, match="not an ISO 8601 time"):
        parse_time_ms("yesterday", "--from-time")
