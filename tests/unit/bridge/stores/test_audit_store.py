"""The audit store on SQLite and PostgreSQL: one durable transaction per access, queries by patient and
agent, the appender's read in seq order, 503-worthy errors, and leaves without PHI."""

from __future__ import annotations

import dataclasses
import hashlib
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import psycopg
import pytest

from bridge.config import Settings
from bridge.errors import TransientError
from bridge.stores import audit as audit_module
from bridge.stores.audit import AuditInputError, AuditStore, canonical, leaf_entry
from tests.unit.bridge.service.audit.audit_helpers import ISSUER, access, events


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite://{tmp_path / 'audit.db'}"
    return str(request.getfixturevalue("pg_dsn"))


@pytest.fixture
def store(url: str) -> Iterator[AuditStore]:
    s = AuditStore.open(url)
    yield s
    s.close()


def test_an_access_is_stored_whole_with_its_columns_and_canonical_body(store: AuditStore) -> None:
    evs = events(patients=("pat-a", "pat-b", "pat-c"))
    store.record(evs)
    rows = store.since(0)
    assert [r.id for r in rows] == [e["id"] for e in evs]
    assert [r.seq for r in rows] == sorted(r.seq for r in rows)
    for row, ev in zip(rows, evs, strict=True):
        assert row.body.encode() == canonical(ev) and row.event() == ev
        assert row.sha256 == hashlib.sha256(canonical(ev)).hexdigest() == row.body_sha256()
        assert (row.agent, row.organization, row.purpose, row.break_glass, row.outcome) == (
            f"{ISSUER}|dr-house",
            "st-mary",
            "TREAT",
            False,
            "success",
        )
    assert [r.patient_id for r in rows] == ["pat-a", "pat-b", "pat-c"]
    assert store.get(evs[1]["id"]) == rows[1] and store.get("nope") is None


def test_by_patient_and_by_agent_in_pages(store: AuditStore) -> None:
    for i in range(5):
        store.record(events(i, patients=("pat-a",), who=access("dr-house" if i % 2 else "dr-wilson")))
    store.record(events(9, patients=("pat-b",), break_glass_reason="emergency"))
    page1 = store.for_patient("pat-a", limit=2)
    page2 = store.for_patient("pat-a", limit=2, after=page1[-1].seq)
    page3 = store.for_patient("pat-a", limit=2, after=page2[-1].seq)
    assert [len(p) for p in (page1, page2, page3)] == [2, 2, 1]
    seqs = [r.seq for p in (page1, page2, page3) for r in p]
    assert seqs == sorted(seqs)
    newest = store.for_patient("pat-a", limit=3, descending=True)
    assert [r.seq for r in newest] == sorted(seqs, reverse=True)[:3]
    older = store.for_patient("pat-a", limit=3, descending=True, after=newest[-1].seq)
    assert [r.seq for r in older] == sorted(seqs, reverse=True)[3:]
    (b,) = store.for_patient("pat-b")
    assert b.break_glass is True
    house = store.for_agent(f"{ISSUER}|dr-house")
    assert [r.seq for r in house] == [seqs[1], seqs[3], b.seq]
    assert store.for_patient("nobody") == [] and store.for_patient("pat-a", limit=0) == []


def test_a_bad_event_writes_nothing_of_its_access(store: AuditStore) -> None:
    evs = events(patients=("pat-a", "pat-b"))
    with pytest.raises(AuditInputError) as info:
        store.record([evs[0], {**evs[1], "outcome": "77"}])
    assert info.value.index == 1
    with pytest.raises(AuditInputError):
        store.record([evs[0], {**evs[1], "extension": [{"url": "x", "valueString": object()}]}])
    # a repeated event id violates the unique constraint: the whole access is rolled back, and the
    # caller is told the events are not stored
    with pytest.raises(TransientError) as failed:
        store.record([evs[0], evs[0]])
    assert "unique" in str(failed.value.__cause__).lower()
    assert store.since(0) == []
    store.record(evs)  # the store is usable afterwards
    assert len(store.since(0)) == 2


def test_since_reads_in_seq_order_across_gaps(store: AuditStore, url: str) -> None:
    store.record(events(0, patients=("a", "b")))
    _skip_seq(store, url, 10)
    store.record(events(1, patients=("c",)))
    rows = store.since(0)
    assert [r.patient_id for r in rows] == ["a", "b", "c"]
    assert rows[2].seq >= rows[1].seq + 10
    assert [r.patient_id for r in store.since(rows[1].seq)] == ["c"]
    assert [r.patient_id for r in store.since(0, 2)] == ["a", "b"]
    assert [[r.patient_id for r in page] for page in store.iter_all(2)] == [["a", "b"], ["c"]]
    assert [r.patient_id for r in store.since(0, upto=rows[1].seq)] == ["a", "b"]
    light = store.leaves_since(0)
    assert [(x.seq, x.id, x.recorded, x.organization, x.sha256) for x in light] == [
        (r.seq, r.id, r.recorded, r.organization, r.sha256) for r in rows
    ]
    assert [leaf_entry(x) for x in light] == [leaf_entry(r) for r in rows]
    assert store.leaves_since(rows[0].seq, upto=rows[1].seq) == light[1:2]


def _skip_seq(store: AuditStore, url: str, n: int) -> None:
    """Make the next seq ``n`` higher (a gap, as PostgreSQL leaves after rolled-back inserts)."""
    if url.startswith("sqlite"):
        store.db.execute("UPDATE sqlite_sequence SET seq = seq + ? WHERE name = 'audit_events'", [n])
    else:
        store.db.execute(
            "SELECT setval(pg_get_serial_sequence('audit_events', 'seq'), "
            "(SELECT last_value FROM audit_events_seq_seq) + ?)",
            [n],
        )


def test_the_leaf_of_a_row_holds_no_phi(store: AuditStore) -> None:
    store.record(events(patients=("pat-secret",), query="GET /Patient?name=Doe&birthdate=1970-01-01"))
    (row,) = store.since(0)
    entry = leaf_entry(row)
    data = entry.canonical().decode()
    for phi in ("pat-secret", "Doe", "1970", "dr-house", "Practitioner/7", "TREAT", "GET"):
        assert phi not in data
    assert orjson.loads(data) == {
        "adapter": "audit",
        "adapter_version": "balp",
        "bundle_sha256": row.sha256,
        "ingested_at": row.recorded,
        "message_id": row.id,
        "offset": row.seq,
        "partition": 0,
        "source_org": "st-mary",
        "topic": "audit",
    }
    assert leaf_entry(dataclasses.replace(row, organization=None)).source_org == "-"


def test_a_locked_sqlite_database_is_a_transient_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        audit_module, "AUDIT_TUNING", audit_module.SqliteTuning(synchronous="FULL", busy_timeout_ms=50)
    )
    url = f"sqlite://{tmp_path / 'audit.db'}"
    store = AuditStore.open(url)
    other = sqlite3.connect(tmp_path / "audit.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(TransientError):
            store.record(events())
    finally:
        other.execute("ROLLBACK")
        other.close()
    store.record(events())  # and it works again once the lock is gone
    assert len(store.since(0)) == 1
    store.close()


def test_an_unreachable_database_is_a_transient_error(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    with pytest.raises(TransientError):
        AuditStore.open(f"sqlite://{tmp_path / 'a-file' / 'audit.db'}")
    with pytest.raises(TransientError):
        AuditStore.open("postgresql://nobody@127.0.0.1:1/none")


@pytest.mark.postgres
def test_a_lost_postgresql_connection_is_a_transient_error_then_reconnects(pg_dsn: str) -> None:
    store = AuditStore.open(pg_dsn)
    store.record(events(0))
    pid = store.db.query("SELECT pg_backend_pid()")[0][0]
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", [pid])
    with pytest.raises(TransientError):
        store.record(events(1))
    store.record(events(2))
    assert [r.event()["entity"][-1]["what"]["identifier"]["value"] for r in store.since(0)] == [
        "req-0",
        "req-2",
    ]
    store.close()


@pytest.mark.postgres
def test_the_postgresql_horizon_waits_for_a_slow_access_that_drew_a_lower_seq(pg_dsn: str) -> None:
    """A slow access draws seq n and commits after a quick one with n + 1: the appender must not read
    past n before n is visible, or it would skip it for ever."""
    store = AuditStore.open(pg_dsn)
    assert store.horizon() == 0
    slow, quick = AuditStore.open(pg_dsn), AuditStore.open(pg_dsn)
    slow_events = events(0, patients=("slow",))
    seen: list[int] = []
    with slow.db.transaction() as tx:  # what record() does, held open: the lock, the insert, no commit yet
        tx.execute("SELECT pg_advisory_xact_lock_shared(?)", [audit_module._PG_LOCK])
        tx.execute(audit_module._INSERT, _row_values(slow_events[0]))
        AuditStore.open(pg_dsn).close()  # a thread opening its store meanwhile does not wait either
        quick.record(events(1, patients=("quick",)))  # shared locks: it does not wait for the slow one
        (visible,) = store.since(0)
        assert visible.patient_id == "quick"
        waiter = threading.Thread(target=lambda: seen.append(store.horizon() or 0))
        waiter.start()
        time.sleep(0.5)
        assert seen == []  # the horizon waits for the slow access
    waiter.join(10)
    rows = store.since(0)
    assert [r.patient_id for r in rows] == ["slow", "quick"] and seen == [rows[-1].seq]
    assert [r.seq for r in store.leaves_since(0, upto=seen[0])] == [r.seq for r in rows]
    for s in (store, slow, quick):
        s.close()


def _row_values(event: dict[str, object]) -> list[object]:
    return list(audit_module.row_values(event))


def test_settings_default_beside_the_other_databases(tmp_path: Path) -> None:
    s = Settings.from_env(
        {"FHIRBRIDGE_DATA_DIR": str(tmp_path), "FHIRBRIDGE_LEDGER_ORIGIN": "hie.example/log"}
    )
    assert s.audit.url == f"sqlite://{tmp_path / 'audit.db'}"
    assert s.audit.log_url == f"sqlite://{tmp_path / 'audit-log.db'}"
    assert s.audit.origin == "hie.example/log/audit"
    assert s.audit.key_file == tmp_path / "audit.key"
    assert s.audit.signer_key() is None and s.audit.verifier_key() is None
    s = Settings.from_env(
        {
            "FHIRBRIDGE_DATA_DIR": str(tmp_path),
            "FHIRBRIDGE_AUDIT_URL": "postgresql://a@h/audit",
            "FHIRBRIDGE_AUDIT_LOG_URL": "postgresql://a@h/auditlog",
            "FHIRBRIDGE_AUDIT_ORIGIN": "hie.example/access",
            "FHIRBRIDGE_AUDIT_KEY_FILE": str(tmp_path / "k.key"),
        }
    )
    assert (s.audit.url, s.audit.log_url, s.audit.origin, s.audit.key_file) == (
        "postgresql://a@h/audit",
        "postgresql://a@h/auditlog",
        "hie.example/access",
        tmp_path / "k.key",
    )
