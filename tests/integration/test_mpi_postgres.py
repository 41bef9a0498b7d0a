"""The PersonIndex contract (tests/unit/bridge/stores/mpi/mpi_store_contract.py) on PostgreSQL."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit" / "bridge" / "stores" / "mpi"))

from mpi_store_contract import ConcurrencyContract, MigrationContract, StoreContract

pytestmark = [pytest.mark.integration, pytest.mark.postgres]


class TestPostgres(StoreContract, ConcurrencyContract, MigrationContract):
    @pytest.fixture
    def mpi_url(self, pg_dsn: str) -> str:
        return pg_dsn
