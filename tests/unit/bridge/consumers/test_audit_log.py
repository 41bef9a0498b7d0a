"""The audit log's appender and verifier, on SQLite and PostgreSQL: every row appended once, in seq
order, across restarts and gaps; one writer; and a verifier that names the first deleted, edited or
added audit row."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest

from bridge.config import Settings
from bridge.consumers.audit_log import (
    AuditAppender,
    AuditLogConflict,
    run_audit_log,
    verify_audit_log,
)
from bridge.errors import ConfigError
from bridge.stores.audit import AuditStore, leaf_entry, open_audit_log, row_values
from ledger import checkpoint, merkle
from ledger.log import Ledger
from tests.unit.bridge.service.audit.audit_helpers import T0, events, settings_for, write_key


@dataclass
class Env:
    settings: Settings
    kind: str

    def store(self) -> AuditStore:
        return AuditStore.open(self.settings.audit.url)

    def log(self, signer: str | None = None) -> Ledger:
        return open_audit_log(self.settings, signer_key=signer)

    def sql(self, statement: str, *params: object) -> None:
        """Tamper with the audit database directly, as an intruder would."""
        url = self.settings.audit.url
        if self.kind == "sqlite":
            with sqlite3.connect(url[len("sqlite://") :]) as conn:
                conn.execute(statement, params)
        else:
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute(statement.replace("?", "%s"), params)  # type: ignore[arg-type]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def env(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Env]:
    if request.param == "sqlite":
        yield Env(settings_for(tmp_path), "sqlite")
        return
    admin = str(request.getfixturevalue("pg_admin_dsn"))
    base = admin.rsplit("/", 1)[0]
    names = [f"fhirbridge_audit_{tmp_path.name[-8:].lower()}_{n}".replace("-", "_") for n in ("ev", "log")]
    with psycopg.connect(admin, autocommit=True) as conn:
        for n in names:
            conn.execute(f'CREATE DATABASE "{n}"')
    try:
        yield Env(settings_for(tmp_path, f"{base}/{names[0]}", f"{base}/{names[1]}"), "postgres")
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            for n in names:
                conn.execute(f'DROP DATABASE IF EXISTS "{n}" WITH (FORCE)')


def _record(store: AuditStore, first: int, n: int) -> None:
    for i in range(first, first + n):
        store.record(events(i, patients=tuple(f"pat-{i}-{k}" for k in range(1 + i % 3))))


def _skip_seq(env: Env, n: int) -> None:
    if env.kind == "sqlite":
        env.sql("UPDATE sqlite_sequence SET seq = seq + ? WHERE name = 'audit_events'", n)
    else:
        env.sql("SELECT setval('audit_events_seq_seq', (SELECT last_value FROM audit_events_seq_seq) + ?)", n)


def _leaves(log: Ledger) -> list[tuple[int, str, str]]:
    return [
        (e.offset, e.message_id or "", e.bundle_sha256) for e in (log.entry(i) for i in range(log.size()))
    ]


def test_every_row_is_appended_once_in_seq_order_across_restarts_and_gaps(env: Env) -> None:
    store = env.store()
    _record(store, 0, 10)
    _skip_seq(env, 7)  # PostgreSQL leaves such gaps after rolled-back inserts
    _record(store, 10, 5)
    log = env.log()
    appender = AuditAppender(store, log, batch=4)
    assert appender.step() == 4
    assert appender.catch_up() > 0
    log.close()
    # a restart: new objects, the position comes from the log alone
    last = store.since(0, 10_000)[-1].seq
    _record(store, 15, 6)
    log = env.log()
    appender = AuditAppender(store, log, batch=4)
    assert appender.last_appended_seq() == last
    appender.catch_up()
    assert AuditAppender(store, log).catch_up() == 0  # nothing twice
    rows = store.since(0, 10_000)
    assert _leaves(log) == [(r.seq, r.id, r.sha256) for r in rows]
    assert any(b.seq - a.seq > 1 for a, b in itertools.pairwise(rows))
    log.close()
    store.close()


def test_a_horizon_whose_last_row_is_gone_does_not_stall_the_appender(env: Env) -> None:
    """PostgreSQL's horizon is the largest committed seq; if that row disappears before it is read, the
    appender must still move past the horizon once it has read everything up to it."""
    store = env.store()
    _record(store, 0, 2)
    top = store.since(0)[-1].seq
    real = store.horizon
    store.horizon = lambda: top + 3  # type: ignore[method-assign]  # a seq whose row is gone
    log = env.log()
    appender = AuditAppender(store, log, batch=100)
    assert appender.step() == 3
    store.horizon = real  # type: ignore[method-assign]
    _skip_seq(env, 5)
    _record(store, 2, 1)
    assert appender.catch_up() == 3
    assert _leaves(log) == [(r.seq, r.id, r.sha256) for r in store.since(0)]
    log.close()
    store.close()


def test_a_second_appender_agrees_and_a_foreign_entry_stops_the_appender(env: Env) -> None:
    store = env.store()
    _record(store, 0, 3)
    first, second = env.log(), env.log()
    a, b = AuditAppender(store, first), AuditAppender(store, second)
    b._last_seq, b._size = 0, 0  # b read the log before a appended
    a.catch_up()
    b.catch_up()  # the same rows in the same order: the log's idempotency gives them a's leaves
    rows = store.since(0)
    assert _leaves(first) == [(r.seq, r.id, r.sha256) for r in rows]
    # an entry the appender did not write breaks the mapping: it stops rather than drift
    second.append([dataclasses.replace(leaf_entry(rows[0]), bundle_sha256="0" * 64)])
    _record(store, 3, 1)
    size = first.size()
    with pytest.raises(AuditLogConflict) as info:
        a.step()
    assert info.value.seq == rows[0].seq  # the seq the foreign last leaf claims
    with pytest.raises(AuditLogConflict):  # and again after a restart
        AuditAppender(store, first).step()
    assert first.size() == size  # nothing appended after the foreign entry
    first.close()
    second.close()
    store.close()


def test_run_signs_a_checkpoint_over_everything_and_refuses_without_its_key(env: Env) -> None:
    with pytest.raises(ConfigError, match="no audit log signing key"):
        run_audit_log(env.settings, until=lambda p: True)
    vkey = write_key(env.settings, name="some.other/origin")
    with pytest.raises(ConfigError, match="origin"):
        run_audit_log(env.settings, until=lambda p: True)
    vkey = write_key(env.settings)
    store = env.store()
    _record(store, 0, 12)
    progress = run_audit_log(env.settings, until=lambda p: p.caught_up, batch=5)
    assert progress.appended == len(store.since(0, 1000)) and progress.caught_up
    log = env.log()
    note = log.latest_checkpoint()
    assert note is not None
    cp = checkpoint.open(note, [vkey])
    assert cp.origin == env.settings.audit.origin and cp.size == log.size() == progress.appended
    rows = store.since(0, 1000)
    leaves = [merkle.leaf_hash(leaf_entry(r).canonical()) for r in rows]
    assert merkle.root_hash(leaves) == cp.root_hash
    # restarted later: only the new rows
    _record(store, 12, 2)
    again = run_audit_log(env.settings, until=lambda p: p.caught_up)
    assert again.appended == len(store.since(0, 1000)) - progress.appended
    assert verify_audit_log(store, log, [vkey], grace_seconds=0).ok
    log.close()
    store.close()


# -- verification -----------------------------------------------------------------------------------


def _logged(env: Env, n: int = 8) -> tuple[AuditStore, Ledger, str]:
    vkey = write_key(env.settings)
    store = env.store()
    _record(store, 0, n)
    run_audit_log(env.settings, until=lambda p: p.caught_up)
    return store, env.log(), vkey


def test_an_intact_log_verifies(env: Env) -> None:
    store, log, vkey = _logged(env)
    report = verify_audit_log(store, log, [vkey], grace_seconds=0)
    assert report.ok, report.problems
    assert report.rows_checked == report.leaves == log.size() > 8
    assert report.pending == 0 and report.log.checkpoints_checked >= 1
    log.close()
    store.close()


def test_a_deleted_row_is_named(env: Env) -> None:
    store, log, vkey = _logged(env)
    victim = store.since(0)[5]
    env.sql("DELETE FROM audit_events WHERE seq = ?", victim.seq)
    report = verify_audit_log(store, log, [vkey])
    assert not report.ok and report.log.ok
    assert report.first is not None
    assert (report.first.kind, report.first.seq, report.first.event_id) == ("missing", victim.seq, victim.id)
    assert report.problem_count == 1
    log.close()
    store.close()


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("body", None),  # the body edited, its stored hash left alone
        ("both", None),  # the body and its stored hash edited together
        ("patient_id", "someone-else"),  # hidden from the patient's access log
        ("outcome", "denied"),
        ("agent", "https://idp.example/auth|nobody"),
    ],
)
def test_an_edited_row_is_named(env: Env, column: str, value: str | None) -> None:
    store, log, vkey = _logged(env)
    rows = store.since(0)
    victim = rows[3]
    if column in ("body", "both"):
        body = victim.body.replace('"TREAT"', '"HMARKT"')
        assert body != victim.body
        env.sql("UPDATE audit_events SET body = ? WHERE seq = ?", body, victim.seq)
        if column == "both":
            env.sql(
                "UPDATE audit_events SET sha256 = ?, purpose = 'HMARKT' WHERE seq = ?",
                hashlib.sha256(body.encode()).hexdigest(),
                victim.seq,
            )
    else:
        env.sql(f"UPDATE audit_events SET {column} = ? WHERE seq = ?", value, victim.seq)
    report = verify_audit_log(store, log, [vkey])
    assert not report.ok and report.first is not None
    assert (report.first.kind, report.first.seq, report.first.event_id) == ("altered", victim.seq, victim.id)
    assert report.problem_count == 1
    log.close()
    store.close()


def test_a_row_added_among_logged_rows_is_named(env: Env) -> None:
    vkey = write_key(env.settings)
    store = env.store()
    _record(store, 0, 3)
    _skip_seq(env, 5)
    _record(store, 3, 3)
    run_audit_log(env.settings, until=lambda p: p.caught_up)
    log = env.log()
    rows = store.since(0)
    gap = next(a.seq + 1 for a, b in itertools.pairwise(rows) if b.seq - a.seq > 1)
    forged = events(99, patients=("pat-x",), when=T0)[0]
    _insert(env, gap, forged)
    report = verify_audit_log(store, log, [vkey])
    assert report.first is not None
    assert (report.first.kind, report.first.seq, report.first.event_id) == ("extra", gap, forged["id"])
    log.close()
    store.close()


def test_a_row_never_logged_fails_once_the_grace_period_is_over(env: Env) -> None:
    store, log, vkey = _logged(env, 4)
    store.record(events(50, when=T0))
    (late,) = store.since(log.entry(log.size() - 1).offset)
    fresh = verify_audit_log(store, log, [vkey], grace_seconds=300, now=T0 + timedelta(seconds=10))
    assert fresh.ok and fresh.pending == 1
    stale = verify_audit_log(store, log, [vkey], grace_seconds=300, now=T0 + timedelta(hours=1))
    assert not stale.ok and stale.first is not None
    assert (stale.first.kind, stale.first.seq, stale.first.event_id) == ("extra", late.seq, late.id)
    log.close()
    store.close()


def test_a_tampered_log_fails_its_own_audit(env: Env) -> None:
    store, log, vkey = _logged(env, 4)
    assert verify_audit_log(store, log, [vkey]).ok
    wrong = write_key(env.settings)  # another key: the checkpoints are not signed by it
    assert not verify_audit_log(store, log, [wrong]).ok
    log.close()
    store.close()


def _insert(env: Env, seq: int, event: dict[str, object]) -> None:
    """Insert ``event`` with an explicit seq, bypassing the store, as an intruder would."""
    override = "" if env.kind == "sqlite" else " OVERRIDING SYSTEM VALUE"
    env.sql(
        "INSERT INTO audit_events (seq, id, recorded, patient_id, agent, organization, purpose, break_glass,"
        f" outcome, body, sha256){override} VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        seq,
        *row_values(event),
    )
