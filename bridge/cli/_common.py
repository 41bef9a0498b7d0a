"""What every command module shares: the settings from the environment, and the one-line failure."""

from __future__ import annotations

import sys

from bridge.config import Settings


def settings() -> Settings:
    return Settings.from_env()


def fail(message: str, code: int = 1) -> int:
    """Print ``fhirbridge: error: <message>`` and return the exit code (1: the work failed, 2: usage)."""
    print(f"fhirbridge: error: {message}", file=sys.stderr)
    return code


def kv(option: str) -> tuple[str, str]:
    """``KEY=VALUE`` (an adapter option); ValueError otherwise."""
    key, sep, value = option.partition("=")
    if not sep or not key:
        raise ValueError(f"--option expects KEY=VALUE, got {option!r}")
    return key, value
