"""enable_wal waits for a connection that holds the lock instead of failing at once."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest

from bridge.stores.db import enable_wal


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


def test_checkpointer_copies_the_wal_while_the_writer_goes_on(tmp_path: Path) -> None:
    from bridge.stores.db import WalCheckpointer

    path = tmp_path / "ck.db"
    writer = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    enable_wal(writer)
    writer.execute("PRAGMA wal_autocheckpoint=0")  # only the checkpointer copies
    writer.execute("CREATE TABLE t (x BLOB)")
    ck = WalCheckpointer(str(path))
    try:
        size_before = path.stat().st_size
        for _ in range(20):
            writer.execute("BEGIN IMMEDIATE")
            writer.executemany("INSERT INTO t VALUES (?)", [(b"x" * 4000,)] * 25)
            writer.execute("COMMIT")
            ck.poke()
        # the last poke's checkpoint runs after the last commit: wait for it
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and path.stat().st_size < size_before + 20 * 25 * 4000:
            time.sleep(0.01)
        assert path.stat().st_size >= size_before + 20 * 25 * 4000  # the rows reached the database file
        assert ck.failures == 0
        assert writer.execute("SELECT COUNT(*) FROM t").fetchone() == (500,)
    finally:
        ck.close()
    assert not ck._thread.is_alive()
    writer.close()


def test_mpi_database_checkpoints_in_the_background_and_stops_on_close(tmp_path: Path) -> None:
    from bridge.stores.mpi.db import Database

    db = Database(f"sqlite:///{tmp_path}/mpi.db")
    with db.write():
        db.execute("INSERT INTO mpi_meta (key, value) VALUES ('k', 'v')")
    ck = db._checkpointer
    assert ck is not None and ck._thread.is_alive()
    db.close()
    assert not ck._thread.is_alive() and db._checkpointer is None
    memory = Database("sqlite://")
    with memory.write():
        memory.execute("INSERT INTO mpi_meta (key, value) VALUES ('k', 'v')")
    assert memory._checkpointer is None  # an in-memory database has no WAL
    memory.close()
