"""The PersonIndex contract on SQLite (the same contract runs on PostgreSQL in tests/integration)."""

from __future__ import annotations

from pathlib import Path

import pytest
from mpi_store_contract import (
    ConcurrencyContract,
    MigrationContract,
    StoreContract,
    test_match_state_is_a_str_enum,
)

from bridge.stores.mpi import MpiError, PersonIndex

__all__ = ["test_match_state_is_a_str_enum"]


class TestSqlite(StoreContract, ConcurrencyContract, MigrationContract):
    @pytest.fixture
    def mpi_url(self, tmp_path: Path) -> str:
        return f"sqlite://{tmp_path / 'mpi.db'}"


def test_unsupported_url() -> None:
    with pytest.raises(MpiError, match="unsupported"):
        PersonIndex.open("mysql://x")


def test_wal_mode_and_url_is_the_path(tmp_path: Path) -> None:
    with PersonIndex.open(f"sqlite://{tmp_path / 'sub' / 'w.db'}") as mpi:
        assert mpi.db.one("PRAGMA journal_mode") == ("wal",)
    assert (tmp_path / "sub" / "w.db").is_file()


def test_pending_reraises_unless_told_not_to() -> None:
    from concurrent.futures import Future

    from bridge.stores.mpi.db import Pending

    def failed() -> Future[None]:
        f: Future[None] = Future()
        f.set_exception(ValueError("worker failed"))
        return f

    with pytest.raises(ValueError, match="worker failed"):
        Pending(failed()).wait()
    Pending(failed()).wait(raise_error=False)
    Pending(None).wait()
