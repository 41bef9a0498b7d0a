"""In-memory, write-through copy of the index's record-level state (features, blocks, value counts).

The incremental index needs, for every batch, the blocks its new records fall into, the features of
the candidates in those blocks and the value frequencies of the term-frequency adjusted fields. Reading
those from the database per batch (and parsing feature JSON) dominated the cost of ``upsert_patients``,
so :class:`RecordCache` keeps them in memory:

* it is loaded once from ``mpi_patient`` (blocking keys and value counts are recomputed from the stored
  features, so they can never disagree with them);
* every ``upsert_patients`` updates it and the database in the same call (write-through), and stamps the
  database with a new *generation* token (``mpi_meta.records_gen``) in the same transaction;
* before each write the token is read inside the (serialised) write transaction: if another process
  wrote records since, the cache reads the records added (if that is all that happened) or is
  reloaded. A failed transaction drops it.

Only record-level state is cached here. Persons and the pairs that change them are kept by
:mod:`bridge.stores.mpi.graph`, trusted under the same token (see :mod:`bridge.stores.mpi.state`).

Layout: every record has a *row* (a small integer, fixed for the life of the cache). Its comparison
values are integer codes in one shared vocabulary, held column by column in one ``int32`` array
(:data:`~bridge.stores.mpi.compare.CODE_KEYS` x rows), so a batch's candidate pairs are compared against the
cache itself (:meth:`RecordCache.table`) without copying rows. Blocks hold rows (a tuple per shared
key: a set per key took 0.4 KB per record more, measured at 152,000 records); term-frequency counts are
arrays indexed by code. The feature strings themselves live once, in the vocabulary: a record's features
are rebuilt from its codes when needed (:meth:`RecordCache.features`).
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Collection, Iterable, Sequence
from typing import NamedTuple

import numpy as np
import orjson

from bridge.stores.mpi.blocking import blocking_keys
from bridge.stores.mpi.compare import CODE_KEYS, EncodeMemo, FeatureTable, encode
from bridge.stores.mpi.features import STRING_KEYS, Features

_N_CODES = len(CODE_KEYS)
_N_STRINGS = len(STRING_KEYS)

#: blocks of up to this many records keep their rows in a tuple (untracked by the garbage collector);
#: larger ones (few) in a set
_TUPLE_MAX = 64

#: ``(patient_id, source_org, features, digest, seq)``
Item = tuple[str, str, Features, str, int]


class Placed(NamedTuple):
    """Where a batch's records went in the blocking index (:meth:`RecordCache.put_batch`)."""

    #: each record's blocking keys
    keys: list[list[str]]
    #: for each of those keys (flattened, record by record): the record's row ...
    rows: list[int]
    #: ... and the key's ``blocks`` value right after the record was added. A row means the record held
    #: the key alone at that point; if a later record of the batch joined it, that one has the pair.
    values: list[int]


class RecordCache:
    """Features, blocking index and term-frequency counts of every indexed record, in memory.

    ``gen`` is the generation token of the database state this copy reflects (``None``: empty index
    that never had a token).
    """

    def __init__(self, tf_keys: Sequence[str], gen: str | None) -> None:
        self.gen = gen
        self.tf_keys = tuple(tf_keys)
        self._tf_col = tuple((k, CODE_KEYS.index(k)) for k in self.tf_keys)
        #: patient id -> row; row -> patient id
        self.row_of: dict[str, int] = {}
        self.ids: list[str] = []
        #: patient id -> (digest, source org, seq)
        self.state: dict[str, tuple[str, str, int]] = {}
        #: row -> the record's strong identifiers ((system, value) tuples)
        self.idents: list[tuple[tuple[str, str], ...]] = []
        cap = 1024
        self._codes = np.full((_N_CODES, cap), -1, dtype=np.int32)  # codes stay far below 2**31
        self._multi_id = np.zeros(cap, dtype=bool)
        self._seq = np.zeros(cap, dtype=np.int64)
        #: blocking key -> its records: the row itself when the block holds one record (most keys),
        #: else ``-1 - i`` for the rows ``self._sets[i]``: a tuple, or a set once the block is large.
        #: Nothing here is left for the garbage collector to walk: the dict holds only ints (so it is
        #: untracked), the numpy object array is not traversed, and tuples of ints are untracked after
        #: their first collection. With a set per shared key (a quarter of a million sets at 152,000
        #: records) the blocks take 60 MiB more, and a full collection walks them all (94 ms, against 5
        #: without them; with the consumer's thresholds, bridge/gctune.py, full collections are rare).
        self.blocks: dict[str, int] = {}
        self._sets = np.empty(1024, dtype=object)
        self._n_sets = 0
        #: the values of the TF keys (a few per cent of the vocabulary) have *slots*: code -> slot (-1:
        #: none), and per TF key the number of records holding each value, indexed by slot
        self._tf_slot = np.full(cap, -1, dtype=np.int32)
        self._n_slots = 0
        self.tf_counts: dict[str, np.ndarray] = {k: np.zeros(cap, dtype=np.int64) for k in self.tf_keys}
        self.sum_sq: dict[str, int] = dict.fromkeys(self.tf_keys, 0)
        self.max_seq = 0
        #: one vocabulary for the integer codes of every record's comparison values (never shrinks;
        #: codes start at 1, ``""`` is -1)
        self.vocab: dict[str, int] = {"": -1}
        self._encode_memo = EncodeMemo()  # see encode()
        self._strings = np.empty(1024, dtype=object)  # code -> string (see strings())
        self._strings[0] = ""
        self._n_strings = 1
        #: distinct comparison vectors (``int8`` bytes) of every candidate pair scored so far, with counts:
        #: the EM input, accumulated batch by batch. ``None`` when unknown (an index written before counts
        #: were kept): EM then samples the stored records instead.
        self.patterns: dict[bytes, int] | None = {}

    @classmethod
    def load(cls, rows: Iterable[Item], tf_keys: Sequence[str], gen: str | None) -> RecordCache:
        """Build the cache from ``(patient_id, source_org, features, digest, seq)`` rows."""
        cache = cls(tf_keys, gen)
        it = iter(rows)
        while chunk := list(itertools.islice(it, 5000)):
            cache.put_many(chunk)
        return cache

    def __len__(self) -> int:
        return len(self.row_of)

    def __contains__(self, pid: object) -> bool:
        return pid in self.row_of

    # ------------------------------------------------------------------ reads

    def strings(self) -> np.ndarray:
        """The vocabulary as an object array indexed by code (index 0, never a code, holds ``""``, so
        ``strings()[np.maximum(codes, 0)]`` maps codes, ``-1`` included, back to their strings)."""
        vocab, n = self.vocab, self._n_strings
        if len(vocab) > n:  # codes are handed out in insertion order: append the new keys
            new = list(itertools.islice(reversed(vocab), len(vocab) - n))[::-1]  # the newest keys
            need = n + len(new)
            if need > len(self._strings):
                grown = np.empty(max(need, 2 * len(self._strings)), dtype=object)
                grown[:n] = self._strings[:n]
                self._strings = grown
            self._strings[n:need] = new
            self._n_strings = need
        return self._strings

    def table(self) -> FeatureTable:
        """A comparison table over every cached record, addressed by row (no copy)."""
        n = len(self.ids)
        return FeatureTable.from_codes(self._codes[:, :n], self.strings(), self.idents, self._multi_id[:n])

    def codes(self, key: str) -> np.ndarray:
        """The codes of column ``key`` (one of :data:`~bridge.stores.mpi.compare.CODE_KEYS`) by row."""
        return self._codes[CODE_KEYS.index(key), : len(self.ids)]

    def seqs(self) -> np.ndarray:
        """The insertion sequence number of every row."""
        return self._seq[: len(self.ids)]

    def features(self, pid: str) -> Features:
        """The feature record of a cached record (rebuilt from its codes; identifier pairs as tuples)."""
        row = self.row_of[pid]
        strings = self.strings()[np.maximum(self._codes[:_N_STRINGS, row], 0)].tolist()
        return {**dict(zip(STRING_KEYS, strings, strict=True)), "i": self.idents[row]}

    def members(self, key: str) -> Collection[str]:
        """The records (patient ids) holding blocking key ``key``."""
        v = self.blocks.get(key)
        if v is None:
            return ()
        if v >= 0:
            return (self.ids[v],)
        return [self.ids[r] for r in self._sets[-1 - v]]

    def block_sets(self, values: np.ndarray) -> list[Collection[int]]:
        """The rows of the blocks that ``blocks`` values standing for several rows (all negative) name."""
        return self._sets[-1 - values].tolist()  # type: ignore[no-any-return]

    def _new_set(self, rows: tuple[int, ...]) -> int:
        """Store a block's rows; returns the ``blocks`` value that stands for them."""
        if self._n_sets == len(self._sets):
            grown = np.empty(2 * len(self._sets), dtype=object)
            grown[: self._n_sets] = self._sets
            self._sets = grown
        self._sets[self._n_sets] = rows
        self._n_sets += 1
        return -self._n_sets

    # ------------------------------------------------------------------ writes

    def _grow(self, rows: int) -> None:
        cap = self._codes.shape[1]
        if rows <= cap:
            return
        new = max(rows, cap + cap // 2)
        codes = np.full((_N_CODES, new), -1, dtype=np.int32)
        codes[:, :cap] = self._codes
        self._codes = codes
        self._multi_id = np.concatenate([self._multi_id, np.zeros(new - cap, dtype=bool)])
        self._seq = np.concatenate([self._seq, np.zeros(new - cap, dtype=np.int64)])

    def _slots(self, codes: np.ndarray) -> np.ndarray:
        """The TF slots of value ``codes`` (all >= 0), handing out new ones as needed."""
        slot = self._tf_slot
        if len(slot) < len(self.vocab) + 1:
            grown = np.full(max(len(self.vocab) + 1, len(slot) + len(slot) // 2), -1, dtype=np.int32)
            grown[: len(slot)] = slot
            slot = self._tf_slot = grown
        found: np.ndarray = slot[codes]
        if (found < 0).any():
            new = np.unique(codes[found < 0])
            slot[new] = np.arange(self._n_slots, self._n_slots + len(new), dtype=np.int32)
            self._n_slots += len(new)
            found = slot[codes]
        return found

    def _count(self, codes: np.ndarray, sign: int) -> None:
        """Add (``sign`` 1) or remove (-1) the term-frequency counts of ``codes`` (records x CODE_KEYS)."""
        for key, col in self._tf_col:
            values = codes[:, col]
            values = values[values >= 0]
            if not len(values):
                continue
            uniq, k = np.unique(self._slots(values), return_counts=True)
            counts = self.tf_counts[key]
            if len(counts) < self._n_slots:
                grown = np.zeros(max(self._n_slots, len(counts) + len(counts) // 2), dtype=np.int64)
                grown[: len(counts)] = counts
                counts = self.tf_counts[key] = grown
            before = counts[uniq]
            after = before + sign * k
            counts[uniq] = after
            self.sum_sq[key] += int((after * after - before * before).sum())

    def value_counts(self, key: str) -> dict[str, int]:
        """The number of records holding each value of TF key ``key`` (values held by none left out)."""
        strings = self.strings()
        codes = np.nonzero(self._tf_slot >= 0)[0]
        counts = self.tf_counts[key]
        slots = self._tf_slot[codes]
        n = len(counts)  # the slots are shared by the TF keys; a key's counts grow only with its values
        return {
            strings[c]: int(counts[s])
            for c, s in zip(codes.tolist(), slots.tolist(), strict=True)
            if s < n and counts[s]
        }

    def remove(self, pid: str) -> None:
        """Forget a record's blocks and value counts (before it is re-put with new features)."""
        row = self.row_of.get(pid)
        if row is None or pid not in self.state:
            return
        blocks = self.blocks
        for k in blocking_keys(self.features(pid)):
            v = blocks.get(k)
            if v is None:
                continue
            if v >= 0:
                if v == row:
                    del blocks[k]
                continue
            members = self._sets[-1 - v]
            if members.__class__ is tuple:
                members = self._sets[-1 - v] = tuple(r for r in members if r != row)
            else:
                members.discard(row)
            if len(members) == 1:
                blocks[k] = next(iter(members))
                self._sets[-1 - v] = None  # the slot is not reused (records change rarely)
        self._count(self._codes[:, row : row + 1].T, -1)
        self._codes[:, row] = -1
        del self.state[pid]

    def put(self, pid: str, org: str, feats: Features, digest: str, seq: int) -> list[str]:
        """Add (or replace) a record; returns its blocking keys."""
        return self.put_many([(pid, org, feats, digest, seq)])[0]

    def put_many(self, items: Sequence[Item]) -> list[list[str]]:
        """Add (or replace) records with distinct ids; returns each one's blocking keys."""
        return self.put_batch(items).keys

    def placed(self, pids: Sequence[str]) -> Placed:
        """Where records are in the blocking index now (as :meth:`put_batch` reports it)."""
        keys = [blocking_keys(self.features(pid)) for pid in pids]
        rows = [self.row_of[pid] for pid, ks in zip(pids, keys, strict=True) for _ in ks]
        return Placed(keys, rows, [self.blocks[k] for ks in keys for k in ks])

    def put_batch(self, items: Sequence[Item]) -> Placed:
        """Add (or replace) records with distinct ids; returns where they went in the blocking index."""
        if not items:
            return Placed([], [], [])
        row_of, ids, state = self.row_of, self.ids, self.state
        rows: list[int] = []
        for pid, org, _feats, digest, seq in items:
            row = row_of.get(pid)
            if row is None:
                row = row_of[pid] = len(ids)
                ids.append(pid)
                self.idents.append(())
            elif pid in state:
                self.remove(pid)
            rows.append(row)
            state[pid] = (digest, org, seq)
        self._grow(len(ids))
        feats = [it[2] for it in items]
        codes = encode(feats, self.vocab, self._encode_memo)
        r = np.asarray(rows, dtype=np.int64)
        self._codes[:, r] = codes.T
        idents = [tuple((s, v) for s, v in f.get("i") or ()) for f in feats]
        for row, ident in zip(rows, idents, strict=True):
            self.idents[row] = ident
        self._multi_id[r] = np.fromiter(map(len, idents), dtype=np.int64, count=len(idents)) > 1
        self._seq[r] = [it[4] for it in items]
        self._count(codes, 1)
        out = [blocking_keys(f) for f in feats]
        # block membership: most keys are new (one record so far), so one C-level setdefault per key
        # adds them; only the keys that already had records are fixed up one by one
        blocks = self.blocks
        flat_keys = list(itertools.chain.from_iterable(out))
        flat_rows = list(
            itertools.chain.from_iterable(
                itertools.repeat(row, len(keys)) for row, keys in zip(rows, out, strict=True)
            )
        )
        stored = list(map(blocks.setdefault, flat_keys, flat_rows))
        sets = self._sets
        # keys this batch turned from one row into a row set (a set's value never changes after): their
        # current values, in a dictionary small enough to stay in the CPU caches, unlike ``blocks``
        converted: dict[str, int] = {}
        for i in itertools.compress(itertools.count(), map(operator.is_not, stored, flat_rows)):
            k, row = flat_keys[i], flat_rows[i]
            v = stored[i]
            if v >= 0:
                v = converted.get(k, v)
                if v >= 0:
                    if v != row:
                        v = blocks[k] = converted[k] = self._new_set((v, row))
                        sets = self._sets  # (it may have grown)
                    stored[i] = v
                    continue
                stored[i] = v
            members = sets[-1 - v]
            if members.__class__ is not tuple:
                members.add(row)
            elif len(members) < _TUPLE_MAX:
                sets[-1 - v] = (*members, row)
            else:  # a large block (a common birth date...): a set, so that adding a row stays O(1)
                sets[-1 - v] = {*members, row}
        top = max(it[4] for it in items)
        if top > self.max_seq:
            self.max_seq = top
        return Placed(out, flat_rows, stored)

    def row_frequencies(self, key: str, rows: np.ndarray, total: int) -> np.ndarray:
        """Relative frequency among ``total`` records of the ``key`` value of each of ``rows`` (0 for
        ``""``): the number of records holding it, divided by ``total``."""
        counts = self.tf_counts[key]
        codes = np.maximum(self.codes(key)[rows], 0)  # -1 (no value) -> 0, a code never handed out
        slot = self._tf_slot
        slots = np.full(len(codes), -1, dtype=np.int64)
        inside = codes < len(slot)
        slots[inside] = slot[codes[inside]]
        found = np.zeros(len(codes), dtype=np.int64)
        ok = (slots >= 0) & (slots < len(counts))
        found[ok] = counts[slots[ok]]
        return found.astype(np.float64) / max(total, 1)


def add_patterns(acc: dict[bytes, int], gamma: np.ndarray) -> None:
    """Add the rows of a comparison matrix to distinct-vector counts."""
    if len(gamma) == 0:
        return
    g = np.ascontiguousarray(gamma, dtype=np.int8)
    width = g.shape[1]
    if width * 4 <= 63 and g.min() >= -1 and g.max() <= 14:
        # each row as one integer (4 bits per level + 1): a 1-D unique, several times faster than axis=0
        shifts = np.arange(width, dtype=np.int64) * 4
        codes = ((g.astype(np.int64) + 1) << shifts).sum(axis=1)
        uniq, counts = np.unique(codes, return_counts=True)
        rows = (((uniq[:, None] >> shifts) & 15) - 1).astype(np.int8)
    else:
        rows, counts = np.unique(g, axis=0, return_counts=True)
    for row, c in zip(rows, counts.tolist(), strict=True):
        key = row.tobytes()
        acc[key] = acc.get(key, 0) + c


def patterns_array(acc: dict[bytes, int], width: int) -> tuple[np.ndarray, np.ndarray]:
    """``(patterns, counts)`` arrays of accumulated distinct comparison vectors."""
    if not acc:
        return np.zeros((0, width), dtype=np.int8), np.zeros(0, dtype=np.float64)
    keys = list(acc)
    patterns = np.frombuffer(b"".join(keys), dtype=np.int8).reshape(len(keys), width)
    return patterns, np.array([acc[k] for k in keys], dtype=np.float64)


def dump_patterns(acc: dict[bytes, int]) -> str:
    """JSON text of accumulated comparison-vector counts (hex keys)."""
    return orjson.dumps({k.hex(): v for k, v in acc.items()}).decode()


def load_patterns(blob: str) -> dict[bytes, int]:
    """Inverse of :func:`dump_patterns`."""
    return {bytes.fromhex(k): int(v) for k, v in orjson.loads(blob).items()}
