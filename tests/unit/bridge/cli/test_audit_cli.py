"""``fhirbridge audit keygen|run|verify``: exit codes and messages over real databases."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bridge.cli import main
from bridge.config import Settings
from bridge.stores.audit import AuditStore
from tests.unit.bridge.service.audit.audit_helpers import events


@pytest.fixture
def data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in (
        "FHIRBRIDGE_AUDIT_URL",
        "FHIRBRIDGE_AUDIT_LOG_URL",
        "FHIRBRIDGE_AUDIT_ORIGIN",
        "FHIRBRIDGE_AUDIT_KEY_FILE",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("FHIRBRIDGE_AUDIT_PUBLIC_KEY", raising=False)
    monkeypatch.setenv("FHIRBRIDGE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("FHIRBRIDGE_CHECKPOINT_INTERVAL_MS", "0")
    return tmp_path


def _record(n: int, first: int = 0) -> list[str]:
    store = AuditStore.open(Settings.from_env().audit.url)
    for i in range(first, first + n):
        store.record(events(i, patients=("pat-a", "pat-b")))
    ids = [r.id for r in store.since(0, 1000)]
    store.close()
    return ids


def test_run_refuses_without_its_key(data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "run", "--exit-when-idle", "0"]) == 1
    err = capsys.readouterr().err
    assert f"no audit log signing key at {data / 'audit.key'}" in err and "fhirbridge audit keygen" in err


def test_keygen_run_verify_then_a_deleted_and_an_edited_row(
    data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["audit", "keygen"]) == 0
    out = capsys.readouterr().out
    assert (data / "audit.key").stat().st_mode & 0o777 == 0o600
    assert out.strip().splitlines()[-1].startswith("fhirbridge.example/ledger/audit+")
    assert main(["audit", "keygen"]) == 1  # never overwritten by accident
    capsys.readouterr()
    ids = _record(4)
    assert main(["audit", "run", "--exit-when-idle", "0"]) == 0
    assert "appended 8 audit events" in capsys.readouterr().err
    assert main(["audit", "verify"]) == 0
    out = capsys.readouterr().out
    assert "audit rows: 8  leaves: 8/8  pending: 0" in out and out.rstrip().endswith(
        "the audit log is intact"
    )

    with sqlite3.connect(data / "audit.db") as conn:
        conn.execute("DELETE FROM audit_events WHERE seq = 3")
        conn.execute("UPDATE audit_events SET body = replace(body, 'TREAT', 'HMARKT') WHERE seq = 6")
    assert main(["audit", "verify"]) == 1
    out = capsys.readouterr().out
    assert f"FAILED: first missing event: seq 3 id {ids[2]}" in out
    assert f"altered event seq 6 id {ids[5]}" in out


def test_verify_needs_the_databases_and_a_key(data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "verify"]) == 1
    assert "no audit database at" in capsys.readouterr().err
    _record(1)
    assert main(["audit", "run", "--unsigned", "--exit-when-idle", "0"]) == 0
    capsys.readouterr()
    assert main(["audit", "verify"]) == 1
    assert "give the audit log's verifier key" in capsys.readouterr().err


def _log_size(path: Path) -> int:
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
            row = conn.execute("SELECT size FROM ledger_meta").fetchone()
    except sqlite3.Error:  # not created yet
        return 0
    return int(row[0]) if row else 0


def test_run_stops_on_sigterm_after_signing(data: Path) -> None:
    assert main(["audit", "keygen"]) == 0
    _record(2)
    proc = subprocess.Popen(
        [sys.executable, "-m", "bridge.cli", "audit", "run"],
        env={**os.environ, "FHIRBRIDGE_CHECKPOINT_INTERVAL_MS": "60000"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for size in (4, 6):  # the first append is signed; the second is not due for 60 s
            deadline = time.monotonic() + 30
            while (
                time.monotonic() < deadline
                and proc.poll() is None
                and _log_size(data / "audit-log.db") < size
            ):
                time.sleep(0.05)
            if size == 4:
                _record(1, first=2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "appended 6 audit events" in err
    with sqlite3.connect(data / "audit-log.db") as conn:  # a checkpoint over all of them, signed at exit
        assert conn.execute("SELECT size FROM ledger_checkpoints ORDER BY size").fetchall() == [(4,), (6,)]
