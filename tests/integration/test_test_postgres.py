"""The tests' own PostgreSQL (tests/services/postgres.py): started, stopped by PID, orphans reaped."""

from __future__ import annotations

import json
import os
import subprocess

import psycopg
import pytest

from tests.services.postgres import OWNER_FILE, PostgresServer, _alive, reap_orphans

pytestmark = pytest.mark.integration


def test_start_stop_by_pid_and_restart_keeps_data() -> None:
    pg = PostgresServer()
    try:
        pg.start()
        pid = pg.pid
        assert pid is not None and _alive(pid)
        assert pg.port != 5432  # a server the user runs on the default port is never touched
        dsn = pg.create_db("kept")
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE t (x int)")
            conn.execute("INSERT INTO t VALUES (42)")
            # trust authentication is for loopback only, and the server listens on loopback only
            assert conn.execute("SHOW listen_addresses").fetchone() == ("127.0.0.1",)
        pg.stop()
        assert pg.pid is None and not _alive(pid)
        pg.start()
        with psycopg.connect(dsn) as conn:
            assert conn.execute("SELECT x FROM t").fetchone() == (42,)
    finally:
        pg.destroy()
    assert not pg.base.exists()


def test_orphan_of_a_killed_test_run_is_stopped_by_the_next_run() -> None:
    pg = PostgresServer()
    try:
        pg.start()
        pid = pg.pid
        assert pid is not None
        dead = subprocess.Popen(["true"])
        dead.wait()
        owner = json.loads((pg.base / OWNER_FILE).read_text())
        owner["owner_pid"] = dead.pid  # the test run that started it is gone
        (pg.base / OWNER_FILE).write_text(json.dumps(owner))
        assert pid in reap_orphans()
        assert not _alive(pid) or os.waitpid(pid, os.WNOHANG)[0] == pid
        assert not pg.base.exists()
    finally:
        pg.destroy()


def test_a_live_owners_server_is_left_alone() -> None:
    with PostgresServer() as pg:
        assert pg.pid not in reap_orphans()
        psycopg.connect(pg.dsn(), connect_timeout=5).close()
