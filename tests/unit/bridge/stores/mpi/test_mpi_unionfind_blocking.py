from __future__ import annotations

import itertools

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.stores.mpi.blocking import blocking_keys, candidate_pairs
from bridge.stores.mpi.unionfind import UnionFind


@settings(max_examples=100, deadline=None)
@given(n=st.integers(1, 30), edges=st.lists(st.tuples(st.integers(0, 29), st.integers(0, 29)), max_size=40))
def test_union_find_matches_graph_connectivity(n: int, edges: list[tuple[int, int]]) -> None:
    edges = [(a % n, b % n) for a, b in edges]
    uf: UnionFind[int] = UnionFind(range(n))
    for a, b in edges:
        uf.union(a, b)
    # naive transitive closure
    comp = {i: {i} for i in range(n)}
    changed = True
    while changed:
        changed = False
        for a, b in edges:
            if comp[a] is not comp[b]:
                merged = comp[a] | comp[b]
                for x in merged:
                    comp[x] = merged
                changed = True
    for a, b in itertools.combinations(range(n), 2):
        assert uf.connected(a, b) == (b in comp[a])
    groups = uf.groups()
    assert sorted(x for g in groups for x in g) == list(range(n))


@settings(max_examples=100, deadline=None)
@given(keys=st.lists(st.lists(st.sampled_from("abcdefg"), max_size=3), max_size=25), cap=st.integers(2, 8))
def test_candidate_pairs_are_exactly_the_pairs_sharing_a_small_block(keys: list[list[str]], cap: int) -> None:
    ia, ib, skipped = candidate_pairs(keys, cap)
    got = set(zip(ia.tolist(), ib.tolist(), strict=True))
    sizes = {k: sum(k in set(ks) for ks in keys) for k in "abcdefg"}
    want = {
        (i, j)
        for i, j in itertools.combinations(range(len(keys)), 2)
        if any(sizes[k] <= cap for k in set(keys[i]) & set(keys[j]))
    }
    assert got == want
    assert all(i < j for i, j in got)
    assert skipped == sum(1 for s in sizes.values() if s > cap)
    assert ia.dtype == np.int64


def test_blocking_keys_survive_single_field_errors() -> None:
    base = {
        "g": "maria",
        "f": "schneider",
        "gn": "MAR",
        "fn": "SNADAR",
        "b": "19700506",
        "z": "53111",
        "i": [],
        "t": "",
    }
    typo_family = {**base, "f": "schnieder", "fn": "SNADAR"}
    typo_year = {**base, "b": "19710506"}
    swapped = {**base, "g": "schneider", "f": "maria", "gn": "SNADAR", "fn": "MAR"}
    for other in (typo_family, typo_year, swapped):
        assert set(blocking_keys(base)) & set(blocking_keys(other))
    assert blocking_keys({"g": "", "f": "", "b": ""}) == []


def test_blocking_keys_carry_the_sex_and_a_missing_sex_meets_both() -> None:
    base = {"g": "maria", "f": "schneider", "gn": "MAR", "fn": "SNADAR", "b": "19700506", "z": "53111"}
    female, male = {**base, "s": "female"}, {**base, "s": "male"}
    unknown = [{**base, "s": ""}, {**base, "s": "other"}, base]

    def by_kind(f: dict[str, str]) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {}
        for k in blocking_keys(f):
            out.setdefault(k.split(":", 1)[0], set()).add(k)
        return out

    kf, km = by_kind(female), by_kind(male)
    # two people born the same day, of different sex, no longer share the birth-date, Soundex and
    # postal-code blocks ...
    for kind in ("b", "sf", "zf"):
        assert len(kf[kind]) == 1 and not kf[kind] & km[kind]
    # ... but a record whose sex was mistyped still shares the name and month/day keys
    assert kf["md"] == km["md"] and kf["nm"] == km["nm"]
    # a record without a usable sex gets both letters: it meets records of either sex
    for f in unknown:
        ku = by_kind(f)
        for kind in ("b", "sf", "zf"):
            assert len(ku[kind]) == 2 and kf[kind] <= ku[kind] and km[kind] <= ku[kind]
    keys = blocking_keys(unknown[0])
    assert len(keys) == len(set(keys))
