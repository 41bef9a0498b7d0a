"""Leadership of the ledger writer: an flock on SQLite, a session advisory lock on PostgreSQL."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from bridge.stores.leader import LeaderLock, LeadershipLost, lock_key


def test_lock_keys_are_stable_signed_64_bit_and_differ_by_role() -> None:
    assert lock_key("ledger:a") == lock_key("ledger:a") != lock_key("ledger:b")
    assert -(2**63) <= lock_key("ledger:a") < 2**63


def test_on_sqlite_one_holder_at_a_time_and_a_standby_takes_over_on_release(tmp_path: Path) -> None:
    url = f"sqlite://{tmp_path / 'ledger.db'}"
    first = LeaderLock(url, "ledger:x", poll_s=0.05)
    second = LeaderLock(url, "ledger:x", poll_s=0.05)
    assert first.acquire()
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    assert not second.acquire(stop), "a standby waits while the leader holds the lock"
    first.release()
    assert second.acquire()
    second.release()


@pytest.mark.postgres
def test_on_postgres_a_killed_session_hands_over_and_the_old_leader_learns_it_lost(pg_dsn: str) -> None:
    import psycopg

    lost = threading.Event()
    leader = LeaderLock(pg_dsn, "ledger:pg", lease_s=2, poll_s=0.1, on_lost=lost.set)
    standby = LeaderLock(pg_dsn, "ledger:pg", lease_s=2, poll_s=0.1)
    assert leader.acquire()
    stop = threading.Event()
    threading.Timer(0.5, stop.set).start()
    assert not standby.acquire(stop)
    with psycopg.connect(pg_dsn, autocommit=True) as admin:  # the leader's session dies (a crash, a failover)
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' AND granted"
        )
    assert standby.acquire()
    assert lost.wait(5), "the old leader's watch notices within a lease"
    with pytest.raises(LeadershipLost, match="lost the ledger:pg leadership"):
        leader.check()
    standby.check()
    leader.release()
    standby.release()


@pytest.mark.postgres
def test_on_postgres_a_leader_that_stops_talking_loses_the_lock_after_the_lease(pg_dsn: str) -> None:
    """A paused leader (SIGSTOP, a frozen VM) keeps its socket open: idle_session_timeout ends it."""
    leader = LeaderLock(pg_dsn, "ledger:lease", lease_s=2, poll_s=0.1)
    standby = LeaderLock(pg_dsn, "ledger:lease", lease_s=2, poll_s=0.1)
    assert leader.acquire()
    leader._closed.set()  # the keepalive stops, as in a paused process; the connection stays open
    started = time.monotonic()
    assert standby.acquire()
    assert 1.5 < time.monotonic() - started < 6
    standby.release()
    leader.release()
