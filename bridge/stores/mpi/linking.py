"""Linking a batch into the index (:meth:`PersonIndex.upsert_patients`).

A batch is checked whole before anything is written. Records whose features (digest) and source are
unchanged are skipped; a changed record loses its automatic pairs. The new and changed records are put
into the record cache, which yields their candidate pairs from its blocks; the pairs are compared in
place, counted for EM (:mod:`bridge.stores.mpi.fitting`), weighed, and the MATCH and POSSIBLE_MATCH ones are
stored with their history (pairs holding a manual decision are left alone). The persons around the
MATCH pairs are then rebuilt (:func:`bridge.stores.mpi.persons.recluster`).
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson

from bridge.logging import get_logger
from bridge.stores.mpi import history
from bridge.stores.mpi.arrays import distinct
from bridge.stores.mpi.cache import Placed, RecordCache, add_patterns, dump_patterns
from bridge.stores.mpi.compare import compare_pairs
from bridge.stores.mpi.config import MatchState, MpiInputError
from bridge.stores.mpi.features import Features, extract_features
from bridge.stores.mpi.fitting import maybe_fit
from bridge.stores.mpi.graph import PersonGraph
from bridge.stores.mpi.matcher import TermFrequencies, weigh
from bridge.stores.mpi.persons import person_id_for, recluster
from bridge.stores.mpi.state import IndexState

log = get_logger(__name__)

MATCH = MatchState.MATCH.value
NO_MATCH = MatchState.NO_MATCH.value

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


def upsert_patients(state: IndexState, patients: Sequence[tuple[str, dict[str, Any]]]) -> None:
    """:meth:`PersonIndex.upsert_patients`: the batch's features (every item checked before anything
    is written), then one write transaction."""
    batch: dict[str, tuple[str, Features]] = {}
    systems = state.config.strong_identifier_systems
    for i, item in enumerate(patients):
        try:
            org, resource = item
        except (TypeError, ValueError):
            raise MpiInputError("expected a (source_org, Patient) pair", location=f"patients[{i}]") from None
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
        with state.db.write():
            _upsert(state, batch)
    except BaseException:
        state.forget()  # the transaction rolled back: the write-through copies may be ahead of it
        raise


def _upsert(state: IndexState, batch: dict[str, tuple[str, Features]]) -> None:
    db = state.db
    now = history.now()
    cache = state.records()
    changed: list[str] = []
    digests: dict[str, str] = {}
    blobs: dict[str, bytes] = {}
    records = cache.state
    for pid, (org, feats) in batch.items():
        blob = orjson.dumps(feats, option=orjson.OPT_SORT_KEYS)  # what features_digest() hashes
        blobs[pid] = blob
        digests[pid] = hashlib.sha256(blob).hexdigest()[:32]
        old = records.get(pid)
        if old is None or old[0] != digests[pid] or old[1] != org:
            changed.append(pid)
    if not changed:
        return
    graph = state.graph
    if graph is None and state.sole_writer:
        graph = state.graph = PersonGraph.load(db)
    seeds: set[str] = set()
    updated = [pid for pid in changed if pid in records]
    if updated:
        seeds.update(updated)
        if graph is not None:
            for pid in updated:
                graph.drop_auto_pairs(pid)
        # mpi_block has rows only in an index written before blocks were kept in memory
        db.exec_in("DELETE FROM mpi_block WHERE patient_id IN ({in})", updated)
        recs = sorted(records[pid][2] for pid in updated)
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
            history.add_event(
                db,
                "record-updated",
                (pid, records[pid][2]),
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
        old = records.get(pid)
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
        ia, ib = candidates(cache, changed, cache.put_batch(items), state.config.max_block_size)
        gamma = compare_pairs(cache.table(), ia, ib)
    except BaseException:
        if pending is not None:
            pending.wait(raise_error=False)
        raise
    if pending is not None:
        pending.wait()
    state.bump_generation(cache, updated=bool(updated))
    _score_new(state, ia, ib, gamma, len(cache), now, seeds, only_new=not updated)
    fresh = frozenset(r[2] for r in rows)
    persons = recluster(state, seeds, now, fresh=fresh, unwritten=pending is None) if seeds else {}
    if pending is None:
        db.insert_many(
            _PATIENT_INSERT, [(r[0], r[1], persons.get(r[0], r[2]), *r[3:]) for r in rows], _PATIENT_TYPES
        )


def candidates(
    cache: RecordCache, changed: list[str], placed: Placed, cap: int
) -> tuple[np.ndarray, np.ndarray]:
    """Candidate pairs ``(changed record, other record)`` from the in-memory blocks, as cache rows.

    Each pair once: a pair of two changed records is owned by the one with the smaller id. In no
    particular order (the caller orders what it stores). Blocks holding more than ``cap`` records
    (``max_block_size``; very common values: a default birth date, SMITH JOHN) are skipped; the other
    blocking keys still bring true matches together.
    """
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
            "mpi.blocks_skipped",
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
    state: IndexState,
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
    db = state.db
    cache = state.cache
    graph = state.graph
    assert cache is not None
    if not len(ia):
        if cache.patterns == {}:  # counting, nothing counted yet: say so. Without the row, another
            # process reads "counts not kept" and stops counting; EM then samples
            state.set_meta("em_patterns", dump_patterns(cache.patterns))
        maybe_fit(state, total)
        return
    table = cache.table()
    if cache.patterns is not None:
        add_patterns(cache.patterns, gamma)
        state.set_meta("em_patterns", dump_patterns(cache.patterns))
    maybe_fit(state, total)  # after counting this batch's pairs: the first fit includes them
    tf = None
    if state.config.term_frequency:  # value counts by code: a frequency is an array lookup
        tf = TermFrequencies({}, total, cache.sum_sq, lookup=cache.row_frequencies)
    scored = weigh(gamma, ia, table, state.model_from(state.batch_model_blob()), state.config, tf)
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
    events = []
    for x, y, link, score, sx, sy in found:
        if (x, y) in manual:
            continue
        a, b, sa, sb = (x, y, sx, sy) if x < y else (y, x, sy, sx)
        hi, lo = (sa, sb) if sa > sb else (sb, sa)
        score = round(score, 6)
        rows.append((hi, lo, a, b, link, score, "auto", None, None, now))
        if graph is not None:
            graph.set_pair(a, b, link, score, "auto")
        action = "auto-match" if link == MATCH else "possible-match"
        events.append((now, action, a, b, None, None, "matcher", None, score, None, sa, sb))
        if link == MATCH:
            seeds.update((a, b))
    db.insert_many(_PAIR_INSERT if only_new else _PAIR_UPSERT, rows, _PAIR_TYPES)
    db.insert_many(history.HISTORY_INSERT, events, history.HISTORY_TYPES)
