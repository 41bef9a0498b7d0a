"""Bulk Data export jobs, their files and the groups of patients they may export (docs/bulk.md).

:class:`ExportStore` keeps, in its own database (``FHIRBRIDGE_EXPORT_DB``, SQLite or PostgreSQL through
:mod:`bridge.stores.db`):

* ``export_jobs``: one row per kick-off: who asked (``issuer|client_id``), what (kind, group,
  parameters), its state (``running``, ``complete``, ``failed``, ``cancelled``), the ledger checkpoint
  it is pinned to, and when it expires;
* ``export_files``: every NDJSON file a job wrote: its type, line count, SHA-256, and the patients whose
  resources it holds (patient id -> lines), which the audit of each download names;
* ``export_groups`` and ``export_group_members``: the groups of patients defined with
  ``fhirbridge groups``.

The second half of the module reads the resource index for an export, through ``IndexStore.db`` and
read-only: keyset pages by ``(resource_type, id)`` with the bodies as stored (:func:`resource_page`),
a group's records by patient (:func:`patient_resources`), the types present (:func:`resource_types`),
the source organisations' Patient records (:func:`organization_patients`) and the patients with a
Consent (:func:`consenting_patients`).
"""

from __future__ import annotations

import hashlib
import re
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import psycopg

from bridge.errors import FhirbridgeError, TransientError
from bridge.stores.db import Database, SqliteTuning
from bridge.stores.index.store import StoredResource

#: a job's state must survive a crash once the kick-off has been answered with its status URL
EXPORT_TUNING = SqliteTuning(synchronous="FULL", busy_timeout_ms=10_000)

RUNNING, COMPLETE, FAILED, CANCELLED = "running", "complete", "failed", "cancelled"
STATES = (RUNNING, COMPLETE, FAILED, CANCELLED)
#: a FHIR id: what a group id must be
FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
#: the prefix of the groups derived from source organisations (a defined group may not use it)
ORG_GROUP_PREFIX = "org-"

SCHEMA = """
CREATE TABLE IF NOT EXISTS export_jobs (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    kind TEXT NOT NULL,
    group_id TEXT,
    request TEXT NOT NULL,
    params TEXT NOT NULL,
    status TEXT NOT NULL,
    progress TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    transaction_time TEXT,
    tree_size BIGINT,
    checkpoint TEXT,
    error TEXT
);
CREATE INDEX IF NOT EXISTS export_jobs_expiry ON export_jobs (expires_at);
CREATE TABLE IF NOT EXISTS export_files (
    job_id TEXT NOT NULL,
    name TEXT NOT NULL,
    kind TEXT NOT NULL,
    resource_type TEXT NOT NULL,
    seq INTEGER NOT NULL,
    lines BIGINT NOT NULL,
    bytes BIGINT NOT NULL,
    sha256 TEXT NOT NULL,
    patients TEXT NOT NULL,
    PRIMARY KEY (job_id, name)
);
CREATE TABLE IF NOT EXISTS export_groups (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS export_group_members (
    group_id TEXT NOT NULL,
    patient_id TEXT NOT NULL,
    PRIMARY KEY (group_id, patient_id)
)
"""


class ExportError(FhirbridgeError):
    """A request the export store refuses (an unknown group, a bad group id); no PHI in the message."""


@dataclass(frozen=True, slots=True)
class Job:
    """One export job as stored. Times are seconds since the epoch; ``params`` is the parsed request."""

    id: str
    owner: str
    kind: str
    group_id: str | None
    request: str
    params: dict[str, Any]
    status: str
    progress: str
    created_at: int
    expires_at: int
    transaction_time: str | None
    tree_size: int | None
    checkpoint: str | None
    error: str | None


@dataclass(frozen=True, slots=True)
class ExportFile:
    """One NDJSON file of a job: ``kind`` ``output`` or ``error``; ``patients`` patient id -> lines."""

    job_id: str
    name: str
    kind: str
    resource_type: str
    seq: int
    lines: int
    bytes: int
    sha256: str
    patients: dict[str, int]


@dataclass(frozen=True, slots=True)
class Group:
    """A group defined with ``fhirbridge groups create``: its id, name and member Patient ids."""

    id: str
    name: str
    created_at: int
    members: tuple[str, ...]


_JOB_COLUMNS = (
    "id, owner, kind, group_id, request, params, status, progress, created_at, expires_at, "
    "transaction_time, tree_size, checkpoint, error"
)


def _job(row: Sequence[Any]) -> Job:
    (jid, owner, kind, gid, request, params, status, progress, created, expires, tt, size, cp, err) = row
    return Job(
        str(jid),
        str(owner),
        str(kind),
        gid,
        str(request),
        orjson.loads(params),
        str(status),
        str(progress),
        int(created),
        int(expires),
        tt,
        None if size is None else int(size),
        cp,
        err,
    )


class ExportStore:
    """One connection (per thread) to the export jobs' database."""

    def __init__(self, url: str) -> None:
        self.db = Database(url, EXPORT_TUNING)
        try:
            self.db.script(SCHEMA)
        except (sqlite3.Error, psycopg.Error, OSError) as exc:
            self.db.close()
            raise TransientError("the export database is unavailable") from exc
        except TransientError:
            self.db.close()
            raise

    @classmethod
    def open(cls, url: str) -> ExportStore:
        return cls(url)

    def close(self) -> None:
        self.db.close()

    # -- jobs -----------------------------------------------------------------------------------
    def create_job(
        self,
        job_id: str,
        *,
        owner: str,
        kind: str,
        group_id: str | None,
        request: str,
        params: dict[str, Any],
        now: int,
        expires_at: int,
        max_running: int | None = None,
        tree_size: int | None = None,
        checkpoint: str | None = None,
    ) -> bool:
        """Record a new job as ``running`` (durably: its status URL is about to be handed out), pinned to
        ``checkpoint`` of ``tree_size``; False (nothing recorded) when ``max_running`` jobs run already
        (counted and inserted in one transaction, so two kick-offs cannot both take the last place)."""
        with self.db.transaction() as tx:
            if max_running is not None:
                if self.db.kind == "postgres":  # SQLite's BEGIN IMMEDIATE already serialises writers
                    tx.execute("LOCK TABLE export_jobs IN SHARE ROW EXCLUSIVE MODE")
                running = tx.query("SELECT COUNT(*) FROM export_jobs WHERE status = ?", [RUNNING])[0][0]
                if int(running) >= max_running:
                    return False
            tx.execute(
                f"INSERT INTO export_jobs ({_JOB_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    job_id,
                    owner,
                    kind,
                    group_id,
                    request,
                    orjson.dumps(params).decode(),
                    RUNNING,
                    "queued",
                    now,
                    expires_at,
                    None,
                    tree_size,
                    checkpoint,
                    None,
                ],
            )
        return True

    def job(self, job_id: str) -> Job | None:
        rows = self.db.query(f"SELECT {_JOB_COLUMNS} FROM export_jobs WHERE id = ?", [job_id])
        return _job(rows[0]) if rows else None

    def jobs(self) -> list[Job]:
        """Every job, oldest first."""
        return [
            _job(r) for r in self.db.query(f"SELECT {_JOB_COLUMNS} FROM export_jobs ORDER BY created_at, id")
        ]

    def set_progress(self, job_id: str, progress: str) -> bool:
        """Update a running job's progress text; False when the job is no longer running (cancelled)."""
        cur = self.db.execute(
            "UPDATE export_jobs SET progress = ? WHERE id = ? AND status = ?", [progress, job_id, RUNNING]
        )
        return bool(cur.rowcount)

    def add_file(self, f: ExportFile) -> bool:
        """Record a finished file of a running job; False (nothing recorded) when the job is no longer
        running, so that a cancelled job's late file is not kept."""
        with self.db.transaction() as tx:
            if not tx.query("SELECT 1 FROM export_jobs WHERE id = ? AND status = ?", [f.job_id, RUNNING]):
                return False
            tx.execute(
                "INSERT INTO export_files (job_id, name, kind, resource_type, seq, lines, bytes, sha256, patients) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    f.job_id,
                    f.name,
                    f.kind,
                    f.resource_type,
                    f.seq,
                    f.lines,
                    f.bytes,
                    f.sha256,
                    orjson.dumps(f.patients).decode(),
                ],
            )
        return True

    def finish(
        self,
        job_id: str,
        status: str,
        *,
        expires_at: int,
        transaction_time: str | None = None,
        error: str | None = None,
    ) -> bool:
        """Move a running job to ``status`` (complete or failed), to be kept until ``expires_at``; False
        when it was not running (cancelled meanwhile)."""
        if status not in (COMPLETE, FAILED):
            raise ValueError(f"a job finishes complete or failed, not {status!r}")
        cur = self.db.execute(
            "UPDATE export_jobs SET status = ?, transaction_time = COALESCE(?, transaction_time), error = ?, "
            "progress = ?, expires_at = ? WHERE id = ? AND status = ?",
            [status, transaction_time, error, status, expires_at, job_id, RUNNING],
        )
        return bool(cur.rowcount)

    def cancel(self, job_id: str) -> bool:
        """Mark a job cancelled (whatever its state) and forget its files; False for an unknown job."""
        with self.db.transaction() as tx:
            cur = tx.execute(
                "UPDATE export_jobs SET status = ?, progress = ? WHERE id = ?", [CANCELLED, CANCELLED, job_id]
            )
            if not cur.rowcount:
                return False
            tx.execute("DELETE FROM export_files WHERE job_id = ?", [job_id])
        return True

    def delete_job(self, job_id: str) -> None:
        with self.db.transaction() as tx:
            tx.execute("DELETE FROM export_files WHERE job_id = ?", [job_id])
            tx.execute("DELETE FROM export_jobs WHERE id = ?", [job_id])

    def expired(self, now: int) -> list[str]:
        """The ids of jobs whose time is up (complete, failed, cancelled or still running)."""
        return [str(r[0]) for r in self.db.query("SELECT id FROM export_jobs WHERE expires_at <= ?", [now])]

    def fail_interrupted(self, reason: str, *, before: int) -> list[str]:
        """Mark failed every job still ``running`` that was created before ``before`` (the start of this
        process: no job of a previous process is running any more, and this process's own are)."""
        with self.db.transaction() as tx:
            ids = [
                str(r[0])
                for r in tx.query(
                    "SELECT id FROM export_jobs WHERE status = ? AND created_at < ? ORDER BY id",
                    [RUNNING, before],
                )
            ]
            tx.execute(
                "UPDATE export_jobs SET status = ?, progress = ?, error = ? WHERE status = ? AND created_at < ?",
                [FAILED, FAILED, reason, RUNNING, before],
            )
        return ids

    def files(self, job_id: str, *, with_patients: bool = False) -> list[ExportFile]:
        """A job's files in the order written (``patients`` left empty unless ``with_patients``)."""
        patients = "patients" if with_patients else "'{}'"
        rows = self.db.query(
            f"SELECT job_id, name, kind, resource_type, seq, lines, bytes, sha256, {patients} FROM export_files "
            "WHERE job_id = ? ORDER BY seq",
            [job_id],
        )
        return [
            ExportFile(str(j), str(n), str(k), str(t), int(s), int(li), int(b), str(h), orjson.loads(p))
            for j, n, k, t, s, li, b, h, p in rows
        ]

    def file(self, job_id: str, name: str) -> ExportFile | None:
        rows = self.db.query(
            "SELECT job_id, name, kind, resource_type, seq, lines, bytes, sha256, patients FROM export_files "
            "WHERE job_id = ? AND name = ?",
            [job_id, name],
        )
        if not rows:
            return None
        j, n, k, t, s, li, b, h, p = rows[0]
        return ExportFile(str(j), str(n), str(k), str(t), int(s), int(li), int(b), str(h), orjson.loads(p))

    # -- groups -------------------------------------------------------------------------------
    def create_group(self, group_id: str, name: str, members: Sequence[str], *, now: int) -> Group:
        """Define a group (ExportError when the id is not a FHIR id, is an organisation group's, or is taken)."""
        check_group_id(group_id)
        if group_id.startswith(ORG_GROUP_PREFIX):
            raise ExportError(f"group ids starting with {ORG_GROUP_PREFIX!r} are the source organisations'")
        ids = list(dict.fromkeys(m.removeprefix("Patient/") for m in members))
        for pid in ids:
            if not FHIR_ID.fullmatch(pid):
                raise ExportError("a member is not a Patient id (letters, digits, '-', '.', at most 64)")
        with self.db.transaction() as tx:
            if tx.query("SELECT 1 FROM export_groups WHERE id = ?", [group_id]):
                raise ExportError(f"group {group_id} exists already")
            tx.execute(
                "INSERT INTO export_groups (id, name, created_at) VALUES (?, ?, ?)", [group_id, name, now]
            )
            tx.executemany(
                "INSERT INTO export_group_members (group_id, patient_id) VALUES (?, ?)",
                [(group_id, pid) for pid in ids],
            )
        return Group(group_id, name, now, tuple(sorted(ids)))

    def group(self, group_id: str) -> Group | None:
        rows = self.db.query("SELECT id, name, created_at FROM export_groups WHERE id = ?", [group_id])
        if not rows:
            return None
        members = self.db.query(
            "SELECT patient_id FROM export_group_members WHERE group_id = ? ORDER BY patient_id", [group_id]
        )
        gid, name, created = rows[0]
        return Group(str(gid), str(name), int(created), tuple(str(m[0]) for m in members))

    def groups(self) -> list[Group]:
        """Every defined group, by id, with its members."""
        ids = [str(r[0]) for r in self.db.query("SELECT id FROM export_groups ORDER BY id")]
        return [g for g in (self.group(i) for i in ids) if g is not None]

    def delete_group(self, group_id: str) -> bool:
        with self.db.transaction() as tx:
            tx.execute("DELETE FROM export_group_members WHERE group_id = ?", [group_id])
            cur = tx.execute("DELETE FROM export_groups WHERE id = ?", [group_id])
            return bool(cur.rowcount)


def check_group_id(group_id: str) -> None:
    if not FHIR_ID.fullmatch(group_id):
        raise ExportError("a group id is letters, digits, '-' and '.', at most 64 characters")


def organization_group_id(organization: str) -> str:
    """The id of the group of a source organisation's patients: ``org-<organisation id>``, or, for an
    organisation id that would not make a FHIR id that way (or starts with ``x-``),
    ``org-x-<the first 40 hex digits of its SHA-256>``: every organisation has one, and no two share it."""
    candidate = ORG_GROUP_PREFIX + organization
    if FHIR_ID.fullmatch(candidate) and not organization.startswith("x-"):
        return candidate
    return ORG_GROUP_PREFIX + "x-" + hashlib.sha256(organization.encode()).hexdigest()[:40]


# -- reading the index for an export (read only) -------------------------------------------------
_STORED = "resource_type, id, source_org, patient_id, clinical_date, last_updated, dedupe_key, bundle_sha256"


def _body(db: Database) -> str:
    return "CAST(body AS BLOB)" if db.kind == "sqlite" else "convert_to(body, 'UTF8')"


def resource_types(db: Database) -> list[str]:
    """Every resource type in the index, in order: one index seek per type, however many rows."""
    out: list[str] = []
    last = ""
    while True:
        row = db.query("SELECT MIN(resource_type) FROM resources WHERE resource_type > ?", [last])
        if not row or row[0][0] is None:
            return out
        last = str(row[0][0])
        out.append(last)


def resource_page(
    db: Database,
    resource_type: str,
    after: str,
    *,
    since: str | None = None,
    compartment_only: bool = False,
    limit: int = 1000,
) -> list[StoredResource]:
    """The next page of stored resources of ``resource_type`` whose id is after ``after`` (``""`` for
    the first), in id order, read by key on the primary key ``(resource_type, id)``: bounded memory, no
    OFFSET; fewer than ``limit`` rows means the last page. With ``since``, those whose ``last_updated``
    is at or after it; with ``compartment_only``, those in some patient's compartment (a ``patient_id``)."""
    where = "resource_type = ? AND id > ?"
    params: list[Any] = [resource_type, after]
    if since is not None:
        where += " AND last_updated >= ?"
        params.append(since)
    if compartment_only:
        where += " AND patient_id IS NOT NULL"
    sql = f"SELECT {_STORED}, {_body(db)}, moved FROM resources WHERE {where} ORDER BY id LIMIT {int(limit)}"
    return list(map(StoredResource._make, db.query(sql, params)))


def patient_resources(
    db: Database, resource_type: str, patient_ids: Sequence[str], *, since: str | None = None
) -> list[StoredResource]:
    """The stored resources of ``resource_type`` in the compartments of ``patient_ids`` (a chunk of a
    group's patients; the index on ``(patient_id, resource_type)``), in id order."""
    if not patient_ids:
        return []
    sql = (
        f"SELECT {_STORED}, {_body(db)}, moved FROM resources "
        f"WHERE patient_id IN ({','.join('?' * len(patient_ids))}) AND resource_type = ?"
    )
    params: list[Any] = [*patient_ids, resource_type]
    if since is not None:
        sql += " AND last_updated >= ?"
        params.append(since)
    return list(map(StoredResource._make, db.query(sql + " ORDER BY id", params)))


def organization_patients(db: Database, organization: str) -> list[str]:
    """The ids of the Patient records a source organisation sent, in order."""
    rows = db.query(
        "SELECT id FROM resources WHERE resource_type = 'Patient' AND source_org = ? ORDER BY id",
        [organization],
    )
    return [str(r[0]) for r in rows]


def organizations(db: Database) -> dict[str, int]:
    """Source organisation -> the number of Patient records it sent."""
    rows = db.query(
        "SELECT source_org, COUNT(*) FROM resources WHERE resource_type = 'Patient' GROUP BY source_org "
        "ORDER BY source_org"
    )
    return {str(org): int(n) for org, n in rows}


def consenting_patients(db: Database) -> list[str]:
    """The ids of the patients with at least one Consent in the index."""
    rows = db.query(
        "SELECT DISTINCT patient_id FROM resources WHERE resource_type = 'Consent' AND patient_id IS NOT NULL"
    )
    return sorted(str(r[0]) for r in rows)
