"""Blocking: the keys that decide which record pairs are compared at all.

A pair is a candidate when the two records share at least one key. Keys are built so that one typo in
any single field still leaves another key in common:

``sf:``  Soundex(family) + birth year      ``sg:``  Soundex(given) + birth year
``b:``   full birth date                    ``nm:``  the two NYSIIS name codes, sorted (survives swaps)
``zf:``  postal code + family initial       ``md:``  birth month/day + family initial + given initial
``i:``   each strong identifier             ``t:``   phone number
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import jellyfish
import numpy as np

from bridge.mpi.features import Features


def blocking_keys(f: Features) -> list[str]:
    """The blocking keys of one feature record (no duplicates, stable order)."""
    g, fam, b = f.get("g") or "", f.get("f") or "", f.get("b") or ""
    year = b[:4]
    keys: list[str] = []
    if fam and year:
        keys.append(f"sf:{jellyfish.soundex(fam)}{year}")
    if g and year:
        keys.append(f"sg:{jellyfish.soundex(g)}{year}")
    if len(b) == 8:
        keys.append(f"b:{b}")
        if fam and g:
            keys.append(f"md:{b[4:]}{fam[0]}{g[0]}")
    if f.get("gn") and f.get("fn"):
        a, c = sorted((f["gn"], f["fn"]))
        keys.append(f"nm:{a}|{c}")
    if f.get("z") and fam:
        keys.append(f"zf:{f['z']}{fam[0]}")
    for system, value in f.get("i") or ():
        keys.append(f"i:{system}|{value}")
    if f.get("t"):
        keys.append(f"t:{f['t']}")
    return list(dict.fromkeys(keys))


def candidate_pairs(keys: Sequence[Sequence[str]], max_block_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """All row pairs ``(i, j)``, ``i < j``, sharing a key; blocks over ``max_block_size`` are skipped.

    Returns ``(ia, ib, skipped_blocks)``.
    """
    blocks: dict[str, list[int]] = defaultdict(list)
    for row, ks in enumerate(keys):
        for k in dict.fromkeys(ks):
            blocks[k].append(row)
    n = len(keys)
    chunks: list[np.ndarray] = []
    skipped = 0
    for rows in blocks.values():
        size = len(rows)
        if size < 2:
            continue
        if size > max_block_size:
            skipped += 1
            continue
        r = np.asarray(rows, dtype=np.int64)
        i, j = np.triu_indices(size, k=1)
        chunks.append(r[i] * n + r[j])
    if not chunks:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, skipped
    codes = np.unique(np.concatenate(chunks))
    return codes // n, codes % n, skipped
