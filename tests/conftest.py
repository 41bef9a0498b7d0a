"""Shared fixtures: a fresh PostgreSQL database per test, and structlog reset."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

PG_ADMIN_DSN = os.environ.get("FHIRBRIDGE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
SAMPLES = Path(os.environ.get("FHIRBRIDGE_SAMPLES", Path(__file__).resolve().parents[1].parent / "shared" / "samples"))


@pytest.fixture
def pg_dsn() -> Iterator[str]:
    """A DSN for a brand-new, empty PostgreSQL database, dropped after the test."""
    psycopg = pytest.importorskip("psycopg")
    name = f"fhirbridge_test_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(PG_ADMIN_DSN, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:  # pragma: no cover - environment problem, said loudly
        pytest.fail(f"PostgreSQL is not reachable at {PG_ADMIN_DSN}: {exc}")
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_DSN.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as admin:
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
