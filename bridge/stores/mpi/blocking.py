"""Blocking: the keys that decide which record pairs are compared at all.

A pair is a candidate when the two records share at least one key. Keys are built so that one typo in
any single field still leaves another key in common:

``sf:``  Soundex(family) + birth year + sex  ``b:``   full birth date + sex
``md:``  birth month/day + family initial + given initial
``nm:``  the two NYSIIS name codes, sorted (survives given/family swaps)
``zf:``  postal code + family initial + given initial + sex
``t:``   phone number
``is:``/``iz:``  each strong identifier with its first / second half's characters sorted (equal values
         share both; an adjacent transposition anywhere keeps one); identifiers shorter than 6 characters
         use ``i:`` + the value itself

Sex is one letter, ``m`` or ``f``. A record whose sex is missing, ``other`` or ``unknown`` gets each of
those three keys twice, once per letter, so it still meets records of either sex: a feed that never
sends a gender loses no candidates. A record whose sex was mistyped keeps ``md:``, ``nm:``, ``t:`` and
the identifier keys. ``nm:`` carries no sex on purpose: the EM estimate of the u probabilities comes
from the candidate pairs, and with the sex on ``nm:`` too, too few pairs of different people sharing a
name were left in small indexes (a 120-record test population then linked two namesakes: 6 false links
over 40 seeds against 2).

At 100,000 people (152,000 records, ``benchmarks/bench_query.py``) these keys give about 10 candidate
pairs per record (9.6 as the batch linker counts them; 6.1 on the synthetic population of
``benchmarks/bench_mpi.py``). Looser keys cost more: a whole 9-digit identifier sorted makes blocks of
dozens of people with the same digits, postal code + family initial alone blocks of hundreds, Soundex +
year without sex twice the pairs (together 29 pairs per record); ``b:`` and ``zf:`` without the sex give
12.0 (7.3 on the synthetic population) with the same pair completeness. The price of the tighter keys is
a few FEBRL pairs with errors in several fields (pair completeness 1.0000 / 0.9964 / 0.9977, against
1.0000 / 0.9969 / 0.9986 with the looser ones; MATCH F1 within 0.0006, persons F1 within 0.0001). FEBRL
has no sex: every record there gets both letters, so the sex on the keys changes none of its pairs.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence

import jellyfish
import numpy as np

from bridge.stores.mpi.arrays import distinct, runs
from bridge.stores.mpi.features import Features

_soundex = functools.lru_cache(maxsize=65536)(jellyfish.soundex)


#: the sex letters a record's keys carry: its own, or both when the sex is not known as male or female
_SEXES = {"male": ("m",), "female": ("f",)}
_EITHER = ("m", "f")
#: identifier system -> a short tag standing for it in this process's keys (keys live in memory only;
#: a 30-character URI in two keys per record cost hashing time and memory)
_SYSTEM_TAGS: dict[str, str] = {}
_next_tag = itertools.count()


def _system_tag(system: str) -> str:
    tag = _SYSTEM_TAGS.get(system)
    if tag is None:  # next() on a count is atomic: two threads never hand out the same tag
        tag = _SYSTEM_TAGS.setdefault(system, str(next(_next_tag)))
    return tag


def blocking_keys(f: Features) -> list[str]:
    """The blocking keys of one feature record (distinct by construction, stable order)."""
    g, fam, b = f.get("g") or "", f.get("f") or "", f.get("b") or ""
    sexes = _SEXES.get(f.get("s") or "", _EITHER)
    keys: list[str] = []
    add = keys.append
    if fam and b:
        sf = "sf:" + _soundex(fam) + b[:4]
        for x in sexes:
            add(sf + x)
    if len(b) == 8:
        for x in sexes:
            add("b:" + b + x)
        if fam and g:
            add("md:" + b[4:] + fam[0] + g[0])
    gn, fn = f.get("gn"), f.get("fn")
    if gn and fn:
        add("nm:" + gn + "|" + fn if gn <= fn else "nm:" + fn + "|" + gn)
    z = f.get("z")
    if z and fam and g:
        zf = "zf:" + z + fam[0] + g[0]
        for x in sexes:
            add(zf + x)
    for system, value in f.get("i") or ():
        tag = _system_tag(system)
        if len(value) >= 6:
            # Two keys, each with one half's characters sorted: equal values share both, and an adjacent
            # transposition anywhere leaves one of them unchanged (within the first h+1 characters: the
            # first; from position h on: the second). Sorting the whole value would do that too, but 9-digit
            # numbers with the same digits are common enough to make blocks of dozens of people.
            h = len(value) // 2
            add("is:" + tag + "|" + "".join(sorted(value[: h + 1])) + value[h + 1 :])
            add("iz:" + tag + "|" + value[:h] + "".join(sorted(value[h:])))
        else:
            add("i:" + tag + "|" + value)
    t = f.get("t")
    if t:
        add("t:" + t)
    return keys


def candidate_pairs(keys: Sequence[Sequence[str]], max_block_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """All row pairs ``(i, j)``, ``i < j``, sharing a key; blocks over ``max_block_size`` are skipped.

    Returns ``(ia, ib, skipped_blocks)``; pairs are unique and sorted.
    """
    ids: dict[str, int] = {}
    bids: list[int] = []
    rows: list[int] = []
    for row, ks in enumerate(keys):
        for k in ks:
            bids.append(ids.setdefault(k, len(ids)))
        rows.extend([row] * len(ks))
    empty = np.zeros(0, dtype=np.int64)
    if not rows:
        return empty, empty, 0
    bid = np.asarray(bids, dtype=np.int64)
    row_arr = np.asarray(rows, dtype=np.int64)
    order = np.argsort(bid, kind="stable")
    bid, row_arr = bid[order], row_arr[order]
    # duplicate (key, row) entries would inflate block sizes: drop them
    dup = np.zeros(len(bid), dtype=bool)
    dup[1:] = (bid[1:] == bid[:-1]) & (row_arr[1:] == row_arr[:-1])
    if dup.any():
        bid, row_arr = bid[~dup], row_arr[~dup]
    starts, sizes = runs(bid)  # bid is sorted
    skipped = int((sizes > max_block_size).sum())
    n = len(keys)
    chunks: list[np.ndarray] = []
    for size in np.unique(sizes):
        if size < 2 or size > max_block_size:
            continue
        s = starts[sizes == size]
        i, j = np.triu_indices(int(size), k=1)
        a = row_arr[(s[:, None] + i[None, :]).ravel()]
        b = row_arr[(s[:, None] + j[None, :]).ravel()]
        keep = a != b  # a record listing the same key twice
        chunks.append(np.minimum(a, b)[keep] * n + np.maximum(a, b)[keep])
    if not chunks:
        return empty, empty, skipped
    codes = distinct(np.concatenate(chunks))
    return codes // n, codes % n, skipped
