"""enable_wal waits for a connection that holds the lock instead of failing at once."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest

from bridge.db import enable_wal


def _locked(path: Path) -> sqlite3.Connection:
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")  # what a connection switching a new file to WAL holds
    return holder


def test_waits_for_the_lock_then_switches(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    holder = _locked(path)
    late = sqlite3.connect(path, isolation_level=None, timeout=0.01)
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        late.execute("PRAGMA journal_mode=WAL")  # the failure this helper exists for
    threading.Timer(0.3, lambda: holder.execute("COMMIT")).start()
    t = time.monotonic()
    enable_wal(late, timeout=10)
    assert time.monotonic() - t >= 0.2
    assert late.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    holder.close()
    late.close()


def test_gives_up_after_the_timeout(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    holder = _locked(path)
    late = sqlite3.connect(path, isolation_level=None, timeout=0.01)
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        enable_wal(late, timeout=0.2)
    holder.close()
    late.close()
