"""The ledger's storage interface and its SQLite and PostgreSQL backends.

Tables (same shape on both backends):

* ``ledger_meta``: one row, the log's origin and size (the size is the commit point of an append);
* ``ledger_entries``: index, leaf hash, canonical entry JSON, and two 32-bit lookup keys: ``dkey``
  of ``(bundle_sha256, source_org)`` (idempotency) and ``lkey``, the leaf hash prefix (proof by leaf
  hash). Matches on a key are confirmed against the entry itself, so a key collision is harmless;
* the key index, in two levels (a small log-structured merge):

  - ``ledger_dkeys`` / ``ledger_lkeys``: ``(key, idx)`` B-trees for the entries before the *tail*;
  - ``ledger_tail``: one row per appended batch with the batch's keys packed as little-endian
    int32 arrays. The tail rows cover ``[merged, size)`` contiguously. When the tail reaches
    :data:`MERGE_AT` entries, the append that crosses it moves the tail into the B-trees with two
    sorted ``INSERT ... SELECT`` statements and empties it.

  Random 32-bit keys inserted per batch into large B-trees were most of an append's cost (each batch
  dirtied almost every index page, and SQLite pays about a microsecond per indexed row); in batches
  of sorted keys every index page is written once per merge instead of once per batch;
* ``ledger_tiles``: hash tiles (:mod:`ledger.tiles`) keyed by one integer;
* ``ledger_checkpoints``: signed notes by tree size; ``ledger_cosignatures``: witness signature lines.

Readers use autocommit connections so that no read transaction stays open: a service process sees a
writer process's commits on its next call. Every database error that means "cannot talk to the
database" becomes :class:`~ledger.errors.StorageUnavailable`; the next call reconnects.
"""

from __future__ import annotations

import contextlib
import hashlib
import sqlite3
import struct
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import orjson

from ledger.errors import LedgerError, StorageUnavailable, WriterFenced
from ledger.tiles import Tile, split_key, tile_key

__all__ = [
    "Connector",
    "EntryRow",
    "InsertRow",
    "PostgresStorage",
    "SqliteStorage",
    "Storage",
    "Txn",
    "open_storage",
]

SCHEMA_VERSION = 3
"""3: two-level key index (2 indexed ``dkey``/``lkey`` on ``ledger_entries``, and is migrated in place;
1 had 60/64-bit keys, which this code would not find)."""
MERGE_AT = 1 << 19
"""Tail entries that trigger a merge into the key B-trees. A merge rewrites every page of both key
B-trees, so rarer merges write less (1M entries: 6.8 s with 2^19, 7.6 s with 2^17); the tail's keys
take 2 MB per key type at most, held sorted in memory by the writer and by readers (12 bytes per entry
and key type)."""
MERGED_KEYS_MAX = 1 << 24
"""Up to this many merged entries (64 MB of keys) a writer keeps their dedup keys in memory."""


class Connector(Protocol):
    """How the ledger gets its database connections: the caller decides how they are opened (fhirbridge's
    is ``bridge.stores.db.Connector`` with the ledger's tuning: WAL, ``synchronous=FULL``, 16 KiB pages).

    Calling it opens a new connection in autocommit mode (``sqlite3`` with ``isolation_level=None``, or
    psycopg 3 with ``autocommit=True``); ``kind`` is ``"sqlite"`` or ``"postgresql"``;
    ``is_unavailable(exc, conn)`` says whether an error means the database cannot be reached now.
    """

    @property
    def kind(self) -> str: ...

    def __call__(self) -> Any: ...

    def is_unavailable(self, exc: BaseException, conn: Any = None) -> bool: ...


@dataclass(frozen=True, slots=True)
class EntryRow:
    index: int
    leaf_hash: bytes
    entry: bytes
    dkey: int
    lkey: int

    def key(self) -> tuple[str, str]:
        """``(bundle_sha256, source_org)`` read from the stored entry; raises on a corrupt entry."""
        return _entry_key(self.entry)


# (index, leaf hash, canonical entry, dedup key, leaf key)
InsertRow = tuple[int, bytes, bytes, int, int]


class Txn(Protocol):
    """The write-side operations, valid only inside :meth:`Storage.write`."""

    def size(self) -> int: ...
    def size_epoch(self) -> tuple[int, int]: ...
    def find_many(
        self, keys: Sequence[tuple[str, str]], dkeys: Sequence[int]
    ) -> dict[tuple[str, str], int]: ...
    def last_tiles(self) -> list[Tile]: ...
    def get_tiles(self, keys: set[tuple[int, int]]) -> dict[tuple[int, int], tuple[int, bytes]]: ...
    def insert_entries(self, rows: Sequence[InsertRow]) -> None: ...
    def put_tiles(self, tiles: Sequence[Tile]) -> None: ...
    def set_size(self, size: int) -> None: ...
    def last_checkpoint(self) -> tuple[int, float] | None: ...
    def put_checkpoint(self, size: int, root: bytes, note: str, created_at: float) -> None: ...


class Storage(Protocol):
    """What :class:`ledger.log.Ledger` needs from a database."""

    def write(self) -> contextlib.AbstractContextManager[Txn]: ...
    def origin(self) -> str | None: ...
    def size(self) -> int: ...
    def size_epoch(self) -> tuple[int, int]: ...
    def find(self, bundle_sha256: str, source_org: str) -> int | None: ...
    def find_many_committed(self, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], int]: ...
    def find_leaf(self, leaf_hash: bytes) -> int | None: ...
    def get_entry(self, index: int) -> EntryRow | None: ...
    def get_tiles(self, keys: set[tuple[int, int]]) -> dict[tuple[int, int], tuple[int, bytes]]: ...
    def size_epoch_tiles(
        self, keys: set[tuple[int, int]]
    ) -> tuple[int, int, dict[tuple[int, int], tuple[int, bytes]]]: ...
    def iter_entries(self, start: int, batch: int) -> Iterator[list[EntryRow]]: ...
    def iter_tiles(self) -> Iterator[tuple[int, int, int, bytes]]: ...
    def checkpoints(self) -> list[tuple[int, bytes, str]]: ...
    def latest_checkpoint(self) -> tuple[int, str] | None: ...
    def checkpoint_at(self, size: int) -> str | None: ...
    def cosignatures(self, size: int) -> list[str]: ...
    def put_cosignature(
        self, size: int, witness: str, key_id: int, line: str, received_at: float
    ) -> bool: ...
    def reset(self) -> None: ...
    def claim_writer(self, holder: str, idle_in_transaction_ms: int | None = None) -> int: ...
    def writer(self) -> tuple[int, str, float] | None: ...
    def close(self) -> None: ...


_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS ledger_meta (
        id INTEGER PRIMARY KEY CHECK (id = 1), origin TEXT NOT NULL, size BIGINT NOT NULL,
        schema_version INTEGER NOT NULL, epoch BIGINT NOT NULL DEFAULT 0)""",
    """CREATE TABLE IF NOT EXISTS ledger_entries (
        idx {key} PRIMARY KEY, leaf_hash {blob} NOT NULL, entry {blob} NOT NULL,
        dkey BIGINT NOT NULL, lkey BIGINT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS ledger_dkeys (
        k INTEGER NOT NULL, idx BIGINT NOT NULL, PRIMARY KEY (k, idx)){without_rowid}""",
    """CREATE TABLE IF NOT EXISTS ledger_lkeys (
        k INTEGER NOT NULL, idx BIGINT NOT NULL, PRIMARY KEY (k, idx)){without_rowid}""",
    """CREATE TABLE IF NOT EXISTS ledger_tail (
        first_idx {key} PRIMARY KEY, n INTEGER NOT NULL, dkeys {blob} NOT NULL, lkeys {blob} NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS ledger_tiles (
        tile_key {key} PRIMARY KEY, width INTEGER NOT NULL, hashes {blob} NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS ledger_checkpoints (
        size BIGINT PRIMARY KEY, root {blob} NOT NULL, note TEXT NOT NULL, created_at DOUBLE PRECISION NOT NULL)""",
    # the single writer's epoch (decision 38): claimed by a new leader, checked by every write
    """CREATE TABLE IF NOT EXISTS ledger_writer (
        id INTEGER PRIMARY KEY CHECK (id = 1), epoch BIGINT NOT NULL, holder TEXT NOT NULL,
        since DOUBLE PRECISION NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS ledger_cosignatures (
        size BIGINT NOT NULL, witness TEXT NOT NULL, key_id BIGINT NOT NULL, line TEXT NOT NULL,
        received_at DOUBLE PRECISION NOT NULL, PRIMARY KEY (size, witness, key_id))""",
]
_TABLES = (
    "ledger_cosignatures",
    "ledger_checkpoints",
    "ledger_tiles",
    "ledger_tail",
    "ledger_lkeys",
    "ledger_dkeys",
    "ledger_entries",
    "ledger_meta",
)
_V2_INDEXES = ("ledger_entries_dkey", "ledger_entries_lkey")
_CHUNK = 500
_READ_RETRIES = 5


class _SqlBase:
    """Shared SQL; subclasses provide the connection, placeholders and error translation."""

    ph = "?"
    blob_type = "BLOB"
    key_type = "INTEGER"
    without_rowid = " WITHOUT ROWID"

    def __init__(self, connector: Connector, origin: str) -> None:
        self._connector = connector
        self._origin = origin
        self._lock = threading.RLock()
        self._conn: Any = None
        self.merge_at = MERGE_AT
        self._wtail: _WriterTail | None = None  # the writer's view of the tail (None: reload it)
        self._wmain: _MergedKeys | None = None  # the writer's copy of the merged dedup keys
        # readers: the tail rows they have read (first indices, reset epoch) and their keys, sorted
        self._rtail_firsts: list[int] = []
        self._rtail_epoch = -1
        self._rtail = (_KeyIndex(), _KeyIndex())  # dkeys, lkeys

    # -- subclass hooks ------------------------------------------------------------------------------
    #: statements run on every new connection (a writer's transaction time limit, see claim_writer)
    session_sql: tuple[str, ...] = ()

    def _connect(self) -> Any:
        conn = self._connector()
        for stmt in self.session_sql:
            conn.execute(stmt)
        return conn

    def _is_unavailable(self, exc: BaseException) -> bool:
        return self._connector.is_unavailable(exc, self._conn)

    def _begin(self, conn: Any) -> contextlib.AbstractContextManager[Any]:
        raise NotImplementedError

    def _is_db_error(self, exc: BaseException) -> bool:
        raise NotImplementedError

    def _lock_meta_sql(self) -> str:
        return "SELECT size, epoch FROM ledger_meta WHERE id = 1"

    # -- plumbing -----------------------------------------------------------------------------------
    def _q(self, sql: str) -> str:
        return sql if self.ph == "?" else sql.replace("?", self.ph)

    def _get_conn(self) -> Any:
        if self._conn is None:
            try:
                self._conn = self._connect()
            except Exception as exc:
                if self._is_unavailable(exc):
                    raise StorageUnavailable(
                        f"cannot connect to the ledger database: {type(exc).__name__}"
                    ) from exc
                if self._is_db_error(exc):
                    raise LedgerError(f"cannot use the ledger database: {type(exc).__name__}: {exc}") from exc
                raise
        return self._conn

    def _drop_conn(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    @contextlib.contextmanager
    def _guard(self) -> Iterator[Any]:
        with self._lock:
            conn = self._get_conn()
            try:
                yield conn
            except StorageUnavailable:
                self._drop_conn()
                raise
            except Exception as exc:
                if self._is_unavailable(exc):
                    self._drop_conn()
                    raise StorageUnavailable(
                        f"ledger database unavailable: {type(exc).__name__}: {exc}"
                    ) from exc
                if self._is_db_error(exc):  # e.g. a corrupt file or a schema someone changed
                    raise LedgerError(f"ledger database error: {type(exc).__name__}: {exc}") from exc
                raise

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        with self._guard() as conn:
            cur = conn.execute(self._q(sql), params)
            return list(cur.fetchall())

    def _schema_lock(self, conn: Any) -> None:
        """Serialise concurrent schema creation (SQLite's BEGIN IMMEDIATE already does)."""

    def _init_schema(self) -> None:
        try:
            self._create_schema()
        except BaseException:
            self.close()
            raise

    def _create_schema(self) -> None:
        with self._guard() as conn, self._begin(conn):
            self._schema_lock(conn)
            for stmt in _SCHEMA:
                conn.execute(
                    stmt.format(blob=self.blob_type, key=self.key_type, without_rowid=self.without_rowid)
                )
            row = conn.execute("SELECT origin, size, schema_version FROM ledger_meta WHERE id = 1").fetchone()
            if row is None:
                conn.execute(
                    self._q("INSERT INTO ledger_meta (id, origin, size, schema_version) VALUES (1, ?, 0, ?)"),
                    (self._origin, SCHEMA_VERSION),
                )
            elif row[0] != self._origin:
                raise LedgerError(f"the database holds the log {row[0]!r}, not {self._origin!r}")
            elif int(row[2]) == 2:
                self._migrate_v2(conn)
            elif int(row[2]) != SCHEMA_VERSION:
                raise LedgerError(
                    f"the ledger database has schema version {row[2]}, this code needs {SCHEMA_VERSION}:"
                    " rebuild it into a new database (fhirbridge replay --rebuild)"
                )

    def _migrate_v2(self, conn: Any) -> None:
        """Schema 2 -> 3: every entry into the key B-trees (the tail starts empty), old indexes dropped."""
        for table, col in (("ledger_dkeys", "dkey"), ("ledger_lkeys", "lkey")):
            conn.execute(f"DELETE FROM {table}")
            conn.execute(
                f"INSERT INTO {table} (k, idx) SELECT {col}, idx FROM ledger_entries ORDER BY {col}, idx"
            )
        conn.execute("DELETE FROM ledger_tail")
        for name in _V2_INDEXES:
            conn.execute(f"DROP INDEX IF EXISTS {name}")
        conn.execute(self._q("UPDATE ledger_meta SET schema_version = ? WHERE id = 1"), (SCHEMA_VERSION,))

    # -- reads --------------------------------------------------------------------------------------
    def origin(self) -> str | None:
        rows = self._rows("SELECT origin FROM ledger_meta WHERE id = 1")
        return str(rows[0][0]) if rows else None

    def size(self) -> int:
        rows = self._rows("SELECT size FROM ledger_meta WHERE id = 1")
        return int(rows[0][0]) if rows else 0

    def size_epoch(self) -> tuple[int, int]:
        """The size and the reset epoch (incremented by every :meth:`reset`)."""
        rows = self._rows("SELECT size, epoch FROM ledger_meta WHERE id = 1")
        return (int(rows[0][0]), int(rows[0][1])) if rows else (0, 0)

    def find(self, bundle_sha256: str, source_org: str) -> int | None:
        found = self.find_many_committed([(bundle_sha256, source_org)])
        return found.get((bundle_sha256, source_org))

    def find_many_committed(self, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], int]:
        """The lowest logged index of each ``(bundle_sha256, source_org)`` in ``keys`` that is logged.

        A reader's batch lookup (the query service proves every source of a history at once): one
        consistent read of the key B-trees and the tail's key list, the tail's keys (cached: a tail row
        never changes), then one read of the candidate entries.
        """
        if not keys:
            return {}
        wanted = set(keys)
        dkeys = sorted({dedup_key(b, o) for b, o in wanted})
        rows = self._candidate_rows(0, dkeys, "entry")
        out: dict[tuple[str, str], int] = {}
        _collect(out, wanted, rows)
        return out

    def find_leaf(self, leaf_hash: bytes) -> int | None:
        for idx, h in sorted(self._candidate_rows(1, [leaf_key(leaf_hash)], "leaf_hash")):
            if bytes(h) == leaf_hash:
                return int(idx)
        return None

    def _candidate_rows(self, which: int, keys: list[int], column: str) -> list[Any]:
        """``(idx, column)`` of every entry whose dkey (``which`` 0) or lkey (1) is in ``keys``."""
        table = ("ledger_dkeys", "ledger_lkeys")[which]
        for _ in range(_READ_RETRIES):
            with self._guard() as conn:
                idxs: list[int] = []
                views = set()
                for chunk in _chunks(keys):
                    marks = ",".join([self.ph] * len(chunk))
                    # one statement: one snapshot of the B-tree matches, the tail's rows and the epoch
                    listing = conn.execute(
                        f"SELECT 0, idx FROM {table} WHERE k IN ({marks})"
                        " UNION ALL SELECT 1, first_idx FROM ledger_tail"
                        " UNION ALL SELECT 2, epoch FROM ledger_meta",
                        chunk,
                    ).fetchall()
                    idxs += [int(v) for t, v in listing if t == 0]
                    firsts = sorted(int(v) for t, v in listing if t == 1)
                    epoch = next(int(v) for t, v in listing if t == 2)
                    views.add((epoch, tuple(firsts)))
                # a merge or reset between two of these reads, or before the tail rows are read: again
                if len(views) != 1 or not self._load_reader_tail(conn, epoch, firsts):
                    continue
                idxs += self._rtail[which].lookup(keys)[1]
                if not idxs:
                    return []
                found: list[Any] = []
                for chunk in _chunks(sorted(set(idxs))):
                    marks = ",".join([self.ph] * len(chunk))
                    found += conn.execute(
                        f"SELECT idx, {column} FROM ledger_entries WHERE idx IN ({marks})", chunk
                    ).fetchall()
                return found
        raise StorageUnavailable("the ledger's key index kept changing during a lookup; try again")

    def _load_reader_tail(self, conn: Any, epoch: int, firsts: list[int]) -> bool:
        """Bring the cached tail keys to the rows ``firsts`` of reset epoch ``epoch`` (tail rows never
        change, so only rows not read yet are fetched); False if the tail changed meanwhile."""
        cached = self._rtail_firsts
        if epoch != self._rtail_epoch or firsts[: len(cached)] != cached:  # reset, or merged since
            self._rtail_firsts, self._rtail_epoch = [], epoch
            self._rtail = (_KeyIndex(), _KeyIndex())
        missing = firsts[len(self._rtail_firsts) :]
        got_all: list[Any] = []
        for chunk in _chunks(missing):
            marks = ",".join([self.ph] * len(chunk))
            got = conn.execute(
                f"SELECT t.first_idx, t.dkeys, t.lkeys, m.epoch FROM ledger_tail t, ledger_meta m"
                f" WHERE m.id = 1 AND t.first_idx IN ({marks})",
                chunk,
            ).fetchall()
            if len(got) != len(chunk) or any(int(r[3]) != epoch for r in got):
                return False
            got_all += got
        for first, dk, lk, _ in sorted(got_all, key=lambda r: int(r[0])):
            self._rtail[0].add(_keys_array(dk), int(first))
            self._rtail[1].add(_keys_array(lk), int(first))
            self._rtail_firsts.append(int(first))
        return True

    def get_entry(self, index: int) -> EntryRow | None:
        rows = self._rows(
            "SELECT idx, leaf_hash, entry, dkey, lkey FROM ledger_entries WHERE idx = ?",
            (index,),
        )
        return _entry_row(rows[0]) if rows else None

    def get_tiles(self, keys: set[tuple[int, int]]) -> dict[tuple[int, int], tuple[int, bytes]]:
        with self._guard() as conn:
            return _get_tiles(conn, self._q, keys)

    def size_epoch_tiles(
        self, keys: set[tuple[int, int]]
    ) -> tuple[int, int, dict[tuple[int, int], tuple[int, bytes]]]:
        """The size, the reset epoch and the tiles ``keys`` in one statement (one snapshot, one round
        trip: what a proof needs)."""
        if len(keys) > _CHUNK:
            size, epoch = self.size_epoch()
            return size, epoch, self.get_tiles(keys)
        ints = [tile_key(k, t) for k, t in keys]
        marks = ",".join([self.ph] * len(ints)) or "NULL"
        sql = (
            f"SELECT tile_key, width, hashes, CAST(NULL AS BIGINT) FROM ledger_tiles WHERE tile_key IN ({marks})"
            f" UNION ALL SELECT -1, size, CAST(NULL AS {self.blob_type}), epoch FROM ledger_meta WHERE id = 1"
        )
        with self._guard() as conn:
            rows = conn.execute(sql, ints).fetchall()
        size = epoch = 0
        out: dict[tuple[int, int], tuple[int, bytes]] = {}
        for key, width, blob, ep in rows:
            if int(key) == -1:
                size, epoch = int(width), int(ep)
            else:
                out[split_key(int(key))] = (int(width), bytes(blob))
        return size, epoch, out

    def iter_entries(self, start: int, batch: int) -> Iterator[list[EntryRow]]:
        nxt = start
        while True:
            rows = self._rows(
                "SELECT idx, leaf_hash, entry, dkey, lkey FROM ledger_entries"
                " WHERE idx >= ? ORDER BY idx LIMIT ?",
                (nxt, batch),
            )
            if not rows:
                return
            out = [_entry_row(r) for r in rows]
            yield out
            nxt = out[-1].index + 1

    def iter_tiles(self) -> Iterator[tuple[int, int, int, bytes]]:
        last = -1
        while True:
            rows = self._rows(
                "SELECT tile_key, width, hashes FROM ledger_tiles WHERE tile_key > ? ORDER BY tile_key LIMIT 256",
                (last,),
            )
            if not rows:
                return
            for key, width, blob in rows:
                k, t = split_key(int(key))
                yield k, t, int(width), bytes(blob)
            last = int(rows[-1][0])

    def checkpoints(self) -> list[tuple[int, bytes, str]]:
        rows = self._rows("SELECT size, root, note FROM ledger_checkpoints ORDER BY size")
        return [(int(s), bytes(r), str(n)) for s, r, n in rows]

    def latest_checkpoint(self) -> tuple[int, str] | None:
        rows = self._rows("SELECT size, note FROM ledger_checkpoints ORDER BY size DESC LIMIT 1")
        return (int(rows[0][0]), str(rows[0][1])) if rows else None

    def checkpoint_at(self, size: int) -> str | None:
        rows = self._rows("SELECT note FROM ledger_checkpoints WHERE size = ?", (size,))
        return str(rows[0][0]) if rows else None

    def cosignatures(self, size: int) -> list[str]:
        rows = self._rows(
            "SELECT line FROM ledger_cosignatures WHERE size = ? ORDER BY witness, key_id", (size,)
        )
        return [str(r[0]) for r in rows]

    def put_cosignature(self, size: int, witness: str, key_id: int, line: str, received_at: float) -> bool:
        """Store (or replace: a newer timestamp from the same witness) a cosignature line."""
        with self._guard() as conn, self._begin(conn):
            cur = conn.execute(
                self._q(
                    "INSERT INTO ledger_cosignatures (size, witness, key_id, line, received_at) VALUES (?, ?, ?, ?, ?)"
                    " ON CONFLICT (size, witness, key_id) DO UPDATE SET line = excluded.line,"
                    " received_at = excluded.received_at"
                ),
                (size, witness, key_id, line, received_at),
            )
            return bool(cur.rowcount)

    def reset(self) -> None:
        self._wtail = self._wmain = None
        with self._guard() as conn, self._begin(conn):
            for table in _TABLES[:-1]:
                conn.execute(f"DELETE FROM {table}")
            conn.execute("UPDATE ledger_meta SET size = 0, epoch = epoch + 1 WHERE id = 1")

    def close(self) -> None:
        with self._lock:
            self._drop_conn()

    # -- writes -------------------------------------------------------------------------------------
    #: The writer epoch this storage claimed (:meth:`claim_writer`); every write checks it is current.
    fence: int | None = None

    def claim_writer(self, holder: str, idle_in_transaction_ms: int | None = None) -> int:
        """Become the log's writer: a new writer epoch, higher than any before; every later write of
        this storage checks that it is still the current one (:class:`WriterFenced` otherwise).

        The claim takes the writers' lock on ``ledger_meta`` first, so an append of the previous writer
        that is under way commits before it, and any later one sees the new epoch and is refused.
        ``idle_in_transaction_ms`` (PostgreSQL): from now on the server ends this writer's session if
        it sits in an open transaction that long, so a writer paused mid-append cannot hold the
        writers' lock, and with it the next writer's claim, for longer.
        """
        if idle_in_transaction_ms is not None and self.ph == "%s":
            self.session_sql = (f"SET idle_in_transaction_session_timeout = {int(idle_in_transaction_ms)}",)
            self._drop_conn()  # the next connection runs it
        with self._guard() as conn, self._begin(conn):
            conn.execute(self._lock_meta_sql()).fetchone()
            row = conn.execute("SELECT epoch FROM ledger_writer WHERE id = 1").fetchone()
            epoch = (int(row[0]) if row else 0) + 1
            if row is None:
                conn.execute(
                    self._q("INSERT INTO ledger_writer (id, epoch, holder, since) VALUES (1, ?, ?, ?)"),
                    (epoch, holder, time.time()),
                )
            else:
                conn.execute(
                    self._q("UPDATE ledger_writer SET epoch = ?, holder = ?, since = ? WHERE id = 1"),
                    (epoch, holder, time.time()),
                )
        self.fence = epoch
        return epoch

    def writer(self) -> tuple[int, str, float] | None:
        """The current writer's epoch, name and claim time (``None`` before any claim)."""
        rows = self._rows("SELECT epoch, holder, since FROM ledger_writer WHERE id = 1")
        return (int(rows[0][0]), str(rows[0][1]), float(rows[0][2])) if rows else None

    def _check_fence(self, conn: Any) -> None:
        conn.execute(self._lock_meta_sql()).fetchone()  # after any claim under way has committed
        row = conn.execute("SELECT epoch FROM ledger_writer WHERE id = 1").fetchone()
        current = int(row[0]) if row else 0
        if self.fence is not None and current != self.fence:
            raise WriterFenced(self.fence, current)

    @contextlib.contextmanager
    def write(self) -> Iterator[Txn]:
        """One durable transaction: committed when the block exits normally, rolled back otherwise.

        After :meth:`claim_writer`, it first checks that no other writer has claimed the log since.
        """
        try:
            with self._guard() as conn, self._begin(conn):
                if self.fence is not None:
                    self._check_fence(conn)
                yield _SqlTxn(self, conn)
        except BaseException:
            self._wtail = self._wmain = None  # they may hold rows or a merge that were rolled back
            raise

    def _insert_entries(self, conn: Any, rows: Sequence[InsertRow]) -> None:
        _executemany(
            conn,
            self._q("INSERT INTO ledger_entries (idx, leaf_hash, entry, dkey, lkey) VALUES (?, ?, ?, ?, ?)"),
            rows,
        )

    def _append_rows(self, conn: Any, rows: Sequence[InsertRow]) -> None:
        """Insert entries ``rows`` (contiguous indices from the log size), their tail row, and merge
        the tail into the key B-trees when it has reached :attr:`merge_at` entries."""
        if not rows:
            return
        tail = self._writer_tail(conn)
        first, n = rows[0][0], len(rows)
        self._insert_entries(conn, rows)
        dkeys = np.fromiter((r[3] for r in rows), np.int32, n)
        lkeys = np.fromiter((r[4] for r in rows), np.int32, n)
        conn.execute(
            self._q("INSERT INTO ledger_tail (first_idx, n, dkeys, lkeys) VALUES (?, ?, ?, ?)"),
            (first, n, dkeys.astype("<i4").tobytes(), lkeys.astype("<i4").tobytes()),
        )
        tail.add(first, dkeys)
        if first + n - tail.merged >= self.merge_at:
            self._merge(conn, tail.merged)
            main = self._wmain
            if main is not None and (main.epoch, main.merged) == (tail.epoch, tail.merged):
                main.add(tail.index.keys, first + n)
            tail.clear(first + n)

    def _merge(self, conn: Any, merged: int) -> None:
        for table, col in (("ledger_dkeys", "dkey"), ("ledger_lkeys", "lkey")):
            conn.execute(
                self._q(
                    f"INSERT INTO {table} (k, idx) SELECT {col}, idx FROM ledger_entries"
                    f" WHERE idx >= ? ORDER BY {col}, idx"
                ),
                (merged,),
            )
        conn.execute("DELETE FROM ledger_tail")

    def _writer_tail(self, conn: Any) -> _WriterTail:
        """The writer's tail keys, reloaded unless they match the database (another writer, a reset)."""
        listing = conn.execute(
            "SELECT 1, first_idx FROM ledger_tail UNION ALL SELECT 2, epoch FROM ledger_meta"
        ).fetchall()
        firsts = sorted(int(v) for t, v in listing if t == 1)
        epoch = next(int(v) for t, v in listing if t == 2)
        tail = self._wtail
        if tail is None or tail.epoch != epoch or tail.firsts != firsts:
            size = int(conn.execute("SELECT size FROM ledger_meta WHERE id = 1").fetchone()[0])
            tail = _WriterTail(epoch, firsts[0] if firsts else size)
            for first, blob in conn.execute("SELECT first_idx, dkeys FROM ledger_tail ORDER BY first_idx"):
                tail.add(int(first), _keys_array(blob))
            self._wtail = tail
        return tail

    def _main_matches(self, conn: Any, dkeys: list[int]) -> list[Any]:
        """``(idx, entry)`` of the merged entries whose dkey is in ``dkeys``."""
        found: list[Any] = []
        prefix = (
            "SELECT idx, entry FROM ledger_entries WHERE idx IN (SELECT idx FROM ledger_dkeys WHERE k IN ("
        )
        full = prefix + ",".join([self.ph] * _CHUNK) + "))"  # the same text every time: a cached statement
        for chunk in _chunks(dkeys):
            sql = full if len(chunk) == _CHUNK else prefix + ",".join([self.ph] * len(chunk)) + "))"
            found.extend(conn.execute(sql, chunk).fetchall())
        return found

    def _merged_keys(self, conn: Any, tail: _WriterTail) -> _MergedKeys | None:
        """The writer's sorted copy of the merged dedup keys, (re)loaded if another writer merged or
        reset; None above :data:`MERGED_KEYS_MAX` entries (then every key is looked up in the B-tree)."""
        main = self._wmain
        if main is not None and (main.epoch, main.merged) == (tail.epoch, tail.merged):
            return main
        self._wmain = None
        if tail.merged > MERGED_KEYS_MAX:
            return None
        keys = np.fromiter((r[0] for r in conn.execute("SELECT k FROM ledger_dkeys ORDER BY k")), np.int32)
        if len(keys) != tail.merged:  # the key tables do not match the tail: trust only the B-tree
            return None
        self._wmain = _MergedKeys(tail.epoch, tail.merged, keys)
        return self._wmain

    def _find_many(
        self, conn: Any, keys: Sequence[tuple[str, str]], batch_dkeys: Sequence[int]
    ) -> dict[tuple[str, str], int]:
        """The logged index of each of ``keys`` (``batch_dkeys``: their dedup keys, in the same order)."""
        dkeys = list(set(batch_dkeys))
        tail = self._writer_tail(conn)
        main = self._merged_keys(conn, tail)
        probe = dkeys if main is None else main.present(dkeys)
        found = self._main_matches(conn, probe) if probe else []
        tail_hits, idxs = tail.index.lookup(dkeys)
        for chunk in _chunks(idxs):
            marks = ",".join([self.ph] * len(chunk))
            found += conn.execute(
                f"SELECT idx, entry FROM ledger_entries WHERE idx IN ({marks})", chunk
            ).fetchall()
        out: dict[tuple[str, str], int] = {}
        if found:  # usually none or a few 32-bit key collisions: a batch of new entries
            hits = {int(k) for k in probe} | tail_hits
            _collect(out, {k for k, d in zip(keys, batch_dkeys, strict=True) if d in hits}, found)
        return out


class _MergedKeys:
    """A sorted array of the dedup keys in ``ledger_dkeys`` for ``(epoch, merged)``, which identify
    its content (every entry before ``merged`` of that reset epoch). Most appended entries are new,
    and a binary search in memory tells so for a whole batch, 4 bytes per entry, without a B-tree
    probe per key; the few keys it finds are then looked up in the database and confirmed."""

    __slots__ = ("epoch", "keys", "merged")

    def __init__(self, epoch: int, merged: int, keys: npt.NDArray[np.int32]) -> None:
        self.epoch, self.merged, self.keys = epoch, merged, keys

    def present(self, dkeys: Sequence[int]) -> list[int]:
        if not len(self.keys):
            return []
        q = np.sort(np.fromiter(dkeys, np.int32, len(dkeys)))  # sorted queries search faster
        pos = np.minimum(np.searchsorted(self.keys, q), len(self.keys) - 1)
        return [int(k) for k in q[self.keys[pos] == q]]

    def add(self, new: npt.NDArray[np.int32], merged: int) -> None:
        """Add the (sorted) keys of a merged tail."""
        self.keys = np.insert(self.keys, np.searchsorted(self.keys, new), new)
        self.merged = merged


class _KeyIndex:
    """Sorted ``(key, index)`` pairs of the tail rows read so far: a batch of keys is looked up with two
    binary searches per key, all in numpy (12 bytes per entry)."""

    __slots__ = ("idx", "keys")

    def __init__(self) -> None:
        self.keys: npt.NDArray[np.int32] = np.empty(0, np.int32)
        self.idx: npt.NDArray[np.int64] = np.empty(0, np.int64)

    def add(self, keys: npt.NDArray[np.int32], first: int) -> None:
        """Add the keys of the entries ``first, first + 1, ...``."""
        order = np.argsort(keys, kind="stable")
        k = keys[order]
        pos = np.searchsorted(self.keys, k, side="right")  # after equal keys: indices stay ascending
        self.keys = np.insert(self.keys, pos, k)
        self.idx = np.insert(self.idx, pos, order.astype(np.int64) + first)

    def lookup(self, query: Sequence[int]) -> tuple[set[int], list[int]]:
        """The keys of ``query`` that are present, and every index holding one of them (ascending)."""
        if not len(self.keys) or not len(query):
            return set(), []
        q = np.unique(np.fromiter(query, np.int64, len(query)))
        q = q[(q >= -(2**31)) & (q < 2**31)].astype(np.int32)
        lo = np.searchsorted(self.keys, q, side="left")
        hi = np.searchsorted(self.keys, q, side="right")
        hit = hi > lo
        if not hit.any():
            return set(), []
        lo, hi = lo[hit], hi[hit]
        counts = hi - lo
        starts = np.repeat(lo - (np.cumsum(counts) - counts), counts)
        positions = starts + np.arange(int(counts.sum()))
        return {int(k) for k in q[hit]}, sorted(self.idx[positions].tolist())


class _WriterTail:
    """The tail's dedup keys as the writer last wrote or read them, for the lookup of a whole batch."""

    __slots__ = ("epoch", "firsts", "index", "merged")

    def __init__(self, epoch: int, merged: int) -> None:
        self.epoch = epoch
        self.merged = merged  # the first index in the tail
        self.firsts: list[int] = []
        self.index = _KeyIndex()

    def add(self, first: int, dkeys: npt.NDArray[np.int32]) -> None:
        if not self.firsts:
            self.merged = first
        self.firsts.append(first)
        self.index.add(dkeys, first)

    def clear(self, merged: int) -> None:
        self.firsts, self.index, self.merged = [], _KeyIndex(), merged


def _chunks(values: Sequence[int]) -> Iterator[Sequence[int]]:
    for i in range(0, len(values), _CHUNK):
        yield values[i : i + _CHUNK]


def _keys_array(packed: Any) -> npt.NDArray[np.int32]:
    """A tail row's packed little-endian int32 keys as an array."""
    return np.frombuffer(bytes(packed), dtype="<i4").astype(np.int32)


def _executemany(conn: Any, sql: str, rows: Sequence[tuple[Any, ...]]) -> None:
    with contextlib.closing(conn.cursor()) as cur:
        cur.executemany(sql, rows)


def dedup_key(bundle_sha256: str, source_org: str) -> int:
    """The indexed 32-bit key for the idempotency lookup of ``(bundle_sha256, source_org)``.

    The bundle hash is already uniformly distributed, so its first 4 bytes (little-endian, signed) are
    the key; the same bundle from two sources shares a key, and candidates are always compared exactly
    with the stored entry, so a collision costs one extra row read, never a wrong answer. 32 bits keep
    the index small (a random insert dirties fewer pages); a value that is not hex (never stored:
    entries are validated) hashes instead. :func:`dedup_keys` is the batch form.
    """
    try:
        raw = bytes.fromhex(bundle_sha256[:8])
    except ValueError:
        raw = hashlib.sha256(f"{bundle_sha256}\n{source_org}".encode()).digest()
    return int.from_bytes(raw[:4], "little", signed=True)


def dedup_keys(bundles: Sequence[str]) -> list[int]:
    """``[dedup_key(b, ...) for b in bundles]`` for *validated* bundle hashes (64 lowercase hex each)."""
    raw = bytes.fromhex("".join(bundles))
    if len(raw) != 32 * len(bundles):
        raise ValueError("dedup_keys takes validated 64-character bundle hashes")
    return _prefixes(raw)


def leaf_key(leaf_hash: bytes) -> int:
    """The indexed 32-bit prefix of a leaf hash (little-endian, signed)."""
    return int.from_bytes(leaf_hash[:4], "little", signed=True)


def leaf_keys(leaf_hashes: Sequence[bytes]) -> list[int]:
    """``[leaf_key(h) for h in leaf_hashes]`` for 32-byte hashes."""
    return _prefixes(b"".join(leaf_hashes))


def _prefixes(raw: bytes) -> list[int]:
    """The signed little-endian int32 at the start of every 32-byte record of ``raw``."""
    if _LITTLE:
        return memoryview(raw).cast("i")[::8].tolist()
    return [int.from_bytes(raw[i : i + 4], "little", signed=True) for i in range(0, len(raw), 32)]


_LITTLE = sys.byteorder == "little" and struct.calcsize("i") == 4


def _entry_row(row: Sequence[Any]) -> EntryRow:
    return EntryRow(int(row[0]), bytes(row[1]), bytes(row[2]), int(row[3]), int(row[4]))


def _entry_key(entry: bytes) -> tuple[str, str]:
    obj = orjson.loads(entry)
    return str(obj["bundle_sha256"]), str(obj["source_org"])


def _collect(out: dict[tuple[str, str], int], wanted: set[tuple[str, str]], rows: Sequence[Any]) -> None:
    """Confirm key matches against the stored entries (the lowest index wins)."""
    for idx, entry in sorted(rows, key=lambda r: int(r[0])):
        try:
            key = _entry_key(bytes(entry))
        except (orjson.JSONDecodeError, KeyError, TypeError):
            continue  # a corrupt row never matches; `ledger verify` reports it
        if key in wanted and key not in out:
            out[key] = int(idx)


def _get_tiles(conn: Any, q: Any, keys: set[tuple[int, int]]) -> dict[tuple[int, int], tuple[int, bytes]]:
    if not keys:
        return {}
    ints = [tile_key(k, t) for k, t in keys]
    out: dict[tuple[int, int], tuple[int, bytes]] = {}
    for i in range(0, len(ints), _CHUNK):
        chunk = ints[i : i + _CHUNK]
        marks = ",".join(["?"] * len(chunk))
        cur = conn.execute(
            q(f"SELECT tile_key, width, hashes FROM ledger_tiles WHERE tile_key IN ({marks})"), chunk
        )
        for key, width, blob in cur.fetchall():
            out[split_key(int(key))] = (int(width), bytes(blob))
    return out


class _SqlTxn:
    __slots__ = ("_conn", "_s")

    def __init__(self, storage: _SqlBase, conn: Any) -> None:
        self._s = storage
        self._conn = conn

    def _one(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self._conn.execute(self._s._q(sql), params).fetchone()

    def size(self) -> int:
        return self.size_epoch()[0]

    def size_epoch(self) -> tuple[int, int]:
        """The size and reset epoch, read under the writers' lock."""
        row = self._conn.execute(self._s._lock_meta_sql()).fetchone()
        return int(row[0]), int(row[1])

    def find_many(self, keys: Sequence[tuple[str, str]], dkeys: Sequence[int]) -> dict[tuple[str, str], int]:
        return self._s._find_many(self._conn, keys, dkeys)

    def last_tiles(self) -> list[Tile]:
        out: list[Tile] = []
        k = 0
        while True:
            row = self._one(
                "SELECT tile_key, width, hashes FROM ledger_tiles WHERE tile_key >= ? AND tile_key < ?"
                " ORDER BY tile_key DESC LIMIT 1",
                (tile_key(k, 0), tile_key(k + 1, 0)),
            )
            if row is None:
                return out
            kk, t = split_key(int(row[0]))
            try:
                out.append(Tile.decode(kk, t, int(row[1]), bytes(row[2])))
            except ValueError as exc:
                raise LedgerError(f"stored tile ({kk}, {t}) is corrupt") from exc
            k += 1

    def get_tiles(self, keys: set[tuple[int, int]]) -> dict[tuple[int, int], tuple[int, bytes]]:
        return _get_tiles(self._conn, self._s._q, keys)

    def insert_entries(self, rows: Sequence[InsertRow]) -> None:
        self._s._append_rows(self._conn, rows)

    def put_tiles(self, tiles: Sequence[Tile]) -> None:
        _executemany(
            self._conn,
            self._s._q(
                "INSERT INTO ledger_tiles (tile_key, width, hashes) VALUES (?, ?, ?)"
                " ON CONFLICT (tile_key) DO UPDATE SET width = excluded.width, hashes = excluded.hashes"
            ),
            [(tile_key(t.k, t.t), t.width, t.encode()) for t in tiles],
        )

    def set_size(self, size: int) -> None:
        self._conn.execute(self._s._q("UPDATE ledger_meta SET size = ? WHERE id = 1"), (size,))

    def last_checkpoint(self) -> tuple[int, float] | None:
        row = self._one("SELECT size, created_at FROM ledger_checkpoints ORDER BY size DESC LIMIT 1")
        return (int(row[0]), float(row[1])) if row else None

    def put_checkpoint(self, size: int, root: bytes, note: str, created_at: float) -> None:
        self._conn.execute(
            self._s._q(
                "INSERT INTO ledger_checkpoints (size, root, note, created_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (size) DO NOTHING"
            ),
            (size, root, note, created_at),
        )


class SqliteStorage(_SqlBase):
    """SQLite in WAL mode; with ``synchronous=FULL`` (the connector's job) a returned append survives a
    power cut."""

    def __init__(self, connector: Connector, origin: str) -> None:
        super().__init__(connector, origin)
        self._init_schema()

    def _is_db_error(self, exc: BaseException) -> bool:
        return isinstance(exc, sqlite3.Error)

    @contextlib.contextmanager
    def _begin(self, conn: Any) -> Iterator[Any]:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")


class PostgresStorage(_SqlBase):
    """PostgreSQL through psycopg 3; writers serialise on the ``ledger_meta`` row lock."""

    ph = "%s"
    blob_type = "BYTEA"
    key_type = "BIGINT"
    without_rowid = ""

    def __init__(self, connector: Connector, origin: str) -> None:
        super().__init__(connector, origin)
        self._init_schema()

    def _begin(self, conn: Any) -> contextlib.AbstractContextManager[Any]:
        return conn.transaction()  # type: ignore[no-any-return]

    def _is_db_error(self, exc: BaseException) -> bool:
        import psycopg  # only a PostgreSQL ledger needs the driver

        return isinstance(exc, psycopg.Error)

    def _lock_meta_sql(self) -> str:
        return "SELECT size, epoch FROM ledger_meta WHERE id = 1 FOR UPDATE"

    def _schema_lock(self, conn: Any) -> None:
        # Two processes creating the schema at once would otherwise race in the catalog.
        conn.execute("SELECT pg_advisory_xact_lock(7263540117)")

    def _insert_entries(self, conn: Any, rows: Sequence[InsertRow]) -> None:
        with (
            conn.cursor() as cur,
            cur.copy("COPY ledger_entries (idx, leaf_hash, entry, dkey, lkey) FROM STDIN") as copy,
        ):
            for r in rows:
                copy.write_row(r)

    def _main_matches(self, conn: Any, dkeys: list[int]) -> list[Any]:
        if not dkeys:
            return []
        cur = conn.execute(
            "SELECT idx, entry FROM ledger_entries WHERE idx IN (SELECT idx FROM ledger_dkeys WHERE k = ANY(%s))",
            (dkeys,),
        )
        return list(cur.fetchall())


def open_storage(connector: Connector, origin: str) -> _SqlBase:
    """Open (creating the schema if absent) the store ``connector`` connects to.

    Raises :class:`~ledger.errors.LedgerError` for an unknown kind or a database holding another log,
    and :class:`~ledger.errors.StorageUnavailable` when the database cannot be reached.
    """
    if connector.kind == "sqlite":
        return SqliteStorage(connector, origin)
    if connector.kind == "postgresql":
        return PostgresStorage(connector, origin)
    raise LedgerError(f"unsupported ledger database kind {connector.kind!r} (sqlite or postgresql)")
