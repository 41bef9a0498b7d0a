"""A thin portability layer over sqlite3 and psycopg 3 for the MPI store.

SQL is written once with ``?`` placeholders and portable syntax (``INSERT ... ON CONFLICT``); the
PostgreSQL connection rewrites placeholders to ``%s``. Writes run in :meth:`Database.write`, which
serialises writers: ``BEGIN IMMEDIATE`` on SQLite, a transaction-scoped advisory lock on PostgreSQL.
"""

from __future__ import annotations

import re
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

from bridge.errors import ConfigError
from bridge.stores.db import DbUrl, SqliteTuning, WalCheckpointer, connect
from bridge.stores.mpi.config import MpiError, MpiWriterFenced

_ADVISORY_KEY = 0x6D7069  # "mpi"
_INSERT = re.compile(r"(?s)^\s*(INSERT INTO \w+ \([^)]*\)) VALUES \([?, ]+\)(.*)$")
MPI_TUNING = SqliteTuning(
    synchronous="NORMAL",
    # 16 KiB pages (new databases; an existing file keeps its page size): a batch inserts random uuid
    # keys into several indexes, dirtying a page per key or so, and every dirty page is one WAL frame
    # written at commit. Fewer, larger leaves mean fewer frames: the commit of a 1,000-record batch at
    # 150,000 records costs about a third less CPU than with 4 KiB pages.
    page_size=16384,
    cache_kib=65536,  # 64 MiB page cache: the indexes of a large MPI stay hot
    # A batch dirties thousands of random index pages (uuid keys); checkpointing every 80 MB of WAL
    # (5,000 pages of 16 KiB) instead of every 4 MB lets a page rewritten by several batches be copied once.
    wal_autocheckpoint=5000,
    busy_timeout_ms=30_000,
)
#: ids per ``IN (...)`` list on SQLite (host parameter limit: 999 before 3.32, 32766 since)
CHUNK = 2000 if sqlite3.sqlite_version_info >= (3, 32, 0) else 500

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS mpi_patient (
        patient_id TEXT PRIMARY KEY,
        source_org TEXT NOT NULL,
        person_id TEXT NOT NULL,
        features TEXT NOT NULL,
        digest TEXT NOT NULL,
        seq BIGINT NOT NULL,
        updated_at TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS mpi_patient_person ON mpi_patient (person_id)",
    """CREATE TABLE IF NOT EXISTS mpi_block (
        bkey TEXT NOT NULL,
        patient_id TEXT NOT NULL,
        PRIMARY KEY (bkey, patient_id))""",
    "CREATE INDEX IF NOT EXISTS mpi_block_patient ON mpi_block (patient_id)",
    # Pairs are keyed by the records' insertion numbers (mpi_patient.seq), newer record first: a new
    # record's pairs are appended at the right edge of the key's B-tree instead of being scattered over
    # uuid-keyed pages (docs/mpi.md, "Keys with locality"). The ids are kept for reading.
    """CREATE TABLE IF NOT EXISTS mpi_pair (
        rec_hi BIGINT NOT NULL,
        rec_lo BIGINT NOT NULL,
        patient_a TEXT NOT NULL,
        patient_b TEXT NOT NULL,
        state TEXT NOT NULL,
        score DOUBLE PRECISION,
        origin TEXT NOT NULL,
        actor TEXT,
        reason TEXT,
        updated_at TEXT NOT NULL,
        PRIMARY KEY (rec_hi, rec_lo)){without_rowid}""",
    "DROP INDEX IF EXISTS mpi_pair_b",
    "CREATE INDEX IF NOT EXISTS mpi_pair_lo ON mpi_pair (rec_lo)",
    # only the review queue reads pairs by state and score, and only POSSIBLE_MATCH ones: a partial index
    # (an index of every pair by (state, score) cost one more random B-tree insert per stored pair)
    "DROP INDEX IF EXISTS mpi_pair_state",
    "CREATE INDEX IF NOT EXISTS mpi_pair_possible ON mpi_pair (score DESC, patient_a, patient_b) "
    "WHERE state = 'POSSIBLE_MATCH'",
    """CREATE TABLE IF NOT EXISTS mpi_alias (
        old_id TEXT PRIMARY KEY,
        person_id TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS mpi_history (
        seq {serial},
        at TEXT NOT NULL,
        action TEXT NOT NULL,
        patient_a TEXT,
        patient_b TEXT,
        person_id TEXT,
        other_person_id TEXT,
        actor TEXT,
        reason TEXT,
        score DOUBLE PRECISION,
        detail TEXT,
        rec_a BIGINT,
        rec_b BIGINT)""",
    # records are looked up by their insertion numbers (rec_a, rec_b: mpi_patient.seq of patient_a and
    # patient_b), for the same reason as the pairs; only person events have person ids (partial indexes)
    "DROP INDEX IF EXISTS mpi_history_a",
    "DROP INDEX IF EXISTS mpi_history_b",
    "DROP INDEX IF EXISTS mpi_history_person",
    "DROP INDEX IF EXISTS mpi_history_other",
    "CREATE INDEX IF NOT EXISTS mpi_history_rec_a ON mpi_history (rec_a) WHERE rec_a IS NOT NULL",
    "CREATE INDEX IF NOT EXISTS mpi_history_rec_b ON mpi_history (rec_b) WHERE rec_b IS NOT NULL",
    "CREATE INDEX IF NOT EXISTS mpi_history_person_id ON mpi_history (person_id) WHERE person_id IS NOT NULL",
    "CREATE INDEX IF NOT EXISTS mpi_history_other_id ON mpi_history (other_person_id) "
    "WHERE other_person_id IS NOT NULL",
    """CREATE TABLE IF NOT EXISTS mpi_tf (
        field TEXT NOT NULL,
        value TEXT NOT NULL,
        n BIGINT NOT NULL,
        PRIMARY KEY (field, value))""",
    """CREATE TABLE IF NOT EXISTS mpi_meta (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL)""",
    # the linker's writer epoch (`fhirbridge mpi run`, docs/mpi.md): claimed by a new leader, checked by
    # every write transaction of a fenced connection; kept by reset()
    """CREATE TABLE IF NOT EXISTS mpi_writer (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        epoch BIGINT NOT NULL,
        holder TEXT NOT NULL,
        since DOUBLE PRECISION NOT NULL)""",
]
SCHEMA_PAIR = next(s for s in SCHEMA if "TABLE IF NOT EXISTS mpi_pair " in s)
TABLES = ("mpi_patient", "mpi_block", "mpi_pair", "mpi_alias", "mpi_history", "mpi_tf", "mpi_meta")


class Pending:
    """A statement running on the database's worker thread (:meth:`Database.insert_many_background`)."""

    def __init__(self, future: Future[None] | None) -> None:
        self._future = future

    def wait(self, *, raise_error: bool = True) -> None:
        """Block until the statement has finished; re-raise its error (unless ``raise_error`` is false:
        on the way out of a failed transaction, whose own error matters)."""
        if self._future is None:
            return
        future, self._future = self._future, None
        exc = future.exception()
        if exc is not None and raise_error:
            raise exc


def chunks(items: Sequence[Any], size: int = CHUNK) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


class Database:
    """One connection to the MPI database. Thread-safe (a lock serialises use of the connection)."""

    #: the writer epoch this connection writes under (:meth:`claim_writer`, :meth:`hold_writer`); every
    #: write transaction checks it is still current (:class:`MpiWriterFenced`). None: no check.
    fence: int | None = None

    def __init__(self, url: str) -> None:
        self.url = url
        self._lock = threading.RLock()
        self._pg: Any = None
        self._lite: sqlite3.Connection | None = None
        self._checkpointer: WalCheckpointer | None = None
        self._path = ""
        try:
            db = DbUrl.parse(url, memory=True)
        except ConfigError as exc:
            raise MpiError(
                f"unsupported MPI database URL {url!r}: use sqlite:///PATH or postgresql://..."
            ) from exc
        self._path = db.target
        try:
            conn = connect(db, MPI_TUNING, connect_timeout=10)
        except (sqlite3.Error, OSError) as exc:
            raise MpiError(f"cannot open the MPI database {db.target!r}: {exc}") from exc
        except Exception as exc:  # psycopg.Error: the DSN may carry a password, so the URL is not repeated
            raise MpiError(f"cannot connect to the MPI database: {exc}") from exc
        if db.kind == "postgresql":
            self._pg = conn
            self.kind = "postgresql"
        else:
            self._lite = conn
            self.kind = "sqlite"
        self._in_write = False
        self._worker: ThreadPoolExecutor | None = None
        self._pending: list[Pending] = []
        try:
            self._create_schema()
        except BaseException:
            self.close()
            raise

    def _sql(self, sql: str) -> str:
        return sql.replace("%", "%%").replace("?", "%s") if self._pg is not None else sql

    def _create_schema(self) -> None:
        with self.write():
            self._migrate_record_keys()
            for stmt in SCHEMA:
                self.execute(self._ddl(stmt))

    def _ddl(self, stmt: str) -> str:
        """A schema statement with its backend-specific parts filled in."""
        serial = "BIGSERIAL PRIMARY KEY" if self._pg is not None else "INTEGER PRIMARY KEY AUTOINCREMENT"
        # SQLite: the pair table is its primary key's B-tree (no separate rowid table and key index)
        without_rowid = "" if self._pg is not None else " WITHOUT ROWID"
        return stmt.replace("{serial}", serial).replace("{without_rowid}", without_rowid)

    def columns(self, table: str) -> list[str] | None:
        """The column names of ``table``, or None if it does not exist."""
        exists = (
            self.one("SELECT to_regclass(?) IS NOT NULL", (table,))
            if self._pg is not None
            else self.one(
                "SELECT COUNT(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)
            )
        )
        if not exists or not exists[0]:
            return None
        return [d[0] for d in self.execute(f"SELECT * FROM {table} LIMIT 0").description]

    def _migrate_record_keys(self) -> None:
        """Bring an index written before pairs and history were keyed by record numbers up to date
        (inside the schema's write transaction: a concurrent opener finds it done)."""
        pair_cols = self.columns("mpi_pair")
        if pair_cols is not None and "rec_hi" not in pair_cols:
            for index in ("mpi_pair_b", "mpi_pair_state", "mpi_pair_possible"):
                self.execute(f"DROP INDEX IF EXISTS {index}")
            self.execute("ALTER TABLE mpi_pair RENAME TO mpi_pair_old")
            if self._pg is not None:  # the key's index keeps its name: free it for the new table's
                self.execute("ALTER INDEX IF EXISTS mpi_pair_pkey RENAME TO mpi_pair_old_pkey")
            self.execute(self._ddl(SCHEMA_PAIR))
            self.execute(
                "INSERT INTO mpi_pair (rec_hi, rec_lo, patient_a, patient_b, state, score, origin, actor, "
                "reason, updated_at) SELECT CASE WHEN a.seq > b.seq THEN a.seq ELSE b.seq END, "
                "CASE WHEN a.seq > b.seq THEN b.seq ELSE a.seq END, p.patient_a, p.patient_b, p.state, "
                "p.score, p.origin, p.actor, p.reason, p.updated_at FROM mpi_pair_old p "
                "JOIN mpi_patient a ON a.patient_id = p.patient_a JOIN mpi_patient b ON b.patient_id = p.patient_b"
            )
            moved = self.one("SELECT (SELECT COUNT(*) FROM mpi_pair), (SELECT COUNT(*) FROM mpi_pair_old)")
            if moved is not None and moved[0] != moved[1]:  # pairs of records that are not in the index
                raise MpiError(
                    f"cannot migrate the MPI pair table: {int(moved[1]) - int(moved[0])} of {moved[1]} pairs "
                    "name records that are not indexed; the database was left unchanged"
                )
            self.execute("DROP TABLE mpi_pair_old")
        history_cols = self.columns("mpi_history")
        if history_cols is not None and "rec_a" not in history_cols:
            self.execute("ALTER TABLE mpi_history ADD COLUMN rec_a BIGINT")
            self.execute("ALTER TABLE mpi_history ADD COLUMN rec_b BIGINT")
            self.execute(
                "UPDATE mpi_history SET "
                "rec_a = (SELECT seq FROM mpi_patient WHERE patient_id = mpi_history.patient_a), "
                "rec_b = (SELECT seq FROM mpi_patient WHERE patient_id = mpi_history.patient_b)"
            )

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        with self._lock:
            if self._pg is not None:
                self._after_background()
                return self._pg.execute(self._sql(sql), params)
            assert self._lite is not None
            return self._lite.execute(sql, params)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        rows = list(rows)
        if not rows:
            return
        with self._lock:
            if self._pg is not None:
                self._after_background()
                with self._pg.cursor() as cur:
                    cur.executemany(self._sql(sql), rows)
            else:
                assert self._lite is not None
                self._lite.executemany(sql, rows)

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return [tuple(r) for r in self.execute(sql, params).fetchall()]

    def one(self, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        with self._lock:
            row = self.execute(sql, params).fetchone()
            return tuple(row) if row is not None else None

    def insert_many(self, sql: str, rows: Sequence[Sequence[Any]], types: Sequence[str]) -> None:
        """``INSERT INTO t (cols) VALUES (?, ...) [ON CONFLICT ...]`` for many rows.

        On PostgreSQL the rows travel as one array per column (``unnest``; ``types`` are the columns'
        PostgreSQL types), i.e. one statement instead of one per row.
        """
        if not rows:
            return
        if self._pg is None:
            self.executemany(sql, rows)
            return
        with self._lock:
            self._after_background()
            self._insert_statement(sql, rows, types)

    def _insert_statement(self, sql: str, rows: Sequence[Sequence[Any]], types: Sequence[str]) -> None:
        """``insert_many`` on PostgreSQL as one ``unnest`` statement, without taking the connection lock."""
        m = _INSERT.match(sql)
        if m is None or len(types) != len(rows[0]):
            raise MpiError(f"insert_many needs an INSERT ... VALUES statement matching its types: {sql[:60]}")
        if not m[2].strip():
            # a plain INSERT (no ON CONFLICT clause): COPY, which the server loads faster than INSERT ...
            # SELECT unnest (1,000 records into a 150,000-record table: ~15 ms against ~20, commit included)
            with (
                self._pg.cursor() as cur,
                cur.copy(m[1].replace("INSERT INTO ", "COPY ", 1) + " FROM STDIN (FORMAT BINARY)") as copy,
            ):
                copy.set_types(list(types))
                for row in rows:
                    copy.write_row(row)
            return
        unnest = ", ".join(f"%b::{t}[]" for t in types)  # binary parameters: much faster array dumping
        columns = [list(c) for c in zip(*rows, strict=True)]
        self._pg.execute(f"{m[1]} SELECT * FROM unnest({unnest}){m[2]}", columns)

    def insert_many_background(
        self, sql: str, rows: Sequence[Sequence[Any]], types: Sequence[str]
    ) -> Pending:
        """:meth:`insert_many`, on PostgreSQL started on a worker thread: the call returns at once and the
        caller computes while the server inserts (in its own process; the client thread waits without the
        GIL). On SQLite the rows are inserted before the call returns: there the insertion is this
        process's own CPU work, and a second thread only added GIL hand-overs (measured).

        Only inside :meth:`write`, by the thread that holds it. Statements keep their order: the worker
        runs them one at a time, and any other statement of this connection first waits for those
        still running (as :meth:`write` does before it commits or rolls back).
        """
        if not self._in_write:
            raise MpiError("insert_many_background runs inside a write transaction only")
        if not rows or self._pg is None:
            self.insert_many(sql, rows, types)
            return Pending(None)
        if self._worker is None:
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mpi-db")
        pending = Pending(self._worker.submit(self._insert_statement, sql, rows, types))
        self._pending.append(pending)  # write() waits for it before it commits or rolls back
        return pending

    def all_in(self, sql: str, values: Sequence[Any], extra: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run ``sql`` (containing one ``IN ({in})``) for ``values`` (in chunks on SQLite, as one array
        parameter on PostgreSQL); ``extra`` params come first."""
        if self._pg is not None:
            if not values:
                return []
            return self.all(sql.replace("IN ({in})", "= ANY(?)"), [*extra, list(values)])
        out: list[tuple[Any, ...]] = []
        for part in chunks(list(values)):
            marks = ",".join("?" * len(part))
            out.extend(self.all(sql.replace("{in}", marks), [*extra, *part]))
        return out

    def exec_in(self, sql: str, values: Sequence[Any], extra: Sequence[Any] = ()) -> None:
        """Execute a statement without results (containing one ``IN ({in})``) for ``values``."""
        if self._pg is not None:
            if values:
                self.execute(sql.replace("IN ({in})", "= ANY(?)"), [*extra, list(values)])
            return
        for part in chunks(list(values)):
            marks = ",".join("?" * len(part))
            self.execute(sql.replace("{in}", marks), [*extra, *part])

    @contextmanager
    def write(self) -> Iterator[None]:
        """A write transaction; writers (in any process) are serialised. Re-entrant within a thread."""
        with self._lock:
            if self._in_write:
                yield
                return
            self._in_write = True
            try:
                if self._pg is not None:
                    with self._pg.transaction():
                        self._pg.execute("SELECT pg_advisory_xact_lock(%s)", (_ADVISORY_KEY,))
                        try:
                            self._check_fence()
                            yield
                        except BaseException:
                            self._settle_pending(raise_error=False)  # before the rollback, not after
                            raise
                        self._settle_pending(raise_error=True)
                else:
                    assert self._lite is not None
                    self._lite.execute("BEGIN IMMEDIATE")
                    try:
                        self._check_fence()
                        yield
                        self._lite.execute("COMMIT")
                        self._checkpoint_soon()
                    except BaseException:
                        if self._lite.in_transaction:  # also when the COMMIT itself failed
                            self._lite.execute("ROLLBACK")
                        raise
            finally:
                self._in_write = False

    def claim_writer(self, holder: str, *, lease_s: float | None = None) -> int:
        """Become the MPI's only writer: a writer epoch higher than any before, checked by every later
        write transaction of this connection (:class:`MpiWriterFenced` once another claims).

        The claim is a write transaction, so it waits for one of the previous writer's under way and
        any later one of that writer sees the new epoch. ``lease_s`` (PostgreSQL): the server ends this
        session when it sits that long inside a transaction, so that a paused writer cannot hold the
        writers' lock (and with it the next claim) while it sleeps.
        """
        self.hold_writer(None, lease_s=lease_s)
        with self.write():
            row = self.one("SELECT epoch FROM mpi_writer WHERE id = 1")
            epoch = (int(row[0]) if row else 0) + 1
            self.execute(
                "INSERT INTO mpi_writer (id, epoch, holder, since) VALUES (1, ?, ?, ?) ON CONFLICT (id) "
                "DO UPDATE SET epoch = excluded.epoch, holder = excluded.holder, since = excluded.since",
                (epoch, holder, time.time()),
            )
        self.fence = epoch
        return epoch

    def hold_writer(self, epoch: int | None, *, lease_s: float | None = None) -> None:
        """Write under ``epoch`` (claimed earlier, by :meth:`claim_writer` on a connection now lost)."""
        if lease_s is not None and self._pg is not None:
            with self._lock:
                self._pg.execute(f"SET idle_in_transaction_session_timeout = {int(lease_s * 1000)}")
        self.fence = epoch

    def writer(self) -> tuple[int, str, float] | None:
        """The current writer's epoch, name and claim time (None before any claim)."""
        row = self.one("SELECT epoch, holder, since FROM mpi_writer WHERE id = 1")
        return (int(row[0]), str(row[1]), float(row[2])) if row else None

    def _check_fence(self) -> None:
        """Inside a write transaction, after the writers' lock: refuse if another writer claimed since."""
        if self.fence is None:
            return
        row = self.execute("SELECT epoch FROM mpi_writer WHERE id = 1").fetchone()
        current = int(row[0]) if row else 0
        if current != self.fence:
            raise MpiWriterFenced(self.fence, current)

    def _after_background(self) -> None:
        """Statements run in order: before one of the writing thread's own, wait for those still on
        the worker (and raise their error here, inside the transaction)."""
        if self._pending:
            self._settle_pending(raise_error=True)

    def _settle_pending(self, *, raise_error: bool) -> None:
        """Wait for the statements still running on the worker thread (inside the transaction)."""
        pending, self._pending = self._pending, []
        for p in pending:
            p.wait(raise_error=raise_error)

    @contextmanager
    def read(self) -> Iterator[None]:
        """A consistent read snapshot (several queries see the same state)."""
        with self._lock:
            if self._in_write:
                yield
            elif self._pg is not None:
                with self._pg.transaction():
                    self._pg.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                    yield
            else:
                assert self._lite is not None
                self._lite.execute("BEGIN")
                try:
                    yield
                finally:
                    self._lite.execute("COMMIT")

    def _checkpoint_soon(self) -> None:
        """After a commit: the WAL is copied into the database file by a thread of its own
        (:class:`bridge.stores.db.WalCheckpointer`; files only, started by the first commit)."""
        if not self._path:
            return
        if self._checkpointer is None:
            self._checkpointer = WalCheckpointer(self._path)
        self._checkpointer.poke()

    def close(self) -> None:
        if self._worker is not None:
            self._worker.shutdown(wait=True)
            self._worker = None
        if self._checkpointer is not None:
            self._checkpointer.close()
            self._checkpointer = None
        with self._lock:
            if self._pg is not None:
                self._pg.close()
            if self._lite is not None:
                self._lite.close()
