"""The link history (``mpi_history``, append-only): the row format of its events and their appending.

Actions: ``auto-match``, ``possible-match``, ``link``, ``unlink`` (with actor, reason and the previous
state), ``record-updated``, ``person-merged`` and ``person-split`` (with the records moved). Events name
records by id and by insertion number (``rec_a``, ``rec_b``: ``mpi_patient.seq``), which the history is
searched by (:func:`bridge.stores.mpi.review.history_of`).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import orjson

from bridge.stores.mpi.db import Database

HISTORY_INSERT = (
    "INSERT INTO mpi_history (at, action, patient_a, patient_b, person_id, other_person_id, actor, reason, "
    "score, detail, rec_a, rec_b) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
#: the PostgreSQL types of :data:`HISTORY_INSERT`'s columns (``Database.insert_many``)
HISTORY_TYPES = ("text",) * 8 + ("double precision", "text", "bigint", "bigint")
#: the columns an event is read back with
HISTORY_COLUMNS = (
    "seq, at, action, patient_a, patient_b, person_id, other_person_id, actor, reason, score, detail"
)


def now() -> str:
    """The time stamp of history events and of rows' ``updated_at``: UTC, milliseconds, ``Z``."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def add_event(
    db: Database,
    action: str,
    a: tuple[str, int] | None,
    b: tuple[str, int] | None,
    person: str | None,
    actor: str | None,
    reason: str | None,
    score: float | None,
    detail: dict[str, Any] | None = None,
) -> None:
    """Append one history event; ``a`` and ``b`` are records as ``(patient id, seq)``."""
    db.execute(
        HISTORY_INSERT,
        (
            now(),
            action,
            a[0] if a else None,
            b[0] if b else None,
            person,
            None,
            actor,
            reason,
            score,
            orjson.dumps(detail).decode() if detail is not None else None,
            a[1] if a else None,
            b[1] if b else None,
        ),
    )
