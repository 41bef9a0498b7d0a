"""The index store: resources by deterministic id, with the provenance of every bundle that carried them.

Writes come from the index consumer, in batches, one transaction each. The stored state does not
depend on the order records arrive in, only on the set of records, so replays, rebuilds and
re-ingests are idempotent and a rebuilt index is identical to the original:

* a resource's content is that of the record with the newest *source* time (``Bundle.timestamp``, the
  time the source produced the message, e.g. MSH-7; ties broken by the content hash), so a late or
  re-sent older message never overwrites newer content (the classic out-of-order ADT problem);
* its ``meta.lastUpdated`` is the timestamp of the earliest record carrying that same content, so
  re-ingesting unchanged data changes nothing;
* the provenance tables are sets: every bundle that delivered a resource, once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple

import orjson

from bridge.logging import get_logger
from bridge.stores.db import Database
from bridge.stores.index.rules import (
    DEDUPE_RULES_VERSION,
    DEDUPE_TYPES,
    clinical_date,
    dedupe_key,
    patient_of,
)

log = get_logger(__name__)

#: one row per delivery of a resource: the same bundle from two organisations is two deliveries, keyed
#: like the ledger and ``bundles`` by bundle hash and organisation (an index keyed without the
#: organisation is re-keyed on open: :meth:`IndexStore._key_sources_by_org`)
_SOURCES_TABLE = """CREATE TABLE IF NOT EXISTS {name} (
    resource_type TEXT NOT NULL,
    id TEXT NOT NULL,
    bundle_sha256 TEXT NOT NULL,
    source_org TEXT NOT NULL,
    source_patient TEXT,
    topic TEXT NOT NULL,
    kafka_partition INTEGER NOT NULL,
    kafka_offset BIGINT NOT NULL,
    received_at TEXT NOT NULL,
    patient_id TEXT,
    PRIMARY KEY (resource_type, id, bundle_sha256, source_org)
)"""
_SOURCES_COLUMNS = (
    "resource_type, id, bundle_sha256, source_org, source_patient, topic, kafka_partition, kafka_offset, received_at, "
    "patient_id"
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS resources (
    resource_type TEXT NOT NULL,
    id TEXT NOT NULL,
    source_org TEXT NOT NULL,
    patient_id TEXT,
    clinical_date TEXT,
    last_updated TEXT NOT NULL,
    version_time TEXT NOT NULL,
    dedupe_key TEXT,
    bundle_sha256 TEXT NOT NULL,
    content_sha256 TEXT NOT NULL,
    body TEXT NOT NULL,
    moved INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (resource_type, id)
);
CREATE INDEX IF NOT EXISTS resources_patient ON resources (patient_id, resource_type);
CREATE INDEX IF NOT EXISTS resources_updated ON resources (last_updated);
CREATE TABLE IF NOT EXISTS patient_identifiers (
    system TEXT NOT NULL,
    value TEXT NOT NULL,
    patient_id TEXT NOT NULL,
    PRIMARY KEY (system, value, patient_id)
);
CREATE INDEX IF NOT EXISTS patient_identifiers_patient ON patient_identifiers (patient_id);
{sources_table};
CREATE INDEX IF NOT EXISTS resource_sources_patient ON resource_sources (patient_id);
CREATE TABLE IF NOT EXISTS bundles (
    bundle_sha256 TEXT NOT NULL,
    source_org TEXT NOT NULL,
    topic TEXT NOT NULL,
    kafka_partition INTEGER NOT NULL,
    kafka_offset BIGINT NOT NULL,
    received_at TEXT NOT NULL,
    PRIMARY KEY (bundle_sha256, source_org)
);
CREATE TABLE IF NOT EXISTS consent_versions (
    id TEXT NOT NULL,
    content_sha256 TEXT NOT NULL,
    source_org TEXT NOT NULL,
    patient_id TEXT,
    version_time TEXT NOT NULL,
    received_at TEXT NOT NULL,
    bundle_sha256 TEXT NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (id, content_sha256, source_org)
);
CREATE TABLE IF NOT EXISTS resource_versions (
    resource_type TEXT NOT NULL,
    id TEXT NOT NULL,
    content_sha256 TEXT NOT NULL,
    version_time TEXT NOT NULL,
    received_at TEXT NOT NULL,
    source_org TEXT NOT NULL,
    bundle_sha256 TEXT NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (resource_type, id, content_sha256)
);
CREATE INDEX IF NOT EXISTS resource_sources_bundle ON resource_sources (bundle_sha256);
CREATE TABLE IF NOT EXISTS index_meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
)
""".replace("{sources_table}", _SOURCES_TABLE.format(name="resource_sources"))

TABLES = (
    "resources",
    "patient_identifiers",
    "resource_sources",
    "bundles",
    "consent_versions",
    "resource_versions",
)

#: every version of every resource, once per content (``meta.versionId`` is the content digest): the
#: earliest delivery of that content names it, so a replay or a rebuild keeps the same history
_RESOURCE_VERSION = """INSERT INTO resource_versions
    (resource_type, id, content_sha256, version_time, received_at, source_org, bundle_sha256, body)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?)
    ON CONFLICT (resource_type, id, content_sha256) DO UPDATE SET
        version_time = excluded.version_time, received_at = excluded.received_at,
        source_org = excluded.source_org, bundle_sha256 = excluded.bundle_sha256, body = excluded.body
    WHERE excluded.received_at < resource_versions.received_at
       OR (excluded.received_at = resource_versions.received_at
           AND excluded.bundle_sha256 < resource_versions.bundle_sha256)"""

#: every version of a Consent, once per content: the earliest delivery of that content names it
_CONSENT_VERSION = """INSERT INTO consent_versions
    (id, content_sha256, source_org, patient_id, version_time, received_at, bundle_sha256, body)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?)
    ON CONFLICT (id, content_sha256, source_org) DO UPDATE SET
        version_time = excluded.version_time, received_at = excluded.received_at,
        bundle_sha256 = excluded.bundle_sha256, body = excluded.body
    WHERE excluded.received_at < consent_versions.received_at
       OR (excluded.received_at = consent_versions.received_at
           AND excluded.bundle_sha256 < consent_versions.bundle_sha256)"""


def source_time(value: object) -> str | None:
    """A bundle timestamp as a sortable UTC string (millisecond precision), or None."""
    if not isinstance(value, str) or len(value) < 10:
        return None
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def content_digest(resource: dict[str, Any]) -> str:
    """SHA-256 of a resource without ``meta.lastUpdated`` and ``meta.versionId`` (the index sets both):
    two deliveries with the same digest are the same version (the index keeps one of them; see
    ``_NEWER``), and the digest is the version's ``meta.versionId``."""
    meta = dict(resource.get("meta") or {})
    meta.pop("lastUpdated", None)
    meta.pop("versionId", None)
    return hashlib.sha256(orjson.dumps({**resource, "meta": meta}, option=orjson.OPT_SORT_KEYS)).hexdigest()


@dataclass(frozen=True, slots=True)
class IncomingBundle:
    """A bundle as the index consumer hands it over."""

    bundle: dict[str, Any]
    bundle_sha256: str
    source_org: str
    source_patient: str | None
    topic: str
    partition: int
    offset: int
    received_at: str  # RFC 3339 UTC, from the Kafka record timestamp


# A delivery replaces the stored version when it is newer (by source time, then content digest), or
# carries the same content with an earlier lastUpdated. A delivery naming another patient than the
# stored version marks the resource ``moved`` whichever version wins: its deliveries are then not all
# filed under one patient (resource_sources.patient_id is each delivery's own), and $everything looks
# its provenance up by resource instead of by patient.
_NEWER = """((excluded.content_sha256 <> resources.content_sha256
              AND (excluded.version_time > resources.version_time
                   OR (excluded.version_time = resources.version_time
                       AND excluded.content_sha256 > resources.content_sha256)))
             OR (excluded.content_sha256 = resources.content_sha256
                 AND excluded.last_updated < resources.last_updated))"""
_OTHER_PATIENT = "COALESCE(excluded.patient_id, '') <> COALESCE(resources.patient_id, '')"
_VERSIONED = (
    "source_org",
    "patient_id",
    "clinical_date",
    "last_updated",
    "version_time",
    "dedupe_key",
    "bundle_sha256",
    "content_sha256",
    "body",
)
_UPSERT_RESOURCE = (
    "INSERT INTO resources (resource_type, id, " + ", ".join(_VERSIONED) + ") "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (resource_type, id) DO UPDATE SET "
    + ", ".join(f"{c} = CASE WHEN {_NEWER} THEN excluded.{c} ELSE resources.{c} END" for c in _VERSIONED)
    + f", moved = CASE WHEN {_OTHER_PATIENT} THEN 1 ELSE resources.moved END"
    + f" WHERE {_NEWER} OR ({_OTHER_PATIENT} AND resources.moved = 0)"
)


#: pages of up to this many resources have their provenance looked up by key (see sources_for_page)
SOURCES_BY_KEY_MAX = 64
_SOURCES = (
    "SELECT resource_type, id, bundle_sha256, source_org, source_patient, topic, kafka_partition, kafka_offset, "
    "received_at FROM resource_sources WHERE "
)
_SOURCES_ORDER = " ORDER BY received_at, kafka_offset, source_org"


def _by_resource(
    rows: Iterable[Sequence[Any]], out: dict[tuple[str, str], list[dict[str, Any]]]
) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Add rows of :data:`_SOURCES` to ``out``, per (type, id), in row order; returns ``out``."""
    for r in rows:
        out.setdefault((r[0], r[1]), []).append(
            {
                "bundle_sha256": r[2],
                "source_org": r[3],
                "source_patient": r[4],
                "topic": r[5],
                "partition": r[6],
                "offset": r[7],
                "received_at": r[8],
            }
        )
    return out


class StoredResource(NamedTuple):
    resource_type: str
    id: str
    source_org: str
    patient_id: str | None
    clinical_date: str | None
    last_updated: str
    dedupe_key: str | None
    bundle_sha256: str
    body: bytes
    #: 1 when delivered under more than one patient (see :meth:`IndexStore.sources_for_page`), else 0
    moved: int = 0


#: SQLite settings of the index connection. The resource and provenance B-trees are keyed by random
#: UUIDs, so every batch touches pages all over them: a 64 MiB page cache keeps their inner pages in
#: memory (the default 2 MiB does not), and checkpointing the WAL every 10,000 pages instead of 1,000
#: copies a page rewritten by several batches into the database once. Commits stay as durable as
#: before (WAL, ``synchronous=NORMAL``); only the page cache and the checkpoint cadence change.
SQLITE_PRAGMAS = ("cache_size=-65536", "wal_autocheckpoint=10000")


def _pages(db: Any, select: str, params: Sequence[Any], size: int) -> Iterator[list[tuple[Any, ...]]]:
    """The rows of ``select`` (whose first column is ``id``, with a WHERE clause) in pages of ``size``,
    in id order, each page read by key after the last: bounded memory, no OFFSET scans."""
    after = ""
    while True:
        rows = db.query(f"{select} AND id > ? ORDER BY id LIMIT {int(size)}", [*params, after])
        if rows:
            yield rows
        if len(rows) < size:
            return
        after = rows[-1][0]


def _name_prefilter_is_exact(name: str) -> bool:
    """Whether ``name`` may be pre-filtered with ``lower(body) LIKE %name%`` (:meth:`IndexStore.search_patients`):
    ASCII, which both backends' ``lower()`` fold as ``casefold`` does, and nothing JSON writes escaped.
    (Not covered: an ASCII name reaching a stored non-ASCII letter whose case fold is ASCII, such as
    ``strauss`` in ``Strauß``; the pre-filter drops that match on both backends alike.)"""
    return name.isascii() and not any(c in '"\\' or c < " " for c in name)


class IndexStore:
    def __init__(self, url: str) -> None:
        self.db = Database(url)
        if self.db.kind == "sqlite":
            for pragma in SQLITE_PRAGMAS:
                self.db.execute(f"PRAGMA {pragma}")
        self.db.script(SCHEMA)
        self.seq = "rowid" if self.db.kind == "sqlite" else "seq"
        if self.db.kind == "postgres":  # SQLite's rowid is the insertion order already
            self.db.script(
                "ALTER TABLE resources ADD COLUMN IF NOT EXISTS seq BIGSERIAL;\n"
                "CREATE INDEX IF NOT EXISTS resources_seq ON resources (seq)"
            )
        self._add_moved_flag()
        self._add_versions()
        self._key_sources_by_org()
        self._refresh_dedupe_keys()

    def _key_sources_by_org(self) -> None:
        """An index whose deliveries were keyed without the organisation: re-key them (the rows are
        unique under either key, so they are copied as they are). A delivery dropped before stays
        dropped until the stream is replayed into the index, which adds it."""
        if self.db.kind == "postgres":
            key = [
                r[0]
                for r in self.db.query(
                    "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid "
                    "AND a.attnum = ANY(i.indkey) WHERE i.indrelid = 'resource_sources'::regclass AND i.indisprimary"
                )
            ]
        else:
            key = [r[1] for r in self.db.query("PRAGMA table_info(resource_sources)") if r[5]]
        if "source_org" in key:
            return
        with self.db.transaction() as db:
            if self.db.kind == "postgres":
                db.execute("ALTER TABLE resource_sources DROP CONSTRAINT resource_sources_pkey")
                db.execute(
                    "ALTER TABLE resource_sources ADD PRIMARY KEY (resource_type, id, bundle_sha256, source_org)"
                )
            else:  # SQLite cannot change a primary key: a new table, the rows copied
                db.execute(_SOURCES_TABLE.format(name="resource_sources_new"))
                db.execute(
                    f"INSERT INTO resource_sources_new ({_SOURCES_COLUMNS}) SELECT {_SOURCES_COLUMNS} FROM resource_sources"
                )
                db.execute("DROP TABLE resource_sources")
                db.execute("ALTER TABLE resource_sources_new RENAME TO resource_sources")
                db.execute(
                    "CREATE INDEX IF NOT EXISTS resource_sources_patient ON resource_sources (patient_id)"
                )
        log.info("index.sources_keyed_by_org")

    def _add_moved_flag(self) -> None:
        """An index written before resources carried ``moved``: add it, set from the deliveries."""
        exists = self.db.query(
            "SELECT to_regclass('resources') IS NOT NULL"
            if self.db.kind == "postgres"
            else "SELECT COUNT(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'resources'"
        )[0][0]
        if not exists:  # a new index: SCHEMA creates the table with the column
            return
        if "moved" in [d[0] for d in self.db.execute("SELECT * FROM resources LIMIT 0").description]:
            return
        with self.db.transaction() as db:
            db.execute("ALTER TABLE resources ADD COLUMN moved INTEGER NOT NULL DEFAULT 0")
            db.execute(
                "UPDATE resources SET moved = 1 WHERE (resource_type, id) IN (SELECT s.resource_type, s.id "
                "FROM resource_sources s JOIN resources r ON r.resource_type = s.resource_type AND r.id = s.id "
                "WHERE COALESCE(s.patient_id, '') <> COALESCE(r.patient_id, ''))"
            )
        log.info("index.moved_flag_added")

    def _add_versions(self) -> None:
        """An index written before resources carried ``meta.versionId`` and a version history: give
        each stored resource its versionId and make it the first version of its history (the earlier
        versions it replaced were not kept; a replay of the stream into a rebuilt index recovers them)."""
        row = self.db.query("SELECT value FROM index_meta WHERE key = 'versions'")
        if row:
            return
        seen = 0
        with self.db.transaction() as db:
            select = (
                "SELECT id, resource_type, content_sha256, version_time, last_updated, source_org, bundle_sha256, body "
                "FROM resources WHERE resource_type = ?"
            )
            types = [r[0] for r in db.query("SELECT DISTINCT resource_type FROM resources")]
            for rows in (page for rtype in types for page in _pages(db, select, [rtype], 5000)):
                bodies, versions = [], []
                for rid, rtype, sha, vtime, updated, org, bundle, body in rows:
                    resource = orjson.loads(body)
                    meta = resource.setdefault("meta", {})
                    if meta.get("versionId") != sha:
                        meta["versionId"] = sha
                        body = orjson.dumps(resource).decode()
                        bodies.append((body, rtype, rid))
                    versions.append((rtype, rid, sha, vtime, updated, org, bundle, body))
                db.executemany("UPDATE resources SET body = ? WHERE resource_type = ? AND id = ?", bodies)
                db.executemany(_RESOURCE_VERSION, versions)
                seen += len(rows)
            db.execute(
                "INSERT INTO index_meta (key, value) VALUES ('versions', '1') ON CONFLICT (key) DO NOTHING"
            )
        if seen:
            log.info("index.versions_added", resources=seen)

    def _refresh_dedupe_keys(self) -> None:
        """Recompute the stored de-duplication keys if they were written under other rules
        (:data:`~bridge.stores.index.rules.DEDUPE_RULES_VERSION`): once, when a newer release opens the index."""
        row = self.db.query("SELECT value FROM index_meta WHERE key = 'dedupe_rules'")
        if row and row[0][0] == DEDUPE_RULES_VERSION:
            return
        seen = changed = 0
        with self.db.transaction() as db:
            for rtype in DEDUPE_TYPES:
                select = "SELECT id, clinical_date, dedupe_key, body FROM resources WHERE resource_type = ?"
                for rows in _pages(db, select, [rtype], 5000):
                    updates = [
                        (new, rtype, rid)
                        for rid, when, old, body in rows
                        if (new := dedupe_key(orjson.loads(body), when)) != old
                    ]
                    db.executemany(
                        "UPDATE resources SET dedupe_key = ? WHERE resource_type = ? AND id = ?", updates
                    )
                    seen += len(rows)
                    changed += len(updates)
            db.execute(
                "INSERT INTO index_meta (key, value) VALUES ('dedupe_rules', ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (DEDUPE_RULES_VERSION,),
            )
        if seen:
            log.info(
                "index.dedupe_keys_refreshed", rules=DEDUPE_RULES_VERSION, resources=seen, changed=changed
            )

    @classmethod
    def open(cls, url: str) -> IndexStore:
        return cls(url)

    def close(self) -> None:
        self.db.close()

    # -- writes ---------------------------------------------------------------------------------
    def apply(self, bundles: Sequence[IncomingBundle]) -> int:
        """Upsert every resource of every bundle, atomically. Returns the number of resources written."""
        res_rows: list[tuple[Any, ...]] = []
        src_rows: list[tuple[Any, ...]] = []
        ident_rows: list[tuple[Any, ...]] = []
        bundle_rows: list[tuple[Any, ...]] = []
        consent_rows: list[tuple[Any, ...]] = []
        version_rows: list[tuple[Any, ...]] = []
        for b in bundles:
            version_time = source_time(b.bundle.get("timestamp")) or b.received_at
            bundle_rows.append((b.bundle_sha256, b.source_org, b.topic, b.partition, b.offset, b.received_at))
            for entry in b.bundle.get("entry") or ():
                resource = entry.get("resource") if isinstance(entry, dict) else None
                if not isinstance(resource, dict) or "id" not in resource:
                    continue
                rtype = resource["resourceType"]
                content_sha = content_digest(resource)
                meta = dict(resource.get("meta") or {})
                meta["versionId"] = content_sha
                meta["lastUpdated"] = b.received_at
                resource = {**resource, "meta": meta}
                owner = patient_of(resource)
                when = clinical_date(resource)
                res_rows.append(
                    (
                        rtype,
                        resource["id"],
                        b.source_org,
                        owner,
                        when,
                        b.received_at,
                        version_time,
                        dedupe_key(resource, when),
                        b.bundle_sha256,
                        content_sha,
                        orjson.dumps(resource).decode(),
                    )
                )
                src_rows.append(
                    (
                        rtype,
                        resource["id"],
                        b.bundle_sha256,
                        b.source_org,
                        b.source_patient,
                        b.topic,
                        b.partition,
                        b.offset,
                        b.received_at,
                        owner,
                    )
                )
                version_rows.append(
                    (
                        rtype,
                        resource["id"],
                        content_sha,
                        version_time,
                        b.received_at,
                        b.source_org,
                        b.bundle_sha256,
                        res_rows[-1][-1],
                    )
                )
                if rtype == "Consent":
                    consent_rows.append(
                        (
                            resource["id"],
                            content_sha,
                            b.source_org,
                            owner,
                            version_time,
                            b.received_at,
                            b.bundle_sha256,
                            res_rows[-1][-1],
                        )
                    )
                if rtype == "Patient":
                    for ident in resource.get("identifier") or ():
                        if isinstance(ident, dict) and ident.get("system") and ident.get("value"):
                            ident_rows.append((ident["system"], ident["value"], resource["id"]))
        with self.db.transaction() as db:
            db.executemany(_UPSERT_RESOURCE, res_rows)
            db.executemany(
                f"INSERT INTO resource_sources ({_SOURCES_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                src_rows,
            )
            db.executemany(
                "INSERT INTO patient_identifiers (system, value, patient_id) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                ident_rows,
            )
            db.executemany(_RESOURCE_VERSION, version_rows)
            if consent_rows:
                db.executemany(_CONSENT_VERSION, consent_rows)
            db.executemany(
                """INSERT INTO bundles (bundle_sha256, source_org, topic, kafka_partition, kafka_offset, received_at)
                   VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING""",
                bundle_rows,
            )
        return len(res_rows)

    def current_versions(self, resource_type: str, ids: Sequence[str]) -> dict[str, str]:
        """``id -> content_digest`` of the version stored now (the one :meth:`apply` kept), for those of
        ``ids`` that are stored."""
        out: dict[str, str] = {}
        unique = sorted(set(ids))
        for i in range(0, len(unique), 500):
            part = unique[i : i + 500]
            sql = f"SELECT id, content_sha256 FROM resources WHERE resource_type = ? AND id IN ({','.join('?' * len(part))})"
            out.update(self.db.query(sql, [resource_type, *part]))
        return out

    def reset(self) -> None:
        """Empty the index (``fhirbridge replay --rebuild``)."""
        with self.db.transaction() as db:
            for table in TABLES:
                db.execute(f"DELETE FROM {table}")

    # -- reads ----------------------------------------------------------------------------------
    def get(self, resource_type: str, rid: str) -> dict[str, Any] | None:
        rows = self.db.query(
            "SELECT body FROM resources WHERE resource_type = ? AND id = ?", (resource_type, rid)
        )
        return orjson.loads(rows[0][0]) if rows else None

    def consent_versions(self, consent_id: str) -> list[dict[str, Any]]:
        """Every version of the Consent ``consent_id`` this index received, newest first (by source
        time): its body, the bundle that first delivered it (whose SHA-256 the ledger holds), the
        organisation that sent it and when it was received."""
        rows = self.db.query(
            "SELECT body, bundle_sha256, source_org, received_at, version_time, patient_id FROM consent_versions "
            "WHERE id = ? ORDER BY version_time DESC, received_at DESC, content_sha256",
            (consent_id,),
        )
        return [
            {
                "resource": orjson.loads(r[0]),
                "bundle_sha256": r[1],
                "source_org": r[2],
                "received_at": r[3],
                "version_time": r[4],
                "patient_id": r[5],
            }
            for r in rows
        ]

    # -- search ---------------------------------------------------------------------------------
    def high_water_mark(self) -> int:
        """The insertion sequence number of the newest resource: a search pinned to it (``max_seq``) sees
        the resources stored up to now, whatever is stored while its pages are read."""
        return int(self.db.query(f"SELECT COALESCE(MAX({self.seq}), 0) FROM resources")[0][0])

    def scan(
        self,
        resource_type: str,
        *,
        max_seq: int,
        patient_ids: Sequence[str] | None = None,
        ids: Sequence[str] | None = None,
        source_orgs: Sequence[str] | None = None,
        order: str | None = "id",
        descending: bool = False,
        after: tuple[str, str] | None = None,
        limit: int = 1000,
    ) -> list[StoredResource]:
        """Up to ``limit`` resources of ``resource_type`` stored at or before ``max_seq``, narrowed to
        ``patient_ids``/``ids``/``source_orgs`` when given, in ``order`` (``id`` or ``last_updated``,
        then id) after the key ``after`` (``(order value, id)`` of the last row of the previous page);
        ``order=None``: in no particular order (the planner then picks the narrowest index, not the
        one that gives the order)."""
        if order not in ("id", "last_updated", None):
            raise ValueError(f"cannot order a scan by {order!r}")
        body = "CAST(body AS BLOB)" if self.db.kind == "sqlite" else "convert_to(body, 'UTF8')"
        sql = (
            "SELECT resource_type, id, source_org, patient_id, clinical_date, last_updated, dedupe_key, bundle_sha256, "
            f"{body}, moved FROM resources WHERE resource_type = ? AND {self.seq} <= ?"
        )
        params: list[Any] = [resource_type, max_seq]
        for column, values in (("patient_id", patient_ids), ("id", ids), ("source_org", source_orgs)):
            if values is not None:
                if not values:
                    return []
                sql += f" AND {column} IN ({','.join('?' * len(values))})"
                params += list(values)
        direction = "DESC" if descending else "ASC"
        if after is not None:
            cmp = "<" if descending else ">"
            if order == "id":
                sql += f" AND id {cmp} ?"
                params.append(after[1])
            else:
                sql += f" AND (last_updated {cmp} ? OR (last_updated = ? AND id {cmp} ?))"
                params += [after[0], after[0], after[1]]
        if order == "id":
            sql += f" ORDER BY id {direction}"
        elif order == "last_updated":
            sql += f" ORDER BY last_updated {direction}, id {direction}"
        sql += f" LIMIT {int(limit)}"
        return list(map(StoredResource._make, self.db.query(sql, params)))

    def get_stored(self, keys: Sequence[tuple[str, str]]) -> list[StoredResource]:
        """The stored resources of ``keys`` ((type, id) pairs) that exist, in no particular order."""
        body = "CAST(body AS BLOB)" if self.db.kind == "sqlite" else "convert_to(body, 'UTF8')"
        out: list[StoredResource] = []
        unique = sorted(set(keys))
        for i in range(0, len(unique), 400):
            part = unique[i : i + 400]
            sql = (
                "SELECT resource_type, id, source_org, patient_id, clinical_date, last_updated, dedupe_key, "
                f"bundle_sha256, {body}, moved FROM resources WHERE "
                + " OR ".join("(resource_type = ? AND id = ?)" for _ in part)
            )
            out += map(StoredResource._make, self.db.query(sql, [x for k in part for x in k]))
        return out

    def provenance_of(self, keys: Sequence[tuple[str, str]]) -> list[StoredResource]:
        """The Provenance resources of the bundles that delivered ``keys``: each bundle an adapter
        produces holds one, targeting every resource of the bundle (adapters/bundle.py)."""
        delivered = self.sources_of(keys)
        bundles = sorted({s["bundle_sha256"] for found in delivered.values() for s in found})
        out: list[tuple[str, str]] = []
        for i in range(0, len(bundles), 400):
            part = bundles[i : i + 400]
            out += self.db.query(
                "SELECT DISTINCT resource_type, id FROM resource_sources WHERE resource_type = 'Provenance' "
                f"AND bundle_sha256 IN ({','.join('?' * len(part))})",
                part,
            )
        return self.get_stored([(r[0], r[1]) for r in out])

    def versions(self, resource_type: str, rid: str) -> list[dict[str, Any]]:
        """Every version of a resource the index received, newest first (by source time, ties as
        :meth:`apply` breaks them, so the first is the current version): its body
        (``meta.versionId`` the content digest, ``meta.lastUpdated`` its earliest delivery), the bundle
        that first delivered it and the organisation that sent it."""
        rows = self.db.query(
            "SELECT body, bundle_sha256, source_org, received_at, version_time FROM resource_versions "
            "WHERE resource_type = ? AND id = ? ORDER BY version_time DESC, content_sha256 DESC",
            (resource_type, rid),
        )
        return [
            {
                "resource": orjson.loads(r[0]),
                "bundle_sha256": r[1],
                "source_org": r[2],
                "received_at": r[3],
                "version_time": r[4],
            }
            for r in rows
        ]

    def version(self, resource_type: str, rid: str, version_id: str) -> dict[str, Any] | None:
        rows = self.db.query(
            "SELECT body FROM resource_versions WHERE resource_type = ? AND id = ? AND content_sha256 = ?",
            (resource_type, rid, version_id),
        )
        return orjson.loads(rows[0][0]) if rows else None

    def patients_by_identifier(self, system: str | None, value: str) -> list[str]:
        if system:
            rows = self.db.query(
                "SELECT DISTINCT patient_id FROM patient_identifiers WHERE system = ? AND value = ? ORDER BY patient_id",
                (system, value),
            )
        else:
            rows = self.db.query(
                "SELECT DISTINCT patient_id FROM patient_identifiers WHERE value = ? ORDER BY patient_id",
                (value,),
            )
        return [r[0] for r in rows]

    def identifier_linked(self, patient_id: str) -> list[str]:
        """Patients sharing any identifier (system and value) with ``patient_id``, transitively, itself included."""
        seen = {patient_id}
        frontier = [patient_id]
        while frontier:
            marks = ",".join("?" * len(frontier))
            rows = self.db.query(
                f"""SELECT DISTINCT b.patient_id FROM patient_identifiers a
                    JOIN patient_identifiers b ON a.system = b.system AND a.value = b.value
                    WHERE a.patient_id IN ({marks})""",
                frontier,
            )
            frontier = [r[0] for r in rows if r[0] not in seen]
            seen.update(frontier)
        return sorted(seen)

    def resources_for_patients(
        self,
        patient_ids: Iterable[str],
        *,
        types: Sequence[str] | None = None,
        since: str | None = None,
        max_seq: int | None = None,
    ) -> list[StoredResource]:
        ids = list(patient_ids)
        if not ids:
            return []
        body = "CAST(body AS BLOB)" if self.db.kind == "sqlite" else "convert_to(body, 'UTF8')"
        sql = (
            f"SELECT resource_type, id, source_org, patient_id, clinical_date, last_updated, dedupe_key, bundle_sha256, {body}, moved "
            f"FROM resources WHERE patient_id IN ({','.join('?' * len(ids))})"
        )
        params: list[Any] = list(ids)
        if types:
            sql += f" AND resource_type IN ({','.join('?' * len(types))})"
            params += list(types)
        if since:
            sql += " AND last_updated >= ?"
            params.append(since)
        if max_seq is not None:  # pinned to a snapshot (see high_water_mark)
            sql += f" AND {self.seq} <= ?"
            params.append(max_seq)
        # the rows are the tuple's fields in order (the body as bytes on both backends): no per-row code
        return list(map(StoredResource._make, self.db.query(sql, params)))

    def sources_for_patients(self, patient_ids: Sequence[str]) -> dict[tuple[str, str], list[dict[str, Any]]]:
        """Every bundle that delivered each resource of these patients' compartments, oldest first."""
        if not patient_ids:
            return {}
        sql = f"{_SOURCES} patient_id IN ({','.join('?' * len(patient_ids))}){_SOURCES_ORDER}"
        return _by_resource(self.db.query(sql, list(patient_ids)), {})

    def sources_for_page(
        self, patient_ids: Sequence[str], resources: Sequence[StoredResource]
    ) -> dict[tuple[str, str], list[dict[str, Any]]]:
        """Every bundle that delivered each of ``resources`` (all filed under ``patient_ids``), oldest
        first: what :meth:`sources_of` returns for their keys, found faster for a large page.

        Up to :data:`SOURCES_BY_KEY_MAX` resources are looked up by key. For more, the deliveries filed
        under the patients come in one query (a resource whose deliveries all named its current patient
        has no others), and only the ``moved`` resources, delivered under another patient too, are
        looked up by key. On PostgreSQL a key lookup costs ~10 us (1,000 of them: a quarter of a
        1,000-entry $everything), the patients' query ~3 ms.
        """
        keys = [(r.resource_type, r.id) for r in resources]
        if len(keys) <= SOURCES_BY_KEY_MAX:
            return self.sources_of(keys)
        found = self.sources_for_patients(patient_ids)
        found.update(self.sources_of([(r.resource_type, r.id) for r in resources if r.moved]))
        return {k: found[k] for k in keys if k in found}

    def sources_of(self, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
        """Every bundle that delivered each (type, id), oldest first."""
        out: dict[tuple[str, str], list[dict[str, Any]]] = {}
        if not keys:
            return out
        if self.db.kind == "postgres":
            # the keys as two array parameters: one short statement whatever their number (an OR of
            # 400 conditions per statement cost PostgreSQL ~5 ms of planning and psycopg ~3 ms of parsing)
            sql = f"{_SOURCES} (resource_type, id) IN (SELECT * FROM unnest(?::text[], ?::text[])){_SOURCES_ORDER}"
            return _by_resource(self.db.query(sql, [[k[0] for k in keys], [k[1] for k in keys]]), out)
        for i in range(0, len(keys), 400):
            part = keys[i : i + 400]
            sql = _SOURCES + " OR ".join("(resource_type = ? AND id = ?)" for _ in part) + _SOURCES_ORDER
            _by_resource(self.db.query(sql, [x for k in part for x in k]), out)
        return out

    def counts(self) -> dict[str, int]:
        return {t: int(self.db.query(f"SELECT COUNT(*) FROM {t}")[0][0]) for t in TABLES}

    def fingerprint(self) -> str:
        """A digest of the whole index content, to compare a rebuilt index with the original."""
        h = hashlib.sha256()
        for r in self.db.query(
            "SELECT resource_type, id, last_updated, body FROM resources ORDER BY resource_type, id"
        ):
            h.update("\x1f".join(str(x) for x in r).encode())
        for r in self.db.query(
            "SELECT resource_type, id, bundle_sha256, source_org FROM resource_sources "
            "ORDER BY resource_type, id, bundle_sha256, source_org"
        ):
            h.update("\x1e".join(str(x) for x in r).encode())
        return h.hexdigest()

    def search_patients(
        self,
        *,
        name: str | None = None,
        birthdate: str | None = None,
        limit: int = 200,
        match: Callable[[dict[str, Any]], bool] | None = None,
    ) -> tuple[list[dict[str, Any]], int]:
        """The first ``limit`` Patients (in id order) that ``match`` accepts, and how many it accepts in
        all, among those whose JSON mentions ``name`` / ``birthdate`` (a cheap SQL pre-filter; ``match``
        decides). Every pre-filter hit is read, so that the total is true.

        The name pre-filter is skipped (``match`` alone decides) where it could drop a true match, on
        either backend: for a non-ASCII name (SQLite's ``lower()`` folds ASCII only, PostgreSQL's is not
        ``casefold``: ß is not ss, ς is not σ), and for a name holding a character JSON escapes
        (``"``, ``\\``, control characters: the body is JSON text, and ``\\`` is PostgreSQL's LIKE escape)."""
        sql = "SELECT id, body FROM resources WHERE resource_type = 'Patient'"
        params: list[Any] = []
        if name and _name_prefilter_is_exact(name):
            sql += " AND lower(body) LIKE ?"
            params.append(f"%{name.lower()}%")
        if birthdate:
            sql += " AND body LIKE ?"
            params.append(f'%"birthDate":"{birthdate}%')
        out: list[dict[str, Any]] = []
        total = 0
        for rows in _pages(self.db, sql, params, 500):
            for _rid, body in rows:
                patient = orjson.loads(body)
                if match is None or match(patient):
                    total += 1
                    if len(out) < limit:
                        out.append(patient)
        return out, total
