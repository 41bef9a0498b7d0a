"""Shared fixtures: a fresh PostgreSQL database per test, and structlog reset.

PostgreSQL: ``FHIRBRIDGE_TEST_PG`` names a running server's admin DSN; without it, the first test that
needs PostgreSQL starts a private server (``tests/services/postgres.py``) that the session stops by
its PID at the end.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

SAMPLES = Path(
    os.environ.get("FHIRBRIDGE_SAMPLES", Path(__file__).resolve().parents[1].parent / "shared" / "samples")
)


@pytest.fixture(scope="session")
def pg_admin_dsn() -> Iterator[str]:
    """The admin DSN of the tests' PostgreSQL: ``FHIRBRIDGE_TEST_PG``, or a private server started here."""
    from tests.services.postgres import PostgresUnavailable, admin_dsn

    try:
        with admin_dsn() as dsn:
            yield dsn
    except PostgresUnavailable as exc:  # said loudly: a PostgreSQL test is never skipped
        pytest.fail(f"cannot start the tests' PostgreSQL: {exc}")


@pytest.fixture
def pg_dsn(pg_admin_dsn: str) -> Iterator[str]:
    """A DSN for a brand-new, empty PostgreSQL database, dropped after the test."""
    import psycopg

    name = f"fhirbridge_test_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(pg_admin_dsn, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:  # pragma: no cover - environment problem, said loudly
        pytest.fail(f"PostgreSQL is not reachable at {pg_admin_dsn}: {exc}")
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base = pg_admin_dsn.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(pg_admin_dsn, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def samples() -> Path:
    """The shared public samples (../shared/samples); tests read them in place, never copy them."""
    if not SAMPLES.is_dir():
        pytest.skip(f"shared samples not found at {SAMPLES}")
    return SAMPLES


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    import structlog

    yield
    structlog.reset_defaults()
    import bridge.logging

    bridge.logging._configured = False


# In the root conftest: under pytest -n the controller process, which prints the summary, loads only
# this one (tests/integration/conftest.py is loaded by the workers that collect that directory).
def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """A line per broker: how many integration tests passed on it (CI's log shows Kafka ran)."""
    counts: dict[str, int] = {}
    for report in terminalreporter.stats.get("passed", []):
        kind = _kind_of(report.nodeid)
        if kind is not None and report.when == "call":
            counts[kind] = counts.get(kind, 0) + 1
    if counts:
        terminalreporter.write_sep("-", "integration tests passed per broker")
        for kind, count in sorted(counts.items()):
            name = {"kafka": "Apache Kafka", "noida": "noida-db"}.get(kind, kind)
            terminalreporter.write_line(f"{name}: {count} passed")


def _kind_of(nodeid: str) -> str | None:
    if "tests/integration/" not in nodeid:
        return None
    if "/test_kafka_" in nodeid:  # the drills and the security tests start Apache Kafka nodes of their own
        return "kafka"
    if "[" not in nodeid:
        return None
    params = nodeid.rsplit("[", 1)[1].rstrip("]").split("-")
    return next((p for p in params if p in ("kafka", "noida", "tansu", "external")), None)
