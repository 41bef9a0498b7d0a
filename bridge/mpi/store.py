"""The incremental master patient index (:class:`PersonIndex`) on SQLite or PostgreSQL.

Persons are the connected components of MATCH links (automatic and manual), cut by manual unlinks:
a component is rebuilt by union-find that applies manual links first, then automatic MATCH links by
descending score, skipping any automatic link that would join two records a person has manually
declared different. A person's id is derived from its oldest record (``uuid5`` of that record's id),
so it is stable while records are added; after a merge the older person's id survives (the other id is
kept as an alias), and after a split the part holding the oldest record keeps it.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import itertools
import uuid
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import orjson

from bridge.logging import get_logger
from bridge.mpi.arrays import distinct
from bridge.mpi.blocking import blocking_keys, candidate_pairs
from bridge.mpi.cache import (
    Placed,
    RecordCache,
    add_patterns,
    dump_patterns,
    load_patterns,
    patterns_array,
)
from bridge.mpi.compare import FIELDS, compare_pairs
from bridge.mpi.config import MatchState, MpiConfig, MpiConflict, MpiError, MpiInputError, MpiNotFound
from bridge.mpi.db import TABLES, Database
from bridge.mpi.features import Features, extract_features
from bridge.mpi.graph import PersonGraph
from bridge.mpi.matcher import TF_KEYS, TermFrequencies, fit_patterns, weigh
from bridge.mpi.model import FSModel
from bridge.mpi.unionfind import UnionFind

log = get_logger(__name__)

_PERSON_NS = uuid.UUID("5b0f6a3e-3c1f-4b55-9d1e-6d70690a0001")
_HISTORY_INSERT = (
    "INSERT INTO mpi_history (at, action, patient_a, patient_b, person_id, other_person_id, actor, reason, "
    "score, detail, rec_a, rec_b) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_HISTORY_TYPES = ("text",) * 8 + ("double precision", "text", "bigint", "bigint")
_HISTORY_COLUMNS = (
    "seq, at, action, patient_a, patient_b, person_id, other_person_id, actor, reason, score, detail"
)
_PATIENT_INSERT = (
    "INSERT INTO mpi_patient (patient_id, source_org, person_id, features, digest, seq, updated_at) "
    "VALUES (?, ?, ?, ?, ?, ?, ?)"
)
_PATIENT_TYPES = ("text", "text", "text", "text", "text", "bigint", "text")
_PAIR_INSERT = (
    "INSERT INTO mpi_pair (rec_hi, rec_lo, patient_a, patient_b, state, score, origin, actor, reason, "
    "updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_PAIR_UPSERT = (
    f"{_PAIR_INSERT} ON CONFLICT (rec_hi, rec_lo) DO UPDATE SET state = excluded.state, score = excluded.score, "
    "updated_at = excluded.updated_at WHERE mpi_pair.origin = 'auto'"
)
_PAIR_TYPES = ("bigint", "bigint") + ("text",) * 3 + ("double precision",) + ("text",) * 4
MATCH = MatchState.MATCH.value
POSSIBLE = MatchState.POSSIBLE_MATCH.value
NO_MATCH = MatchState.NO_MATCH.value


_PERSON_NS_BYTES = _PERSON_NS.bytes


@functools.lru_cache(maxsize=131072)
def person_id_for(patient_id: str) -> str:
    """The person id a record founds (a FHIR-id-safe UUID derived from the record id).

    Equal to ``str(uuid.uuid5(_PERSON_NS, patient_id))``, computed without building UUID objects.
    """
    h = bytearray(hashlib.sha1(_PERSON_NS_BYTES + patient_id.encode(), usedforsecurity=False).digest()[:16])
    h[6] = (h[6] & 0x0F) | 0x50
    h[8] = (h[8] & 0x3F) | 0x80
    x = h.hex()
    return f"{x[:8]}-{x[8:12]}-{x[12:16]}-{x[16:20]}-{x[20:]}"


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _pair(a: str, b: str) -> tuple[str, str]:
    return (a, b) if a < b else (b, a)


class PersonIndex:
    """The master patient index. Open with :meth:`open`; every public method is one transaction.

    Writers (the index consumer, the review API) are serialised across processes; readers see
    committed state. Raises :class:`~bridge.mpi.config.MpiError` subclasses on bad input, unknown ids
    and contradictory manual decisions.
    """

    def __init__(self, db: Database, config: MpiConfig) -> None:
        self.db = db
        self.config = config
        self._model: FSModel | None = None
        self._model_version: str | None = None
        #: ``mpi_meta.model`` as a batch of this process last read or wrote it (see _batch_model_blob)
        self._model_blob: str | None = None
        self._model_blob_known = False
        self._cache: RecordCache | None = None
        #: persons and MATCH/manual pairs in memory (see bridge.mpi.graph); None: read the database
        self._graph: PersonGraph | None = None
        #: whether the last write transaction found the generation token as this process had left it
        self._sole_writer = False

    @classmethod
    def open(cls, url: str, config: MpiConfig | None = None) -> PersonIndex:
        """Open (creating tables if needed) the index at ``sqlite:///path.db`` or ``postgresql://...``."""
        return cls(Database(url), config or MpiConfig())

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> PersonIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ model

    def model(self) -> FSModel:
        """The current Fellegi–Sunter parameters (EM-fitted once enough records exist, else priors)."""
        row = self.db.one("SELECT value FROM mpi_meta WHERE key = 'model'")
        return self._model_from(row[0] if row else None)

    def _model_from(self, blob: str | None) -> FSModel:
        """The model stored as ``blob`` (parsed once per distinct blob; None: the priors)."""
        if blob is None:
            return FSModel.prior()
        if blob != self._model_version or self._model is None:
            self._model = FSModel.from_json(orjson.loads(blob))
            self._model_version = blob
        return self._model

    def _batch_model_blob(self) -> str | None:
        """``mpi_meta.model`` inside a batch (a write transaction, after :meth:`_records`). Remembered while
        this process is the only writer: every fit, in any process, writes a new generation token, so
        an unchanged token means an unchanged model (one statement less per batch, two with the refit
        check; on PostgreSQL each is a round trip to the server)."""
        if not (self._sole_writer and self._model_blob_known):
            row = self.db.one("SELECT value FROM mpi_meta WHERE key = 'model'")
            self._model_blob, self._model_blob_known = (row[0] if row else None), True
        return self._model_blob

    def _maybe_fit(self, total: int) -> None:
        cfg = self.config
        if total < cfg.em_min_records:
            return
        fitted_on = self._model_from(self._batch_model_blob()).fitted_on_records  # the priors: 0
        if fitted_on and total < fitted_on * cfg.em_refit_factor:
            return
        self._fit(total=total, incremental=True)

    def fit(self, *, total: int | None = None) -> FSModel:
        """Re-estimate m/u/lambda by EM on (a sample of) the stored records and persist them.

        Existing decisions are not re-scored; new comparisons use the new parameters.
        """
        try:
            return self._fit(total=total, incremental=False)
        except BaseException:
            self._cache = None  # rolled back: the cached EM counts may be ahead of the database
            self._graph = None
            raise

    def _fit(self, *, total: int | None, incremental: bool) -> FSModel:
        """EM fit. ``incremental``: from the comparison vectors counted while scoring (no re-comparison),
        when they are known; otherwise from the candidate pairs of a systematic sample of the records."""
        with self.db.write():
            cache = self._records()
            if total is None:
                total = len(cache)
            if incremental and cache.patterns is not None:
                patterns, counts = patterns_array(cache.patterns, len(FIELDS))
                sampled, pairs = total, int(counts.sum())
            else:
                step = max(1, -(-total // self.config.em_sample_records))
                sample = np.nonzero(cache.seqs() % step == 0)[0]
                ids = cache.ids
                keys = [blocking_keys(cache.features(ids[r])) for r in sample.tolist()]
                ia, ib, _ = candidate_pairs(keys, self.config.max_block_size)
                acc: dict[bytes, int] = {}
                add_patterns(acc, compare_pairs(cache.table(), sample[ia], sample[ib]))
                patterns, counts = patterns_array(acc, len(FIELDS))
                sampled, pairs = len(sample), len(ia)
                if step == 1:  # every candidate pair of the index: from now on, count incrementally
                    cache.patterns = acc
                    self._set_meta("em_patterns", dump_patterns(acc))
            model = fit_patterns(patterns, counts, total, self.config)
            model.fitted_on_records = total
            blob = orjson.dumps(model.to_json()).decode()
            self._set_meta("model", blob)
            # if this transaction rolls back, the blob is not trusted again: the failure drops the cache,
            # so the next transaction is not the sole writer's, and _records() forgets the blob
            self._model_blob, self._model_blob_known = blob, True
            # a new token makes every other writer re-read the EM counts (a recount may have replaced
            # them) before its next batch, instead of writing its own older copy over them
            self._bump_generation(cache, updated=False)
            log.info(
                "mpi_em_fit",
                records=total,
                sampled=sampled,
                pairs=pairs,
                iterations=model.iterations,
                match_rate=round(model.lam, 4),
            )
            return model

    def _set_meta(self, key: str, value: str) -> None:
        self.db.execute(
            "INSERT INTO mpi_meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    # ------------------------------------------------------------------ ingest

    def upsert_patients(self, patients: Sequence[tuple[str, dict[str, Any]]]) -> None:
        """Index a batch of ``(source_org, Patient)`` in one transaction.

        New and changed records are blocked and scored against the index; MATCH pairs are linked
        (persons merge), POSSIBLE_MATCH pairs go to the review queue; pairs with a manual decision are
        left alone. Re-upserting identical demographics is a no-op; a changed record loses its
        automatic pairs and is re-scored. Raises :class:`MpiInputError` (naming the batch position) if
        an item is not a Patient with an id or lacks a source organisation; nothing is written then.
        """
        batch: dict[str, tuple[str, Features]] = {}
        systems = self.config.strong_identifier_systems
        for i, item in enumerate(patients):
            try:
                org, resource = item
            except (TypeError, ValueError):
                raise MpiInputError(
                    "expected a (source_org, Patient) pair", location=f"patients[{i}]"
                ) from None
            if not isinstance(org, str) or not org:
                raise MpiInputError("source_org must be a non-empty string", location=f"patients[{i}]")
            try:
                feats = extract_features(resource, systems)
            except MpiInputError as exc:
                raise MpiInputError(str(exc), location=f"patients[{i}]") from None
            batch[resource["id"]] = (org, feats)
        if not batch:
            return
        try:
            with self.db.write():
                self._upsert(batch)
        except BaseException:
            self._cache = None  # the transaction rolled back: the write-through copy may be ahead of it
            self._graph = None
            raise

    def _records(self) -> RecordCache:
        """The record cache, brought up to date if another process wrote records since (call inside a
        write transaction, which serialises writers).

        The generation token is ``epoch.updates.nonce``: ``epoch`` changes on :meth:`reset`, ``updates``
        counts the batches that changed existing records. If only the nonce differs, other writers only
        *added* records: those (``seq`` above the cached maximum) are read. Otherwise the cache is rebuilt.
        """
        row = self.db.one("SELECT value FROM mpi_meta WHERE key = 'records_gen'")
        gen = row[0] if row else None
        cache = self._cache
        self._sole_writer = cache is not None and cache.gen == gen
        if self._sole_writer:
            return cache  # type: ignore[return-value]
        self._graph = None  # another process wrote since: its links and persons are not in the graph
        # ... and it may have fitted or deleted the model. Forgotten here, not where the model is next
        # needed: a batch that changes nothing or finds no candidate pairs never asks for it, yet it
        # takes the current token, so the batch after it counts as the sole writer's again.
        self._model_blob_known = False
        mine, theirs = _parse_gen(cache.gen if cache else None), _parse_gen(gen)
        if cache is not None and mine is not None and theirs is not None and mine[:2] == theirs[:2]:
            rows = self.db.all(
                "SELECT patient_id, source_org, features, digest, seq FROM mpi_patient WHERE seq > ? ORDER BY seq",
                (cache.max_seq,),
            )
            cache.put_many(
                [(pid, org, orjson.loads(blob), digest, int(seq)) for pid, org, blob, digest, seq in rows]
            )
            log.debug("mpi_cache_caught_up", added=len(rows), records=len(cache))
        else:
            rows = self.db.all(
                "SELECT patient_id, source_org, features, digest, seq FROM mpi_patient ORDER BY seq"
            )
            cache = RecordCache.load(
                ((pid, org, orjson.loads(blob), digest, seq) for pid, org, blob, digest, seq in rows),
                TF_KEYS,
                gen,
            )
            log.info("mpi_cache_loaded", records=len(cache))
        cache.gen = gen
        meta = self.db.one("SELECT value FROM mpi_meta WHERE key = 'em_patterns'")
        if meta is not None:
            cache.patterns = load_patterns(meta[0])
        else:  # none yet (empty index), or written before counts were kept: EM then samples the records
            cache.patterns = None if len(cache) else {}
        self._cache = cache
        return cache

    def _bump_generation(self, cache: RecordCache, *, updated: bool) -> None:
        gen = _next_gen(cache.gen, updated=updated)
        self._set_meta("records_gen", gen)
        cache.gen = gen

    def _touch(self) -> None:
        """A new generation token after a change of pairs or persons alone (a manual decision): other
        processes drop their person graphs (their record caches just look for new records, finding none)."""
        row = self.db.one("SELECT value FROM mpi_meta WHERE key = 'records_gen'")
        cache = self._cache
        if cache is not None and row is not None and cache.gen == row[0]:
            self._bump_generation(cache, updated=False)
            return
        self._set_meta("records_gen", _next_gen(row[0] if row else None, updated=False))

    def _upsert(self, batch: dict[str, tuple[str, Features]]) -> None:
        db = self.db
        now = _now()
        cache = self._records()
        changed: list[str] = []
        digests: dict[str, str] = {}
        blobs: dict[str, bytes] = {}
        state = cache.state
        for pid, (org, feats) in batch.items():
            blob = orjson.dumps(feats, option=orjson.OPT_SORT_KEYS)  # what features_digest() hashes
            blobs[pid] = blob
            digests[pid] = hashlib.sha256(blob).hexdigest()[:32]
            old = state.get(pid)
            if old is None or old[0] != digests[pid] or old[1] != org:
                changed.append(pid)
        if not changed:
            return
        graph = self._graph
        if graph is None and self._sole_writer:
            graph = self._graph = PersonGraph.load(db)
        seeds: set[str] = set()
        updated = [pid for pid in changed if pid in state]
        if updated:
            seeds.update(updated)
            if graph is not None:
                for pid in updated:
                    graph.drop_auto_pairs(pid)
            db.exec_in("DELETE FROM mpi_block WHERE patient_id IN ({in})", updated)  # legacy rows
            recs = sorted(state[pid][2] for pid in updated)
            for side in ("rec_hi", "rec_lo"):
                for a, b in db.all_in(
                    f"SELECT patient_a, patient_b FROM mpi_pair WHERE origin = 'auto' AND {side} IN ({{in}})",
                    recs,
                ):
                    seeds.update((a, b))
                db.exec_in(f"DELETE FROM mpi_pair WHERE origin = 'auto' AND {side} IN ({{in}})", recs)
            person_of = dict(
                db.all_in("SELECT patient_id, person_id FROM mpi_patient WHERE patient_id IN ({in})", updated)
            )
            for pid in updated:
                self._history(
                    "record-updated",
                    (pid, state[pid][2]),
                    None,
                    person_of.get(pid),
                    None,
                    None,
                    None,
                    {"digest": digests[pid]},
                )
        max_seq = cache.max_seq
        rows = []
        items = []
        for pid in changed:
            org, feats = batch[pid]
            old = state.get(pid)
            if old is not None:
                db.execute(
                    "UPDATE mpi_patient SET source_org = ?, features = ?, digest = ?, updated_at = ? WHERE patient_id = ?",
                    (org, blobs[pid].decode(), digests[pid], now, pid),
                )
                seq = old[2]
            else:
                max_seq += 1
                seq = max_seq
                person = person_id_for(pid)
                rows.append((pid, org, person, blobs[pid].decode(), digests[pid], seq, now))
                if graph is not None:
                    graph.add_record(pid, person)
            items.append((pid, org, feats, digests[pid], seq))
        # With the person graph, reclustering reads nothing from the database, so the new records are
        # written last, with the persons they end up in (a record that merges is written once, not
        # written and then moved). Otherwise they are written first; on PostgreSQL the server inserts
        # them (sent from the database's worker thread) while this thread updates the cache and
        # compares, in memory only: no database use until it is done.
        pending = None
        if graph is None:
            pending = db.insert_many_background(_PATIENT_INSERT, rows, _PATIENT_TYPES)
        try:
            ia, ib = self._candidates(cache, changed, cache.put_batch(items))
            gamma = compare_pairs(cache.table(), ia, ib)
        except BaseException:
            if pending is not None:
                pending.wait(raise_error=False)
            raise
        if pending is not None:
            pending.wait()
        self._bump_generation(cache, updated=bool(updated))
        self._score_new(ia, ib, gamma, len(cache), now, seeds, only_new=not updated)
        fresh = frozenset(r[2] for r in rows)
        persons = self._recluster(seeds, now, fresh=fresh, unwritten=pending is None) if seeds else {}
        if pending is None:
            db.insert_many(
                _PATIENT_INSERT, [(r[0], r[1], persons.get(r[0], r[2]), *r[3:]) for r in rows], _PATIENT_TYPES
            )

    def _candidates(
        self, cache: RecordCache, changed: list[str], placed: Placed
    ) -> tuple[np.ndarray, np.ndarray]:
        """Candidate pairs ``(changed record, other record)`` from the in-memory blocks, as cache rows.

        Each pair once: a pair of two changed records is owned by the one with the smaller id. In no
        particular order (the caller orders what it stores). Blocks holding more than ``max_block_size``
        records (very common values: a default birth date, SMITH JOHN) are skipped; the other blocking
        keys still bring true matches together.
        """
        cap = self.config.max_block_size
        flat_rows = np.asarray(placed.rows, dtype=np.int64)
        values = np.asarray(placed.values, dtype=np.int64)
        # every key's block: a row set when it holds several records, else this record alone
        several = np.nonzero(values < 0)[0]
        groups = cache.block_sets(values[several])
        sizes = np.ones(len(values), dtype=np.int64)
        sizes[several] = np.fromiter(map(len, groups), dtype=np.int64, count=len(groups))
        over = sizes > cap
        if over.any():
            flat_keys = list(itertools.chain.from_iterable(placed.keys))
            log.debug(
                "mpi_blocks_skipped",
                blocks=len({k for k, o in zip(flat_keys, over, strict=True) if o}),
                cap=cap,
            )
        use = (sizes > 1) & ~over
        if not use.any():
            empty = np.zeros(0, dtype=np.int64)
            return empty, empty
        right = np.fromiter(
            itertools.chain.from_iterable(itertools.compress(groups, use[several].tolist())),
            dtype=np.int64,
            count=int(sizes[use].sum()),
        )
        left = np.repeat(flat_rows[use], sizes[use])
        n = len(cache.ids)
        # a pair of two changed records: once, as (smaller id, larger id) (rank = position in id order);
        # either of the two may be the one that found it
        row_of = cache.row_of
        rank = np.full(n, -1, dtype=np.int64)
        order = sorted(changed)
        rank[np.fromiter(map(row_of.__getitem__, order), dtype=np.int64, count=len(order))] = np.arange(
            len(order)
        )
        swap = (rank[right] >= 0) & (rank[right] < rank[left])
        first = np.where(swap, right, left)
        second = np.where(swap, left, right)
        keep = first != second
        codes = distinct(first[keep] * n + second[keep])
        return codes // n, codes % n

    def _score_new(
        self,
        ia: np.ndarray,
        ib: np.ndarray,
        gamma: np.ndarray,
        total: int,
        now: str,
        seeds: set[str],
        *,
        only_new: bool = False,
    ) -> None:
        """Weigh and store the batch's compared candidate pairs (cache rows ``ia``, ``ib``).

        ``only_new``: the batch changed no existing record, so every pair has a record of this batch as
        its newer side, a key no stored pair can hold: the pairs are inserted without the upsert clause
        (on PostgreSQL that makes it a COPY)."""
        db = self.db
        cache = self._cache
        graph = self._graph
        assert cache is not None
        if not len(ia):
            if cache.patterns == {}:  # counting, nothing counted yet: say so (found by review). Without
                # the row, another process reads "counts not kept" and stops counting; EM then samples
                self._set_meta("em_patterns", dump_patterns(cache.patterns))
            self._maybe_fit(total)
            return
        table = cache.table()
        if cache.patterns is not None:
            add_patterns(cache.patterns, gamma)
            self._set_meta("em_patterns", dump_patterns(cache.patterns))
        self._maybe_fit(total)  # after counting this batch's pairs: the first fit includes them
        tf = None
        if self.config.term_frequency:  # value counts by code: a frequency is an array lookup
            tf = TermFrequencies({}, total, cache.sum_sq, lookup=cache.row_frequencies)
        scored = weigh(gamma, ia, table, self._model_from(self._batch_model_blob()), self.config, tf)
        keep = np.nonzero(scored.state != NO_MATCH)[0]
        if len(keep) == 0:
            return
        ids = cache.ids
        ra, rb = ia[keep], ib[keep]
        seqs = cache.seqs()
        # in the order of (owner, other) ids: the order in which the pairs and their history are written
        found = sorted(
            zip(
                map(ids.__getitem__, ra.tolist()),
                map(ids.__getitem__, rb.tolist()),
                scored.state[keep].tolist(),
                scored.prob[keep].tolist(),
                seqs[ra].tolist(),
                seqs[rb].tolist(),
                strict=True,
            )
        )
        # pairs holding a manual decision are left alone: the person graph knows them all (it keeps every
        # manual pair); without it, they are read (by the newer record of the pair)
        if graph is not None:
            manual = {(x, y) for x, y, *_ in found if graph.is_manual(x, y)}
        else:
            by_seq = {(max(sx, sy), min(sx, sy)): (x, y) for x, y, _s, _p, sx, sy in found}
            manual = {
                by_seq[key]
                for key in db.all_in(
                    "SELECT rec_hi, rec_lo FROM mpi_pair WHERE origin = 'manual' AND rec_hi IN ({in})",
                    sorted({hi for hi, _lo in by_seq}),
                )
                if key in by_seq
            }
        rows = []
        history = []
        for x, y, state, score, sx, sy in found:
            if (x, y) in manual:
                continue
            a, b, sa, sb = (x, y, sx, sy) if x < y else (y, x, sy, sx)
            hi, lo = (sa, sb) if sa > sb else (sb, sa)
            score = round(score, 6)
            rows.append((hi, lo, a, b, state, score, "auto", None, None, now))
            if graph is not None:
                graph.set_pair(a, b, state, score, "auto")
            action = "auto-match" if state == MATCH else "possible-match"
            history.append((now, action, a, b, None, None, "matcher", None, score, None, sa, sb))
            if state == MATCH:
                seeds.update((a, b))
        db.insert_many(_PAIR_INSERT if only_new else _PAIR_UPSERT, rows, _PAIR_TYPES)
        db.insert_many(_HISTORY_INSERT, history, _HISTORY_TYPES)

    # ------------------------------------------------------------------ persons

    def _component(
        self, seeds: Iterable[str]
    ) -> tuple[dict[str, tuple[str, int]], list[tuple[str, str, str, float | None, str]]]:
        """The records connected to ``seeds`` through current persons or MATCH pairs, as
        ``{patient: (person id, seq)}``, and every pair among them ``(a, b, state, score, origin)``.

        Three statements per step of the search: the members of the frontier's persons (with what
        reclustering needs of them) and the pairs touching the frontier, of any state (the MATCH ones
        extend the search; the manual ones constrain the persons).
        """
        db = self.db
        if db.kind == "postgresql":
            # ARRAY(subquery): without it the planner hash-joins against a scan of every record
            members_sql = (
                "SELECT patient_id, person_id, seq FROM mpi_patient WHERE person_id = "
                "ANY(ARRAY(SELECT person_id FROM mpi_patient WHERE patient_id IN ({in})))"
            )
        else:
            members_sql = (
                "SELECT patient_id, person_id, seq FROM mpi_patient WHERE person_id IN "
                "(SELECT person_id FROM mpi_patient WHERE patient_id IN ({in}))"
            )
        info: dict[str, tuple[str, int]] = {}
        pairs: dict[tuple[str, str], tuple[str, str, str, float | None, str]] = {}
        seen: set[str] = set()
        frontier = set(seeds)
        while frontier:
            seen |= frontier
            f = sorted(frontier)
            found: set[str] = set()
            for pid, person, seq in db.all_in(members_sql, f):
                info[pid] = (person, int(seq))
                found.add(pid)
            recs = sorted(info[p][1] for p in f if p in info)  # an unknown record has no pairs
            touching = db.all_in(
                "SELECT patient_a, patient_b, state, score, origin FROM mpi_pair WHERE rec_hi IN ({in})", recs
            ) + db.all_in(
                "SELECT patient_a, patient_b, state, score, origin FROM mpi_pair WHERE rec_lo IN ({in})", recs
            )
            for a, b, state, score, origin in touching:
                pairs[(a, b)] = (a, b, state, score, origin)
                if state == MATCH:
                    found.add(a)
                    found.add(b)
            frontier = found - seen
        among = [pairs[k] for k in sorted(pairs) if k[0] in info and k[1] in info]
        return info, among

    def _recluster(
        self,
        seeds: Iterable[str],
        now: str,
        *,
        actor: str = "matcher",
        fresh: frozenset[str] = frozenset(),
        unwritten: bool = False,
        manual_link: tuple[str, str] | None = None,
    ) -> dict[str, str]:
        """Rebuild the persons of the components around ``seeds``; returns patient -> person id.

        ``fresh``: the person ids this transaction's new records founded. ``unwritten``: those records are
        not in the database yet (the caller writes them with the persons returned), so only the others
        are moved there. ``manual_link``: the pair a manual link just joined; raises :class:`MpiConflict`
        (before anything is moved) if the manual links now put two manually unlinked records into one
        person.
        """
        db = self.db
        graph, cache = self._graph, self._cache
        if graph is not None and cache is not None:
            records = cache.state
            info, pairs = graph.component(seeds, lambda pid: records[pid][2])
        else:
            info, pairs = self._component(seeds)
        if not info:
            return {}
        uf: UnionFind[str] = UnionFind(sorted(info, key=lambda p: info[p][1]))
        members: dict[str, set[str]] = {p: {p} for p in info}
        cannot: dict[str, set[str]] = defaultdict(set)
        for a, b, state, _score, origin in pairs:
            if origin == "manual" and state == NO_MATCH:
                cannot[a].add(b)
                cannot[b].add(a)

        def join(a: str, b: str, *, check: bool) -> bool:
            ra, rb = uf.find(a), uf.find(b)
            if ra == rb:
                return True
            if check:
                small, big = (
                    (members[ra], members[rb])
                    if len(members[ra]) <= len(members[rb])
                    else (members[rb], members[ra])
                )
                if any(cannot[x] & big for x in small):
                    return False
            root = uf.union(a, b)
            other = rb if root == ra else ra
            members[root] |= members.pop(other)
            return True

        for a, b, state, _score, origin in pairs:
            if origin == "manual" and state == MATCH:
                join(a, b, check=False)
        if manual_link is not None:
            for a, b, state, _score, origin in pairs:
                if origin == "manual" and state == NO_MATCH and uf.find(a) == uf.find(b):
                    raise MpiConflict(
                        f"linking {manual_link[0]!r} and {manual_link[1]!r} would put {a!r} and {b!r}, which "
                        "were manually unlinked, into one person; undo that unlink first"
                    )
        autos = sorted(
            (p for p in pairs if p[4] == "auto" and p[2] == MATCH), key=lambda p: (-(p[3] or 0), p[0], p[1])
        )
        for a, b, _state, _score, _origin in autos:
            join(a, b, check=True)
        result: dict[str, str] = {}
        moves: dict[tuple[str, str], list[str]] = defaultdict(list)
        live_ids: set[str] = set()
        for group in uf.groups():
            oldest = min(group, key=lambda p: info[p][1])
            new_id = person_id_for(oldest)
            live_ids.add(new_id)
            for p in group:
                result[p] = new_id
                if info[p][0] != new_id:
                    moves[(info[p][0], new_id)].append(p)
        if not moves:
            return result
        updates = [(new, p) for (_old, new), ps in moves.items() for p in ps]
        if graph is not None:
            for new, p in updates:
                graph.move(p, new)
        if unwritten:
            updates = [(new, p) for new, p in updates if info[p][0] not in fresh]
        if db.kind == "postgresql":
            if updates:  # none in the usual batch, where only records still to be written moved
                db.execute(
                    "UPDATE mpi_patient AS p SET person_id = u.person FROM unnest(?::text[], ?::text[]) "
                    "AS u(person, pid) WHERE p.patient_id = u.pid",
                    [[u[0] for u in updates], [u[1] for u in updates]],
                )
        else:  # (an empty list runs nothing)
            db.executemany("UPDATE mpi_patient SET person_id = ? WHERE patient_id = ?", updates)
        # ids founded in this transaction are nobody's any more once their records moved (skipped below)
        old_ids = sorted({old for old, _new in moves} - live_ids - fresh)
        still_used = {
            r[0]
            for r in db.all_in(
                "SELECT DISTINCT person_id FROM mpi_patient WHERE person_id IN ({in})", old_ids
            )
        }
        retired = [o for o in old_ids if o not in still_used]
        founders = {person_id_for(p): p for p in info}
        aliases = []
        for old in retired:
            if old in fresh:
                continue  # created and merged in this same transaction: nobody has seen it
            founder = founders.get(old)
            target = result[founder] if founder else next(new for (o, new) in moves if o == old)
            aliases.append((old, target))
        db.insert_many(
            "INSERT INTO mpi_alias (old_id, person_id) VALUES (?, ?) ON CONFLICT (old_id) DO UPDATE "
            "SET person_id = excluded.person_id",
            aliases,
            ("text", "text"),
        )
        db.executemany("UPDATE mpi_alias SET person_id = ? WHERE person_id = ?", [(t, o) for o, t in aliases])
        db.exec_in("DELETE FROM mpi_alias WHERE old_id IN ({in})", sorted(live_ids - fresh))  # revived ids
        history = []
        for (old, new), ps in sorted(moves.items()):
            if old in fresh:
                continue
            action = "person-merged" if old in retired else "person-split"
            history.append(
                (
                    now,
                    action,
                    None,
                    None,
                    new,
                    old,
                    actor,
                    None,
                    None,
                    orjson.dumps({"patients": sorted(ps)}).decode(),
                    None,
                    None,
                )
            )
        db.insert_many(_HISTORY_INSERT, history, _HISTORY_TYPES)
        return result

    def _history(
        self,
        action: str,
        a: tuple[str, int] | None,
        b: tuple[str, int] | None,
        person: str | None,
        actor: str | None,
        reason: str | None,
        score: float | None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        """One history event; ``a`` and ``b`` are records as ``(patient id, seq)``."""
        self.db.execute(
            _HISTORY_INSERT,
            (
                _now(),
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

    # ------------------------------------------------------------------ manual decisions

    def _require(self, *patient_ids: str) -> dict[str, int]:
        """The seq of each record; raises :class:`MpiNotFound` for an unknown one."""
        found: dict[str, int] = {
            pid: int(seq)
            for pid, seq in self.db.all_in(
                "SELECT patient_id, seq FROM mpi_patient WHERE patient_id IN ({in})", list(patient_ids)
            )
        }
        for pid in patient_ids:
            if pid not in found:
                raise MpiNotFound("Patient", pid)
        return found

    def _manual(self, a: str, b: str, state: str, actor: str, reason: str | None) -> None:
        if not isinstance(actor, str) or not actor.strip():
            raise MpiInputError("a manual decision needs an actor")
        if a == b:
            raise MpiInputError("a record cannot be linked to or unlinked from itself")
        seq = self._require(a, b)
        x, y = _pair(a, b)
        hi, lo = sorted((seq[a], seq[b]), reverse=True)
        now = _now()
        prev = self.db.one(
            "SELECT state, score, origin FROM mpi_pair WHERE rec_hi = ? AND rec_lo = ?", (hi, lo)
        )
        self.db.execute(
            "INSERT INTO mpi_pair (rec_hi, rec_lo, patient_a, patient_b, state, score, origin, actor, reason, "
            "updated_at) VALUES (?, ?, ?, ?, ?, ?, 'manual', ?, ?, ?) ON CONFLICT (rec_hi, rec_lo) DO UPDATE SET "
            "state = excluded.state, origin = 'manual', actor = excluded.actor, reason = excluded.reason, "
            "updated_at = excluded.updated_at",
            (hi, lo, x, y, state, prev[1] if prev else None, actor, reason, now),
        )
        detail = {"previous_state": prev[0], "previous_origin": prev[2]} if prev else None
        self._history(
            "link" if state == MATCH else "unlink",
            (x, seq[x]),
            (y, seq[y]),
            None,
            actor,
            reason,
            prev[1] if prev else None,
            detail,
        )

    def link(self, patient_a: str, patient_b: str, actor: str, reason: str | None = None) -> None:
        """Manually declare two records the same person (their persons merge). The matcher never undoes it.

        Raises :class:`MpiNotFound` for an unknown record, :class:`MpiInputError` without an actor and
        :class:`MpiConflict` if the manual links would then join two records that were manually
        unlinked (undo that unlink first); nothing changes then.
        """
        with self.db.write():
            self._graph = None  # the database path: a manual decision is rare
            self._manual(patient_a, patient_b, MATCH, actor, reason)
            persons = self._recluster(
                [patient_a, patient_b], _now(), actor=actor, manual_link=(patient_a, patient_b)
            )
            self._touch()
            if persons.get(patient_a) != persons.get(
                patient_b
            ):  # pragma: no cover - manual links always join
                raise MpiError("internal error: a manual link did not join the records")

    def unlink(self, patient_a: str, patient_b: str, actor: str, reason: str | None = None) -> None:
        """Manually declare two records different people; automatic links joining them are cut.

        Raises :class:`MpiNotFound` for an unknown record and :class:`MpiConflict` if other *manual*
        links still join the two (unlink those first); nothing changes then.
        """
        with self.db.write():
            self._graph = None
            self._manual(patient_a, patient_b, NO_MATCH, actor, reason)
            persons = self._recluster([patient_a, patient_b], _now(), actor=actor)
            self._touch()
            if persons.get(patient_a) == persons.get(patient_b):
                raise MpiConflict(
                    f"records {patient_a!r} and {patient_b!r} are still joined by other manual links; unlink those first"
                )

    # ------------------------------------------------------------------ reads

    def person_id(self, patient_id: str) -> str | None:
        """The person id of a record, or None if the record is not indexed."""
        row = self.db.one("SELECT person_id FROM mpi_patient WHERE patient_id = ?", (patient_id,))
        return row[0] if row else None

    def resolve_person(self, person_id: str) -> str | None:
        """The live person id for ``person_id`` (following merge aliases), or None if unknown."""
        if self.db.one("SELECT 1 FROM mpi_patient WHERE person_id = ? LIMIT 1", (person_id,)):
            return person_id
        row = self.db.one("SELECT person_id FROM mpi_alias WHERE old_id = ?", (person_id,))
        return row[0] if row else None

    def linked_patient_ids(self, patient_id: str, include_possible: bool = False) -> list[str]:
        """Record ids of the same person as ``patient_id`` (itself included, first); sorted otherwise.

        With ``include_possible`` the records of persons joined to it by an unresolved POSSIBLE_MATCH
        are added too. An unindexed record yields ``[patient_id]``.
        """
        if not include_possible:  # the hot path of $everything: one statement, no explicit transaction
            rows = self.db.all(
                "SELECT patient_id FROM mpi_patient WHERE person_id = "
                "(SELECT person_id FROM mpi_patient WHERE patient_id = ?)",
                (patient_id,),
            )
            others = sorted(r[0] for r in rows if r[0] != patient_id)
            return [patient_id, *others]
        with self.db.read():
            person = self.person_id(patient_id)
            if person is None:
                return [patient_id]
            rows = self.db.all("SELECT patient_id, seq FROM mpi_patient WHERE person_id = ?", (person,))
            members = {r[0] for r in rows}
            if include_possible:
                recs = sorted(int(r[1]) for r in rows)
                extra: set[str] = set()
                for side in ("rec_hi", "rec_lo"):
                    for a, b in self.db.all_in(
                        f"SELECT patient_a, patient_b FROM mpi_pair WHERE (state || '') = '{POSSIBLE}' "
                        f"AND {side} IN ({{in}})",
                        recs,
                    ):
                        extra.update((a, b))
                extra -= members
                if extra:
                    persons = {
                        r[0]
                        for r in self.db.all_in(
                            "SELECT person_id FROM mpi_patient WHERE patient_id IN ({in})", sorted(extra)
                        )
                    }
                    members |= {
                        r[0]
                        for r in self.db.all_in(
                            "SELECT patient_id FROM mpi_patient WHERE person_id IN ({in})", sorted(persons)
                        )
                    }
            members.discard(patient_id)
            return [patient_id, *sorted(members)]

    def person(self, person_id: str) -> dict[str, Any]:
        """The link set of a person: records (with source org), pairs among them and open possible matches.

        Follows merge aliases (``id`` is the live id; ``requested_id`` what was asked). Raises
        :class:`MpiNotFound` for an unknown id.
        """
        with self.db.read():
            live = self.resolve_person(person_id)
            if live is None:
                raise MpiNotFound("Person", person_id)
            recs = self.db.all(
                "SELECT patient_id, source_org, seq, updated_at FROM mpi_patient WHERE person_id = ? "
                "ORDER BY seq",
                (live,),
            )
            idset = {r[0] for r in recs}
            seqs = sorted(int(r[2]) for r in recs)
            found: dict[tuple[str, str], tuple[Any, ...]] = {}
            for side in ("rec_hi", "rec_lo"):
                for r in self.db.all_in(
                    "SELECT patient_a, patient_b, state, score, origin, actor, reason, updated_at "
                    f"FROM mpi_pair WHERE {side} IN ({{in}})",
                    seqs,
                ):
                    found[(r[0], r[1])] = r
            pairs = list(found.values())
            others = sorted({p for r in pairs for p in r[:2]} - idset)
            person_of = {
                r[0]: r[1]
                for r in self.db.all_in(
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

    def review_queue(self, limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
        """Open POSSIBLE_MATCH pairs (records still in different persons), best score first.

        Each item has both record ids, source orgs, person ids, the score and the compared demographics.
        Raises :class:`MpiInputError` for a negative limit/offset.
        """
        if limit < 0 or offset < 0:
            raise MpiInputError("limit and offset must not be negative")
        rows = self.db.all(
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

    def history(self, person_or_patient_id: str) -> list[dict[str, Any]]:
        """Link changes touching a record, or a person (its current records and its id), oldest first."""
        with self.db.read():
            live = self.resolve_person(person_or_patient_id)
            if live is not None:
                recs = sorted(
                    int(r[0]) for r in self.db.all("SELECT seq FROM mpi_patient WHERE person_id = ?", (live,))
                )
                ids = {person_or_patient_id, live}
                ids |= {
                    r[0] for r in self.db.all("SELECT old_id FROM mpi_alias WHERE person_id = ?", (live,))
                }
                rows = self.db.all_in(
                    f"SELECT {_HISTORY_COLUMNS} FROM mpi_history WHERE rec_a IN ({{in}})", recs
                )
                rows += self.db.all_in(
                    f"SELECT {_HISTORY_COLUMNS} FROM mpi_history WHERE rec_b IN ({{in}})", recs
                )
                rows += self.db.all_in(
                    f"SELECT {_HISTORY_COLUMNS} FROM mpi_history WHERE person_id IN ({{in}})", sorted(ids)
                )
                rows += self.db.all_in(
                    f"SELECT {_HISTORY_COLUMNS} FROM mpi_history WHERE other_person_id IN ({{in}})",
                    sorted(ids),
                )
            else:
                row = self.db.one("SELECT seq FROM mpi_patient WHERE patient_id = ?", (person_or_patient_id,))
                if row is None:
                    raise MpiNotFound("Patient or Person", person_or_patient_id)
                rows = self.db.all(
                    f"SELECT {_HISTORY_COLUMNS} FROM mpi_history WHERE rec_a = ? "
                    f"UNION ALL SELECT {_HISTORY_COLUMNS} FROM mpi_history WHERE rec_b = ?",
                    (row[0], row[0]),
                )
                rows += self.db.all(
                    f"SELECT {_HISTORY_COLUMNS} FROM mpi_history WHERE detail LIKE ?",
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

    def stats(self) -> dict[str, Any]:
        """Counts of records, persons, pairs by state, and the model's provenance."""
        records = int(self.db.one("SELECT COUNT(*) FROM mpi_patient")[0])  # type: ignore[index]
        persons = int(self.db.one("SELECT COUNT(DISTINCT person_id) FROM mpi_patient")[0])  # type: ignore[index]
        by_state = {s: int(n) for s, n in self.db.all("SELECT state, COUNT(*) FROM mpi_pair GROUP BY state")}
        m = self.model()
        return {
            "records": records,
            "persons": persons,
            "pairs": by_state,
            "model": m.source,
            "model_fitted_on_records": m.fitted_on_records,
        }

    def reset(self) -> None:
        """Delete everything (records, persons, pairs, history, parameters)."""
        with self.db.write():
            for t in TABLES:
                self.db.execute(f"DELETE FROM {t}")
            self._cache = None
            self._graph = None
            # a new epoch: other processes' caches are stale and must be rebuilt
            self._set_meta("records_gen", f"{uuid.uuid4().hex}.0.{uuid.uuid4().hex[:16]}")
        self._model = None
        self._model_version = None
        self._model_blob_known = False


def _parse_gen(gen: str | None) -> tuple[str, int, str] | None:
    """``(epoch, updates, nonce)`` of a generation token, or None if absent or malformed."""
    if gen is None:
        return None
    parts = gen.split(".")
    if len(parts) != 3 or not parts[1].isdigit():
        return None
    return parts[0], int(parts[1]), parts[2]


def _next_gen(gen: str | None, *, updated: bool) -> str:
    """The token after ``gen``: the same epoch, ``updates`` one higher if records changed, a new nonce
    (a new epoch if ``gen`` is absent or malformed)."""
    parsed = _parse_gen(gen)
    epoch, updates = parsed[:2] if parsed else (uuid.uuid4().hex, 0)
    return f"{epoch}.{updates + int(updated)}.{uuid.uuid4().hex[:16]}"


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
