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
  wrote records since, the cache is dropped and reloaded. A failed transaction drops it as well.

Only record-level state is cached. Persons and pairs, which manual link/unlink change from other
processes (the HTTP service), are always read from the database.

Features are held as tuples with shared (interned) strings for the low-cardinality fields: roughly
0.3-0.5 KB per record.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Collection, Iterable, Sequence
from typing import Any

import numpy as np
import orjson

from bridge.mpi.blocking import blocking_keys
from bridge.mpi.compare import value_codes
from bridge.mpi.features import STRING_KEYS, Features

#: the order of a packed feature tuple; ``i`` (identifiers) is last
PACK_KEYS = (*STRING_KEYS, "i")

Packed = tuple[Any, ...]


def pack(f: Features, vocab: dict[str, int]) -> Packed:
    """A compact, immutable copy of a feature record: :data:`PACK_KEYS` values, then the integer codes
    of its comparison values in ``vocab`` (see :func:`bridge.mpi.compare.value_codes`)."""
    get = f.get
    intern = sys.intern
    strings = (
        intern(get("g") or ""),
        intern(get("f") or ""),
        intern(get("gn") or ""),
        intern(get("gm") or ""),
        intern(get("fn") or ""),
        intern(get("fm") or ""),
        intern(get("b") or ""),
        intern(get("s") or ""),
        get("a") or "",
        intern(get("c") or ""),
        get("z") or "",
        get("t") or "",
    )
    idents = tuple((s, v) for s, v in get("i") or ())
    return (*strings, idents, value_codes(strings, idents, vocab))


def unpack(p: Packed) -> Features:
    """The feature record of a packed tuple (identifier pairs as tuples)."""
    return dict(zip(PACK_KEYS, p[: len(PACK_KEYS)], strict=True))


class RecordCache:
    """Features, blocking index and term-frequency counts of every indexed record, in memory.

    ``gen`` is the generation token of the database state this copy reflects (``None``: empty index
    that never had a token).
    """

    def __init__(self, tf_keys: Sequence[str], gen: str | None) -> None:
        self.gen = gen
        self.tf_keys = tuple(tf_keys)
        self._tf_pos = tuple((k, PACK_KEYS.index(k)) for k in self.tf_keys)
        self.feats: dict[str, Packed] = {}
        #: patient id -> (digest, source org, seq)
        self.state: dict[str, tuple[str, str, int]] = {}
        #: blocking key -> its records: one record as a plain string (most keys), else a set
        self.blocks: dict[str, str | set[str]] = {}
        self.tf: dict[str, dict[str, int]] = {k: {} for k in self.tf_keys}
        self.sum_sq: dict[str, int] = dict.fromkeys(self.tf_keys, 0)
        self.max_seq = 0
        #: one vocabulary for the integer codes of every record's comparison values (never shrinks)
        self.vocab: dict[str, int] = {"": -1}
        self._strings = np.empty(1024, dtype=object)  # code -> string (see strings())
        self._strings[0] = ""
        self._n_strings = 1
        #: distinct comparison vectors (``int8`` bytes) of every candidate pair scored so far, with counts:
        #: the EM input, accumulated batch by batch. ``None`` when unknown (an index written before counts
        #: were kept): EM then samples the stored records instead.
        self.patterns: dict[bytes, int] | None = {}

    @classmethod
    def load(
        cls, rows: Iterable[tuple[str, str, Features, str, int]], tf_keys: Sequence[str], gen: str | None
    ) -> RecordCache:
        """Build the cache from ``(patient_id, source_org, features, digest, seq)`` rows."""
        cache = cls(tf_keys, gen)
        for pid, org, feats, digest, seq in rows:
            cache.put(pid, org, feats, digest, int(seq))
        return cache

    def __len__(self) -> int:
        return len(self.feats)

    def _count(self, key: str, value: str, delta: int) -> None:
        counter = self.tf[key]
        c = counter.get(value, 0)
        n = c + delta
        self.sum_sq[key] += n * n - c * c
        if n:
            counter[value] = n
        else:
            counter.pop(value, None)

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

    def members(self, key: str) -> Collection[str]:
        """The records holding blocking key ``key``."""
        members = self.blocks.get(key)
        if members is None:
            return ()
        return (members,) if isinstance(members, str) else members

    def remove(self, pid: str) -> None:
        """Forget a record's blocks and value counts (before it is re-put with new features)."""
        packed = self.feats.pop(pid, None)
        if packed is None:
            return
        blocks = self.blocks
        for k in blocking_keys(unpack(packed)):
            members = blocks.get(k)
            if members is None:
                continue
            if isinstance(members, str):
                if members == pid:
                    del blocks[k]
                continue
            members.discard(pid)
            if len(members) == 1:
                blocks[k] = next(iter(members))
        for key, pos in self._tf_pos:
            if packed[pos]:
                self._count(key, packed[pos], -1)
        self.state.pop(pid, None)

    def put(self, pid: str, org: str, feats: Features, digest: str, seq: int) -> list[str]:
        """Add (or replace) a record; returns its blocking keys."""
        if pid in self.feats:
            self.remove(pid)
        packed = pack(feats, self.vocab)
        self.feats[pid] = packed
        self.state[pid] = (digest, org, seq)
        keys = blocking_keys(feats)
        blocks = self.blocks
        for k in keys:
            members = blocks.get(k)
            if members is None:
                blocks[k] = pid
            elif isinstance(members, str):
                if members != pid:
                    blocks[k] = {members, pid}
            else:
                members.add(pid)
        tf, sum_sq = self.tf, self.sum_sq
        for key, pos in self._tf_pos:
            value = packed[pos]
            if value:
                counter = tf[key]
                c = counter.get(value, 0)
                counter[value] = c + 1
                sum_sq[key] += 2 * c + 1
        if seq > self.max_seq:
            self.max_seq = seq
        return keys


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
