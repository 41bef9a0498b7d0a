"""What one process's :class:`~bridge.stores.mpi.store.PersonIndex` keeps between transactions, and when it
may trust it.

:class:`IndexState` holds the database, the configuration and three write-through copies: the record
cache (:mod:`bridge.stores.mpi.cache`), the person graph (:mod:`bridge.stores.mpi.graph`) and the stored model. They
are trusted only while the *generation token* (``mpi_meta.records_gen``, ``epoch.updates.nonce``) is the
one this process wrote last: every write transaction reads the token first (writers are serialised), and
every change of records, pairs, persons or the model writes a new one. ``epoch`` changes on a reset,
``updates`` counts the batches that changed existing records; when only the nonce differs, other
writers only *added* records and the cache catches up instead of being rebuilt.
"""

from __future__ import annotations

import uuid
from typing import Any

import orjson

from bridge.logging import get_logger
from bridge.stores.mpi.cache import RecordCache, load_patterns
from bridge.stores.mpi.config import MpiConfig
from bridge.stores.mpi.db import Database
from bridge.stores.mpi.graph import PersonGraph
from bridge.stores.mpi.matcher import TF_KEYS
from bridge.stores.mpi.model import FSModel

log = get_logger(__name__)


class IndexState:
    """The database, the configuration and this process's copies of what it holds (see module doc)."""

    def __init__(self, db: Database, config: MpiConfig) -> None:
        self.db = db
        self.config = config
        #: the model parsed from the blob ``_model_version`` (see :meth:`model_from`)
        self._model: FSModel | None = None
        self._model_version: str | None = None
        #: ``mpi_meta.model`` as a batch of this process last read or wrote it (see :meth:`batch_model_blob`)
        self.model_blob: str | None = None
        self.model_blob_known = False
        self.cache: RecordCache | None = None
        #: persons and MATCH/manual pairs in memory; None: read the database
        self.graph: PersonGraph | None = None
        #: whether the last write transaction found the generation token as this process had left it
        self.sole_writer = False
        #: the value counts an explanation weighs with (:class:`bridge.stores.mpi.explain.ValueCounts`)
        self.tf_memo: Any = None

    def forget(self) -> None:
        """Drop the record cache and the person graph: a rolled-back transaction may have left them
        ahead of the database."""
        self.cache = None
        self.graph = None

    def forget_model(self) -> None:
        """Drop the remembered model (the database's has been deleted)."""
        self._model = None
        self._model_version = None
        self.model_blob_known = False

    def model_from(self, blob: str | None) -> FSModel:
        """The model stored as ``blob`` (parsed once per distinct blob; None: the priors)."""
        if blob is None:
            return FSModel.prior()
        if blob != self._model_version or self._model is None:
            self._model = FSModel.from_json(orjson.loads(blob))
            self._model_version = blob
        return self._model

    def stored_model(self) -> FSModel:
        """The model the database holds now."""
        row = self.db.one("SELECT value FROM mpi_meta WHERE key = 'model'")
        return self.model_from(row[0] if row else None)

    def batch_model_blob(self) -> str | None:
        """``mpi_meta.model`` inside a batch (a write transaction, after :meth:`records`). Remembered while
        this process is the only writer: every fit, in any process, writes a new generation token, so
        an unchanged token means an unchanged model (one statement less per batch, two with the refit
        check; on PostgreSQL each is a round trip to the server)."""
        if not (self.sole_writer and self.model_blob_known):
            row = self.db.one("SELECT value FROM mpi_meta WHERE key = 'model'")
            self.model_blob, self.model_blob_known = (row[0] if row else None), True
        return self.model_blob

    def records(self) -> RecordCache:
        """The record cache, brought up to date if another process wrote since (call inside a write
        transaction, which serialises writers). Sets :attr:`sole_writer`; when it is false, the person
        graph and the remembered model are dropped too."""
        db = self.db
        row = db.one("SELECT value FROM mpi_meta WHERE key = 'records_gen'")
        gen = row[0] if row else None
        cache = self.cache
        self.sole_writer = cache is not None and cache.gen == gen
        if self.sole_writer:
            return cache  # type: ignore[return-value]
        self.graph = None  # another process wrote since: its links and persons are not in the graph
        # ... and it may have fitted or deleted the model. Forgotten here, not where the model is next
        # needed: a batch that changes nothing or finds no candidate pairs never asks for it, yet it
        # takes the current token, so the batch after it counts as the sole writer's again.
        self.model_blob_known = False
        mine, theirs = parse_gen(cache.gen if cache else None), parse_gen(gen)
        if cache is not None and mine is not None and theirs is not None and mine[:2] == theirs[:2]:
            rows = db.all(
                "SELECT patient_id, source_org, features, digest, seq FROM mpi_patient WHERE seq > ? ORDER BY seq",
                (cache.max_seq,),
            )
            cache.put_many(
                [(pid, org, orjson.loads(blob), digest, int(seq)) for pid, org, blob, digest, seq in rows]
            )
            log.debug("mpi.cache_caught_up", added=len(rows), records=len(cache))
        else:
            rows = db.all(
                "SELECT patient_id, source_org, features, digest, seq FROM mpi_patient ORDER BY seq"
            )
            cache = RecordCache.load(
                ((pid, org, orjson.loads(blob), digest, seq) for pid, org, blob, digest, seq in rows),
                TF_KEYS,
                gen,
            )
            log.info("mpi.cache_loaded", records=len(cache))
        cache.gen = gen
        meta = db.one("SELECT value FROM mpi_meta WHERE key = 'em_patterns'")
        if meta is not None:
            cache.patterns = load_patterns(meta[0])
        else:  # none yet (empty index), or written before counts were kept: EM then samples the records
            cache.patterns = None if len(cache) else {}
        self.cache = cache
        return cache

    def bump_generation(self, cache: RecordCache, *, updated: bool) -> None:
        """Write the token after the cache's (``updated``: existing records changed) and keep it."""
        gen = next_gen(cache.gen, updated=updated)
        self.set_meta("records_gen", gen)
        cache.gen = gen

    def touch(self) -> None:
        """A new generation token after a change of pairs or persons alone (a manual decision): other
        processes drop their person graphs (their record caches just look for new records, finding none)."""
        row = self.db.one("SELECT value FROM mpi_meta WHERE key = 'records_gen'")
        cache = self.cache
        if cache is not None and row is not None and cache.gen == row[0]:
            self.bump_generation(cache, updated=False)
            return
        self.set_meta("records_gen", next_gen(row[0] if row else None, updated=False))

    def new_epoch(self) -> None:
        """A token of a new epoch (after a reset): every process's copies are stale."""
        self.set_meta("records_gen", f"{uuid.uuid4().hex}.0.{uuid.uuid4().hex[:16]}")

    def set_meta(self, key: str, value: str) -> None:
        self.db.execute(
            "INSERT INTO mpi_meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )


def parse_gen(gen: str | None) -> tuple[str, int, str] | None:
    """``(epoch, updates, nonce)`` of a generation token, or None if absent or malformed."""
    if gen is None:
        return None
    parts = gen.split(".")
    if len(parts) != 3 or not parts[1].isdigit():
        return None
    return parts[0], int(parts[1]), parts[2]


def next_gen(gen: str | None, *, updated: bool) -> str:
    """The token after ``gen``: the same epoch, ``updates`` one higher if records changed, a new nonce
    (a new epoch if ``gen`` is absent or malformed)."""
    parsed = parse_gen(gen)
    epoch, updates = parsed[:2] if parsed else (uuid.uuid4().hex, 0)
    return f"{epoch}.{updates + int(updated)}.{uuid.uuid4().hex[:16]}"
