"""The review side of the index: the review queue, a person's link set, the link history, and the
manual decisions (link, unlink) that a reviewer takes.

A manual decision sets the pair's state with ``origin = manual`` (actor, reason, time); the matcher
never writes over it. Persons are then rebuilt through the database (:func:`bridge.stores.mpi.persons.recluster`
without the person graph, which the decision drops: it is rare) and the generation token is replaced,
so that the ingesting process, which may keep persons in memory, reads them again.
"""

from __future__ import annotations

from typing import Any

import orjson

from bridge.stores.mpi import history
from bridge.stores.mpi.config import MatchState, MpiConflict, MpiError, MpiInputError, MpiNotFound
from bridge.stores.mpi.db import Database
from bridge.stores.mpi.features import Features
from bridge.stores.mpi.history import HISTORY_COLUMNS
from bridge.stores.mpi.persons import recluster, resolve_person
from bridge.stores.mpi.state import IndexState

MATCH = MatchState.MATCH.value
POSSIBLE = MatchState.POSSIBLE_MATCH.value
NO_MATCH = MatchState.NO_MATCH.value


def _require(db: Database, *patient_ids: str) -> dict[str, int]:
    """The seq of each record; raises :class:`MpiNotFound` for an unknown one."""
    found: dict[str, int] = {
        pid: int(seq)
        for pid, seq in db.all_in(
            "SELECT patient_id, seq FROM mpi_patient WHERE patient_id IN ({in})", list(patient_ids)
        )
    }
    for pid in patient_ids:
        if pid not in found:
            raise MpiNotFound("Patient", pid)
    return found


def _manual(db: Database, a: str, b: str, decision: str, actor: str, reason: str | None) -> None:
    """Store a manual decision on the pair (``decision``: MATCH or NO_MATCH) and its history event."""
    if not isinstance(actor, str) or not actor.strip():
        raise MpiInputError("a manual decision needs an actor")
    if a == b:
        raise MpiInputError("a record cannot be linked to or unlinked from itself")
    seq = _require(db, a, b)
    x, y = (a, b) if a < b else (b, a)
    hi, lo = sorted((seq[a], seq[b]), reverse=True)
    now = history.now()
    prev = db.one("SELECT state, score, origin FROM mpi_pair WHERE rec_hi = ? AND rec_lo = ?", (hi, lo))
    db.execute(
        "INSERT INTO mpi_pair (rec_hi, rec_lo, patient_a, patient_b, state, score, origin, actor, reason, "
        "updated_at) VALUES (?, ?, ?, ?, ?, ?, 'manual', ?, ?, ?) ON CONFLICT (rec_hi, rec_lo) DO UPDATE SET "
        "state = excluded.state, origin = 'manual', actor = excluded.actor, reason = excluded.reason, "
        "updated_at = excluded.updated_at",
        (hi, lo, x, y, decision, prev[1] if prev else None, actor, reason, now),
    )
    detail = {"previous_state": prev[0], "previous_origin": prev[2]} if prev else None
    history.add_event(
        db,
        "link" if decision == MATCH else "unlink",
        (x, seq[x]),
        (y, seq[y]),
        None,
        actor,
        reason,
        prev[1] if prev else None,
        detail,
    )


def link(state: IndexState, patient_a: str, patient_b: str, actor: str, reason: str | None = None) -> None:
    """:meth:`PersonIndex.link`, in one write transaction."""
    with state.db.write():
        state.graph = None  # the database path: a manual decision is rare
        _manual(state.db, patient_a, patient_b, MATCH, actor, reason)
        persons = recluster(
            state, [patient_a, patient_b], history.now(), actor=actor, manual_link=(patient_a, patient_b)
        )
        state.touch()
        if persons.get(patient_a) != persons.get(patient_b):  # pragma: no cover - manual links always join
            raise MpiError("internal error: a manual link did not join the records")


def unlink(state: IndexState, patient_a: str, patient_b: str, actor: str, reason: str | None = None) -> None:
    """:meth:`PersonIndex.unlink`, in one write transaction."""
    with state.db.write():
        state.graph = None
        _manual(state.db, patient_a, patient_b, NO_MATCH, actor, reason)
        persons = recluster(state, [patient_a, patient_b], history.now(), actor=actor)
        state.touch()
        if persons.get(patient_a) == persons.get(patient_b):
            raise MpiConflict(
                f"records {patient_a!r} and {patient_b!r} are still joined by other manual links; unlink those first"
            )


def person(db: Database, person_id: str) -> dict[str, Any]:
    """The link set of a person: records (with source org), pairs among them and open possible matches.

    Follows merge aliases (``id`` is the live id; ``requested_id`` what was asked). Raises
    :class:`MpiNotFound` for an unknown id.
    """
    with db.read():
        live = resolve_person(db, person_id)
        if live is None:
            raise MpiNotFound("Person", person_id)
        recs = db.all(
            "SELECT patient_id, source_org, seq, updated_at FROM mpi_patient WHERE person_id = ? "
            "ORDER BY seq",
            (live,),
        )
        idset = {r[0] for r in recs}
        seqs = sorted(int(r[2]) for r in recs)
        found: dict[tuple[str, str], tuple[Any, ...]] = {}
        for side in ("rec_hi", "rec_lo"):
            for r in db.all_in(
                "SELECT patient_a, patient_b, state, score, origin, actor, reason, updated_at "
                f"FROM mpi_pair WHERE {side} IN ({{in}})",
                seqs,
            ):
                found[(r[0], r[1])] = r
        pairs = list(found.values())
        others = sorted({p for r in pairs for p in r[:2]} - idset)
        person_of = {
            r[0]: r[1]
            for r in db.all_in(
                "SELECT patient_id, person_id FROM mpi_patient WHERE patient_id IN ({in})", others
            )
        }
    links = []
    for a, b, state, score, origin, actor, reason, updated in sorted(pairs):
        inside = a in idset and b in idset
        entry: dict[str, Any] = {
            "patient_a": a,
            "patient_b": b,
            "state": state,
            "score": score,
            "origin": origin,
            "updated_at": updated,
        }
        if origin == "manual":
            entry["actor"] = actor
            if reason:
                entry["reason"] = reason
        if not inside:
            if state != POSSIBLE:
                continue
            entry["other_person_id"] = person_of.get(b if a in idset else a)
        links.append(entry)
    return {
        "id": live,
        "requested_id": person_id,
        "patients": [{"patient_id": r[0], "source_org": r[1], "updated_at": r[3]} for r in recs],
        "links": links,
    }


def review_queue(db: Database, limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
    """Open POSSIBLE_MATCH pairs (records still in different persons), best score first.

    Each item has both record ids, source orgs, person ids, the score and the compared demographics.
    Raises :class:`MpiInputError` for a negative limit/offset.
    """
    if limit < 0 or offset < 0:
        raise MpiInputError("limit and offset must not be negative")
    rows = db.all(
        "SELECT p.patient_a, p.patient_b, p.score, p.updated_at, a.source_org, b.source_org, a.person_id, "
        "b.person_id, a.features, b.features FROM mpi_pair p "
        "JOIN mpi_patient a ON a.patient_id = p.patient_a JOIN mpi_patient b ON b.patient_id = p.patient_b "
        f"WHERE p.state = '{POSSIBLE}' AND a.person_id <> b.person_id "
        "ORDER BY p.score DESC, p.patient_a, p.patient_b LIMIT ? OFFSET ?",
        (limit, offset),
    )
    out = []
    for a, b, score, updated, org_a, org_b, per_a, per_b, fa, fb in rows:
        out.append(
            {
                "patient_a": a,
                "patient_b": b,
                "score": score,
                "updated_at": updated,
                "source_a": org_a,
                "source_b": org_b,
                "person_a": per_a,
                "person_b": per_b,
                "demographics_a": _public(orjson.loads(fa)),
                "demographics_b": _public(orjson.loads(fb)),
            }
        )
    return out


def history_of(db: Database, person_or_patient_id: str) -> list[dict[str, Any]]:
    """Link changes touching a record, or a person (its current records and its id), oldest first."""
    with db.read():
        live = resolve_person(db, person_or_patient_id)
        if live is not None:
            recs = sorted(
                int(r[0]) for r in db.all("SELECT seq FROM mpi_patient WHERE person_id = ?", (live,))
            )
            ids = {person_or_patient_id, live}
            ids |= {r[0] for r in db.all("SELECT old_id FROM mpi_alias WHERE person_id = ?", (live,))}
            rows = db.all_in(f"SELECT {HISTORY_COLUMNS} FROM mpi_history WHERE rec_a IN ({{in}})", recs)
            rows += db.all_in(f"SELECT {HISTORY_COLUMNS} FROM mpi_history WHERE rec_b IN ({{in}})", recs)
            rows += db.all_in(
                f"SELECT {HISTORY_COLUMNS} FROM mpi_history WHERE person_id IN ({{in}})", sorted(ids)
            )
            rows += db.all_in(
                f"SELECT {HISTORY_COLUMNS} FROM mpi_history WHERE other_person_id IN ({{in}})",
                sorted(ids),
            )
        else:
            row = db.one("SELECT seq FROM mpi_patient WHERE patient_id = ?", (person_or_patient_id,))
            if row is None:
                raise MpiNotFound("Patient or Person", person_or_patient_id)
            rows = db.all(
                f"SELECT {HISTORY_COLUMNS} FROM mpi_history WHERE rec_a = ? "
                f"UNION ALL SELECT {HISTORY_COLUMNS} FROM mpi_history WHERE rec_b = ?",
                (row[0], row[0]),
            )
            rows += db.all(
                f"SELECT {HISTORY_COLUMNS} FROM mpi_history WHERE detail LIKE ?",
                (f'%"{person_or_patient_id}"%',),
            )
    seen: dict[int, dict[str, Any]] = {}
    for seq, at, action, a, b, person, other, actor, reason, score, detail in rows:
        entry: dict[str, Any] = {"seq": int(seq), "at": at, "action": action}
        for k, v in (
            ("patient_a", a),
            ("patient_b", b),
            ("person_id", person),
            ("other_person_id", other),
            ("actor", actor),
            ("reason", reason),
            ("score", score),
        ):
            if v is not None:
                entry[k] = v
        if detail:
            entry["detail"] = orjson.loads(detail)
        seen[int(seq)] = entry
    return [seen[k] for k in sorted(seen)]


def _public(f: Features) -> dict[str, Any]:
    """The human-readable part of a feature record, for reviewers."""
    keys = {
        "g": "given",
        "f": "family",
        "b": "birth_date",
        "s": "sex",
        "a": "address",
        "c": "city",
        "z": "postal_code",
        "t": "phone",
    }
    out: dict[str, Any] = {name: f[k] for k, name in keys.items() if f.get(k)}
    if f.get("i"):
        out["identifiers"] = [{"system": s, "value": v} for s, v in f["i"]]
    return out
