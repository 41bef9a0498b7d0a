"""The access audit store: every AuditEvent the service records, durably, before a response goes out.

One row per FHIR ``AuditEvent`` (``bridge.service.audit.events`` builds them, docs/audit.md):

* ``seq``: the insertion number (``AUTOINCREMENT`` on SQLite, an identity column on PostgreSQL; never
  reused, may have gaps on PostgreSQL), the order of the audit log's leaves;
* ``id``, ``recorded``, ``patient_id``, ``agent`` (``issuer|subject``), ``organization``, ``purpose``,
  ``break_glass``, ``outcome``: columns read from the event, for the access-log and ``AuditEvent?``
  queries (``audit verify`` checks that they still match the body);
* ``body``: the event's canonical JSON (sorted keys, no whitespace, UTF-8; :func:`canonical`), and
  ``sha256``: its SHA-256, the hash the audit log commits to.

:meth:`AuditStore.record` writes one access's events in one durable transaction (SQLite
``synchronous=FULL``; PostgreSQL's default durability) and raises :class:`~bridge.errors.TransientError`
when the database cannot be written, so that the service answers 503 and releases no data.

**The appender never skips a row.** It reads ``since(last seq)``, so it must never read past a row
that is not visible yet but will be. SQLite has one writer at a time: rows become visible in ``seq``
order. PostgreSQL draws sequence numbers outside transactions, so concurrent accesses may commit out of
order. There, :meth:`AuditStore.record` holds a *shared* transaction-scoped advisory lock from before it
draws its numbers until its commit is visible (concurrent accesses do not wait for each other, and
PostgreSQL's group commit still works), and :meth:`AuditStore.horizon` takes the same lock *exclusively*
for an instant: once it has it, every number drawn so far belongs to a finished transaction, so the
rows up to the largest ``seq`` it then sees are all the rows there will ever be up to it. The appender
reads no further than that horizon. (The identity sequence keeps PostgreSQL's default cache of 1: a
session caching numbers could draw one below the horizon later.)

The leaf of a row in the audit log (:func:`leaf_entry`) is a :class:`~ledger.log.LedgerEntry` that holds
no PHI: the event's hash, the accessing organisation, the row's ``seq`` and ``recorded`` time and the
event's random id.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import orjson
import psycopg

from bridge.config import Settings
from bridge.errors import FhirbridgeError, TransientError
from bridge.logging import get_logger
from bridge.stores.db import Database, SqliteTuning
from bridge.stores.ledger import open_ledger
from ledger.log import Ledger, LedgerEntry

log = get_logger(__name__)

# -- the codes the columns are read by (the event builder uses the same constants) -------------------
OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
PARTICIPATION_TYPE = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
ROLE_CLASS = "http://terminology.hl7.org/CodeSystem/v3-RoleClass"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
#: AuditEvent.outcome codes (http://hl7.org/fhir/audit-event-outcome) by the service's outcome word
OUTCOME_CODES = {"success": "0", "denied": "4", "error": "8"}
_OUTCOME_WORDS = {"0": "success", "4": "denied", "8": "error", "12": "error"}
#: the user (information recipient), the client application (DICOM Source Role ID; Destination Role ID
#: for a read, where BALP has the data flow to the client), the user's organisation, break-the-glass
USER_TYPE = (PARTICIPATION_TYPE, "IRCP")
SOURCE_ROLE, DESTINATION_ROLE = (DCM, "110153"), (DCM, "110152")
RESTFUL_INTERACTION = "http://hl7.org/fhir/restful-interaction"
READ_INTERACTIONS = frozenset({"read", "vread"})
ORGANIZATION_TYPE = (ROLE_CLASS, "PROV")
PATIENT_ROLE = (OBJECT_ROLE, "1")
BREAK_GLASS = (ACT_REASON, "BTG")

# -- the audit log's leaves -------------------------------------------------------------------------
LEAF_ADAPTER = "audit"
LEAF_ADAPTER_VERSION = "balp"
LEAF_TOPIC = "audit"
NO_ORGANIZATION = "-"

#: ``synchronous=FULL``: an access is answered only once its audit rows would survive a power cut
AUDIT_TUNING = SqliteTuning(synchronous="FULL", busy_timeout_ms=10_000)
#: the key of PostgreSQL's transaction-scoped advisory lock: shared by inserting accesses, exclusive for
#: an instant when the appender takes its horizon (any constant)
_PG_LOCK = 0x41554449_54000001

_COLUMNS = "id, recorded, patient_id, agent, organization, purpose, break_glass, outcome, body, sha256"
_SELECT = f"SELECT seq, {_COLUMNS} FROM audit_events"
_INSERT = f"INSERT INTO audit_events ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
_TABLE = """CREATE TABLE IF NOT EXISTS audit_events (
    seq {seq},
    id TEXT NOT NULL UNIQUE,
    recorded TEXT NOT NULL,
    patient_id TEXT,
    agent TEXT,
    organization TEXT,
    purpose TEXT,
    break_glass BOOLEAN NOT NULL,
    outcome TEXT NOT NULL,
    body TEXT NOT NULL,
    sha256 TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_events_patient ON audit_events (patient_id, seq);
CREATE INDEX IF NOT EXISTS audit_events_agent ON audit_events (agent, seq)"""
SCHEMA = {
    "sqlite": _TABLE.replace("{seq}", "INTEGER PRIMARY KEY AUTOINCREMENT"),
    "postgres": _TABLE.replace("{seq}", "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY"),
}


#: what a database failure surfaces as: any of them means the events are not (known to be) stored
_DB_ERRORS = (sqlite3.Error, psycopg.Error, OSError, TransientError)


class AuditError(FhirbridgeError):
    """An audit store or audit log error; the message holds no PHI."""


class AuditInputError(AuditError):
    """An event that cannot be stored (not an AuditEvent, no id, not JSON); ``index`` is its position."""

    def __init__(self, problem: str, *, index: int) -> None:
        super().__init__(f"audit event {index}: {problem}")
        self.problem = problem
        self.index = index


@dataclass(frozen=True, slots=True)
class AuditColumns:
    """What the store indexes of an AuditEvent (see :func:`columns`)."""

    id: str
    recorded: str
    patient_id: str | None
    agent: str | None
    organization: str | None
    purpose: str | None
    break_glass: bool
    outcome: str


class LeafRow(NamedTuple):
    """The columns of an audit row its leaf is made of."""

    seq: int
    id: str
    recorded: str
    organization: str | None
    sha256: str


_LEAF_COLUMNS = "seq, id, recorded, organization, sha256"


@dataclass(frozen=True, slots=True)
class AuditRow:
    """A stored AuditEvent. ``body`` is its canonical JSON; ``sha256`` the hash written with it."""

    seq: int
    id: str
    recorded: str
    patient_id: str | None
    agent: str | None
    organization: str | None
    purpose: str | None
    break_glass: bool
    outcome: str
    body: str
    sha256: str

    def event(self) -> dict[str, Any]:
        """The AuditEvent resource (parsed from ``body``)."""
        parsed: dict[str, Any] = orjson.loads(self.body)
        return parsed

    def body_sha256(self) -> str:
        """SHA-256 of ``body`` as stored now (differs from ``sha256`` when the body was edited)."""
        return hashlib.sha256(self.body.encode("utf-8")).hexdigest()

    def columns(self) -> AuditColumns:
        return AuditColumns(
            self.id,
            self.recorded,
            self.patient_id,
            self.agent,
            self.organization,
            self.purpose,
            self.break_glass,
            self.outcome,
        )


def canonical(event: Mapping[str, Any]) -> bytes:
    """The canonical JSON of an AuditEvent: keys sorted, no whitespace, UTF-8 (the events hold strings,
    booleans, lists and objects only, for which this is RFC 8785's form). Raises TypeError when it is not
    JSON."""
    return orjson.dumps(event, option=orjson.OPT_SORT_KEYS)


def _codings(value: Any) -> list[tuple[str | None, str | None]]:
    """The (system, code) pairs of a Coding, a CodeableConcept, or a list of either."""
    items = value if isinstance(value, list) else [value]
    out: list[tuple[str | None, str | None]] = []
    for item in items:
        if not isinstance(item, dict):
            continue
        codings = item["coding"] if isinstance(item.get("coding"), list) else [item]
        for c in codings:
            if isinstance(c, dict):
                out.append((c.get("system"), c.get("code")))
    return out


def _identifier_key(who: Any) -> str | None:
    ident = who.get("identifier") if isinstance(who, dict) else None
    if not isinstance(ident, dict) or not isinstance(ident.get("value"), str):
        return None
    system = ident.get("system")
    return f"{system}|{ident['value']}" if isinstance(system, str) else str(ident["value"])


def client_role_of(event: Mapping[str, Any]) -> tuple[str, str]:
    """The DICOM role code of the client agent: Destination Role ID for a read, else Source Role ID."""
    for system, code in _codings(event.get("subtype") or []):
        if system == RESTFUL_INTERACTION and code in READ_INTERACTIONS:
            return DESTINATION_ROLE
    return SOURCE_ROLE


def columns(event: Mapping[str, Any]) -> AuditColumns:
    """The indexed columns of an AuditEvent built by ``bridge.service.audit.events``:

    * ``patient_id``: the id in ``entity.what`` of the entity whose role is object-role 1 (Patient);
    * ``agent``: ``system|value`` of the user agent's (IRCP) ``who.identifier`` (the token's issuer and
      subject), else of the client agent's (issuer and ``client_id``);
    * ``organization``: ``who.identifier.value`` of the PROV agent;
    * ``purpose``: the first ``purposeOfEvent`` code but BTG (``system|code`` outside v3 ActReason);
    * ``break_glass``: whether ``purposeOfEvent`` holds v3 ActReason BTG;
    * ``outcome``: ``success`` (0), ``denied`` (4) or ``error`` (8, 12).

    Raises :class:`AuditInputError` (index 0) without an ``id``, ``recorded`` or a known ``outcome``.
    """
    if not isinstance(event, Mapping) or event.get("resourceType") != "AuditEvent":
        raise AuditInputError("not an AuditEvent", index=0)
    ev_id, recorded = event.get("id"), event.get("recorded")
    if not isinstance(ev_id, str) or not ev_id or not isinstance(recorded, str) or not recorded:
        raise AuditInputError("an AuditEvent needs an id and a recorded time", index=0)
    outcome = _OUTCOME_WORDS.get(str(event.get("outcome")))
    if outcome is None:
        raise AuditInputError("unknown outcome code", index=0)
    patient = None
    for ent in event.get("entity") or ():
        if isinstance(ent, dict) and PATIENT_ROLE in _codings(ent.get("role")):
            ref = (ent.get("what") or {}).get("reference")
            if isinstance(ref, str):
                patient = ref.split("/", 1)[1] if ref.startswith("Patient/") else ref
                break
    user = client = org = None
    client_role = client_role_of(event)
    for agent in event.get("agent") or ():
        if not isinstance(agent, dict):
            continue
        types = _codings(agent.get("type"))
        who = agent.get("who")
        if USER_TYPE in types and user is None:
            user = _identifier_key(who)
        elif client_role in types and client is None:
            client = _identifier_key(who)
        elif ORGANIZATION_TYPE in types and org is None:
            ident = who.get("identifier") if isinstance(who, dict) else None
            value = ident.get("value") if isinstance(ident, dict) else None
            org = value if isinstance(value, str) else None
    reasons = _codings(event.get("purposeOfEvent") or [])
    purpose = next(
        (
            code if system == ACT_REASON else f"{system}|{code}"
            for system, code in reasons
            if (system, code) != BREAK_GLASS
        ),
        None,
    )
    return AuditColumns(
        ev_id, recorded, patient, user or client, org, purpose, BREAK_GLASS in reasons, outcome
    )


def row_values(event: Mapping[str, Any]) -> tuple[Any, ...]:
    """The values of ``event``'s row, in the order of the store's columns (``id`` .. ``sha256``: the
    columns, the canonical body and its SHA-256). Raises :class:`AuditInputError` or TypeError."""
    cols = columns(event)
    body = canonical(event)
    return (
        cols.id,
        cols.recorded,
        cols.patient_id,
        cols.agent,
        cols.organization,
        cols.purpose,
        cols.break_glass,
        cols.outcome,
        body.decode("utf-8"),
        hashlib.sha256(body).hexdigest(),
    )


def leaf_entry(row: AuditRow | LeafRow) -> LedgerEntry:
    """The audit log's leaf for ``row``: no PHI (the hash of the event, whose random id makes it
    unguessable; the organisation; the row's ``seq`` as ``offset``, its time, the event id)."""
    return LedgerEntry(
        bundle_sha256=row.sha256,
        source_org=row.organization or NO_ORGANIZATION,
        adapter=LEAF_ADAPTER,
        adapter_version=LEAF_ADAPTER_VERSION,
        topic=LEAF_TOPIC,
        partition=0,
        offset=row.seq,
        ingested_at=row.recorded,
        message_id=row.id,
    )


def _row(r: Sequence[Any]) -> AuditRow:
    return AuditRow(int(r[0]), r[1], r[2], r[3], r[4], r[5], r[6], bool(r[7]), r[8], str(r[9]), r[10])


class AuditStore:
    """One connection (per thread) to the audit database. Any number of processes may :meth:`record`;
    the audit log has one appender (``fhirbridge audit run``)."""

    def __init__(self, url: str) -> None:
        self.db = Database(url, AUDIT_TUNING)
        try:
            # DDL only when the table is missing: on PostgreSQL even CREATE INDEX IF NOT EXISTS takes a
            # lock that waits for every insert in flight
            exists = (
                "SELECT to_regclass('audit_events') IS NOT NULL"
                if self.db.kind == "postgres"
                else "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = 'audit_events'"
            )
            if not self.db.query(exists)[0][0]:
                self.db.script(SCHEMA[self.db.kind])
        except _DB_ERRORS as exc:
            self.db.close()
            raise TransientError("the audit database is unavailable") from exc

    @classmethod
    def open(cls, url: str) -> AuditStore:
        """Open (creating its table) the audit store at ``sqlite:///path`` or ``postgresql://...``.
        Raises :class:`~bridge.errors.ConfigError` for another URL, :class:`TransientError` when the
        database cannot be reached or created. Reads raise :class:`TransientError` too."""
        return cls(url)

    def close(self) -> None:
        self.db.close()

    # -- writes ---------------------------------------------------------------------------------
    def record(self, events: Sequence[Mapping[str, Any]]) -> None:
        """Store one access's AuditEvents in one durable transaction: when this returns, every one of them
        is committed; when it raises, none is.

        Raises :class:`AuditInputError` for an event that is not a storable AuditEvent (nothing is
        written) and :class:`~bridge.errors.TransientError` when the database did not take them
        (unreachable, locked past the busy timeout, disk full, a constraint): either way the caller must
        not release the data (the service answers 503).
        """
        if not events:
            return
        rows = []
        for i, ev in enumerate(events):
            try:
                rows.append(row_values(ev))
            except AuditInputError as exc:
                raise AuditInputError(exc.problem, index=i) from None
            except TypeError:
                raise AuditInputError("not JSON-serialisable", index=i) from None
        try:
            with self.db.transaction() as tx:
                if tx.kind == "postgres":
                    # held until the commit is visible, so that horizon() waits for this access
                    tx.execute("SELECT pg_advisory_xact_lock_shared(?)", [_PG_LOCK])
                tx.executemany(_INSERT, rows)
        except _DB_ERRORS as exc:
            # a failed COMMIT can leave SQLite's transaction open: start over on a new connection
            self.db.close()
            log.warning("audit.record_failed", events=len(rows), error=type(exc).__name__)
            raise TransientError("the audit events could not be stored") from exc

    # -- reads ----------------------------------------------------------------------------------
    def _query(self, sql: str, params: Sequence[Any]) -> list[AuditRow]:
        try:
            return [_row(r) for r in self.db.query(sql, params)]
        except _DB_ERRORS as exc:
            self.db.close()
            raise TransientError("the audit database is unavailable") from exc

    def _page(
        self, column: str, value: str, limit: int, after: int | None, descending: bool
    ) -> list[AuditRow]:
        if limit < 1:
            return []
        order = "DESC" if descending else "ASC"
        where = f"{column} = ?"
        params: list[Any] = [value]
        if after is not None:
            where += " AND seq < ?" if descending else " AND seq > ?"
            params.append(after)
        params.append(limit)
        return self._query(f"{_SELECT} WHERE {where} ORDER BY seq {order} LIMIT ?", params)

    def for_patient(
        self, patient_id: str, *, limit: int = 100, after: int | None = None, descending: bool = False
    ) -> list[AuditRow]:
        """The events naming ``patient_id``, in ``seq`` order (newest first with ``descending``), at most
        ``limit``, continuing after the row whose ``seq`` is ``after`` (the last of the previous page)."""
        return self._page("patient_id", patient_id, limit, after, descending)

    def for_agent(
        self, agent: str, *, limit: int = 100, after: int | None = None, descending: bool = False
    ) -> list[AuditRow]:
        """The events of ``agent`` (``issuer|subject``), paged like :meth:`for_patient`."""
        return self._page("agent", agent, limit, after, descending)

    def since(self, seq: int, limit: int = 1000, *, upto: int | None = None) -> list[AuditRow]:
        """The rows with a ``seq`` above ``seq`` (and at most ``upto``), in ``seq`` order, at most ``limit``."""
        if upto is None:
            return self._query(f"{_SELECT} WHERE seq > ? ORDER BY seq LIMIT ?", [seq, limit])
        return self._query(f"{_SELECT} WHERE seq > ? AND seq <= ? ORDER BY seq LIMIT ?", [seq, upto, limit])

    def leaves_since(self, seq: int, limit: int = 1000, *, upto: int | None = None) -> list[LeafRow]:
        """What :meth:`since` returns, without the bodies: what the appender needs for the leaves."""
        sql = f"SELECT {_LEAF_COLUMNS} FROM audit_events WHERE seq > ?"
        params: list[Any] = [seq]
        if upto is not None:
            sql += " AND seq <= ?"
            params.append(upto)
        params.append(limit)
        try:
            return [LeafRow(int(r[0]), *r[1:]) for r in self.db.query(sql + " ORDER BY seq LIMIT ?", params)]
        except _DB_ERRORS as exc:
            self.db.close()
            raise TransientError("the audit database is unavailable") from exc

    def horizon(self) -> int | None:
        """The largest ``seq`` up to which no row can still appear (None: no limit, on SQLite).

        On PostgreSQL this waits for the accesses being recorded to commit (see the module docstring);
        new ones wait for it in turn, for the time of one ``MAX(seq)``. Raises :class:`TransientError`.
        """
        if self.db.kind != "postgres":
            return None
        try:
            with self.db.transaction() as tx:
                tx.execute("SELECT pg_advisory_xact_lock(?)", [_PG_LOCK])
                (top,) = tx.query("SELECT COALESCE(MAX(seq), 0) FROM audit_events")[0]
        except _DB_ERRORS as exc:
            self.db.close()
            raise TransientError("the audit database is unavailable") from exc
        return int(top)

    def iter_all(self, batch: int = 10_000) -> Iterator[list[AuditRow]]:
        """Every row in ``seq`` order, ``batch`` at a time (``audit verify``)."""
        last = 0
        while True:
            rows = self.since(last, batch)
            if not rows:
                return
            yield rows
            last = rows[-1].seq

    def get(self, event_id: str) -> AuditRow | None:
        """The row of the AuditEvent ``event_id``, or None."""
        rows = self._query(f"{_SELECT} WHERE id = ?", [event_id])
        return rows[0] if rows else None


def open_audit_log(settings: Settings, *, signer_key: str | None = None) -> Ledger:
    """The audit log of ``settings`` (its own database, origin and key; the ledger's checkpoint cadence):
    a reader without ``signer_key``, the appender with it. Raises what
    :func:`bridge.stores.ledger.open_ledger` raises."""
    return open_ledger(
        settings.audit.log_url,
        origin=settings.audit.origin,
        signer_key=signer_key,
        checkpoint_every=settings.ledger.checkpoint_every,
        checkpoint_interval_ms=settings.ledger.checkpoint_interval_ms,
    )
