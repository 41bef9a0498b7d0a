"""Break-the-glass windows: who broke the glass for which patient, why, and until when.

A window opens when a clinician of an allowed organisation reads a patient with an emergency purpose of
use and a reason (docs/consent.md). While it lasts, that clinician's emergency-purpose reads of the same
person override the person's deny provisions. Windows live in the audit database (``FHIRBRIDGE_AUDIT_URL``),
beside the AuditEvents that record them, and are kept after they expire: they are part of the record of
who saw what, and why.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass

import psycopg

from bridge.errors import TransientError
from bridge.stores.db import Database, SqliteTuning

#: a window must survive a crash the moment it opens, as its AuditEvent does
BREAK_GLASS_TUNING = SqliteTuning(synchronous="FULL", busy_timeout_ms=10_000)

SCHEMA = """
CREATE TABLE IF NOT EXISTS break_glass (
    agent TEXT NOT NULL,
    patient_id TEXT NOT NULL,
    organization TEXT NOT NULL,
    reason TEXT NOT NULL,
    started_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    PRIMARY KEY (agent, patient_id, started_at)
);
CREATE INDEX IF NOT EXISTS break_glass_patient ON break_glass (patient_id, expires_at)
"""


@dataclass(frozen=True, slots=True)
class Window:
    """An open break-the-glass window: the reason given when it opened, its start and its end (seconds
    since the epoch), and whether this request opened it."""

    reason: str
    started_at: int
    expires_at: int
    opened_now: bool = False
    agent: str = ""


class BreakGlassStore:
    """One connection (per thread) to the break-the-glass windows in the audit database."""

    def __init__(self, url: str) -> None:
        self.db = Database(url, BREAK_GLASS_TUNING)
        try:
            self.db.script(SCHEMA)
        except (sqlite3.Error, psycopg.Error, OSError) as exc:
            self.db.close()
            raise TransientError("the audit database is unavailable") from exc
        except TransientError:
            self.db.close()
            raise

    @classmethod
    def open(cls, url: str) -> BreakGlassStore:
        return cls(url)

    def close(self) -> None:
        self.db.close()

    def open_window(
        self,
        agent: str,
        organization: str,
        patient_ids: Sequence[str],
        reason: str,
        *,
        now: int,
        seconds: int,
    ) -> Window:
        """Open a window for ``agent`` over every record of the person (``patient_ids``), durably."""
        expires = now + seconds
        with self.db.transaction() as tx:
            tx.executemany(
                "INSERT INTO break_glass (agent, patient_id, organization, reason, started_at, expires_at) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                [(agent, pid, organization, reason, now, expires) for pid in dict.fromkeys(patient_ids)],
            )
        return Window(reason, now, expires, opened_now=True, agent=agent)

    def active(self, agent: str, patient_ids: Sequence[str], *, now: int) -> Window | None:
        """The latest window of ``agent`` still open at ``now`` over any of ``patient_ids``, else None."""
        ids = list(dict.fromkeys(patient_ids))
        if not ids:
            return None
        rows = self.db.query(
            "SELECT reason, started_at, expires_at FROM break_glass WHERE agent = ? AND expires_at > ? "
            f"AND started_at <= ? AND patient_id IN ({','.join('?' * len(ids))}) "
            "ORDER BY started_at DESC LIMIT 1",
            [agent, now, now, *ids],
        )
        if not rows:
            return None
        reason, started, expires = rows[0]
        return Window(str(reason), int(started), int(expires), agent=agent)

    def withdraw(self, window: Window) -> None:
        """Take back a window whose opening could not be audited: no override without its record."""
        with self.db.transaction() as tx:
            tx.execute(
                "DELETE FROM break_glass WHERE agent = ? AND started_at = ?",
                [window.agent, window.started_at],
            )

    def for_patients(self, patient_ids: Sequence[str]) -> list[dict[str, object]]:
        """Every window over any of ``patient_ids``, newest first (for the patient's access log)."""
        ids = list(dict.fromkeys(patient_ids))
        if not ids:
            return []
        rows = self.db.query(
            "SELECT agent, patient_id, organization, reason, started_at, expires_at FROM break_glass "
            f"WHERE patient_id IN ({','.join('?' * len(ids))}) ORDER BY started_at DESC",
            ids,
        )
        keys = ("agent", "patient_id", "organization", "reason", "started_at", "expires_at")
        return [dict(zip(keys, r, strict=True)) for r in rows]
