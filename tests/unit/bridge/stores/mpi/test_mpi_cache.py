"""The record cache: what it holds after any sequence of puts and updates equals what it would hold if
built from scratch, and the index's candidate pairs are exactly the pairs sharing a (small) block."""

from __future__ import annotations

from collections import Counter

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from mpi_helpers import patient

from bridge.stores.mpi.blocking import blocking_keys
from bridge.stores.mpi.cache import RecordCache
from bridge.stores.mpi.config import DEFAULT_STRONG_SYSTEMS
from bridge.stores.mpi.features import extract_features
from bridge.stores.mpi.linking import candidates
from bridge.stores.mpi.matcher import TF_KEYS

GIVEN = ["Ann", "Anne", "Bob", "Rob", "Cara"]
FAMILY = ["Lee", "Li", "Ray", "Rae"]
DATES = ["1970-01-01", "1970-01-10", "1980-05-06", "1980", None]
POSTAL = ["111", "112", None]

record = st.tuples(
    st.integers(0, 11),  # record id: small, so that updates are frequent
    st.sampled_from(GIVEN),
    st.sampled_from(FAMILY),
    st.sampled_from(DATES),
    st.sampled_from(POSTAL),
    st.sampled_from(["123456789", "123456798", None]),
)


def features(rec: tuple) -> dict:
    i, g, f, d, z, ssn = rec
    return extract_features(patient(f"p{i}", g, f, d, None, postal=z, ssn=ssn), DEFAULT_STRONG_SYSTEMS)


def snapshot(cache: RecordCache) -> tuple:
    blocks = {k: sorted(cache.members(k)) for k in cache.blocks}
    tf = {key: cache.value_counts(key) for key in cache.tf_keys}
    feats = {pid: cache.features(pid) for pid in cache.row_of}
    return blocks, tf, dict(cache.sum_sq), feats, dict(cache.state)


batches_of_records = st.lists(st.lists(record, min_size=1, max_size=6), min_size=1, max_size=6)


@settings(max_examples=60, deadline=None)
@given(batches_of_records)
def test_cache_after_updates_equals_a_fresh_load(batches: list[list[tuple]]) -> None:
    check_updates_equal_a_fresh_load(batches)


@settings(max_examples=40, deadline=None)
@given(batches_of_records)
def test_large_blocks_after_updates_equal_a_fresh_load(batches: list[list[tuple]]) -> None:
    """Blocks keep their rows in a tuple up to a size, in a set beyond: with that size at 2, the same
    sequences go through both forms (and both ways: a set shrinks back as its records change)."""
    import bridge.stores.mpi.cache as cache_module

    saved = cache_module._TUPLE_MAX
    cache_module._TUPLE_MAX = 2
    try:
        check_updates_equal_a_fresh_load(batches)
    finally:
        cache_module._TUPLE_MAX = saved


def check_updates_equal_a_fresh_load(batches: list[list[tuple]]) -> None:
    cache = RecordCache(TF_KEYS, None)
    final: dict[str, tuple] = {}
    seq = 0
    for batch in batches:
        items = {}
        for rec in batch:  # distinct ids per put_many, the last one wins (as upsert_patients does)
            pid = f"p{rec[0]}"
            old = cache.state.get(pid)
            if old is None and pid not in items:
                seq += 1
            items[pid] = (pid, "org", features(rec), f"d{rec}", old[2] if old else seq)
        returned = cache.put_many(list(items.values()))
        assert returned == [blocking_keys(item[2]) for item in items.values()]
        final.update(items)
    fresh = RecordCache.load(sorted(final.values(), key=lambda x: x[4]), TF_KEYS, None)
    assert snapshot(cache) == snapshot(fresh)
    # the counts are the value frequencies of the final records
    for key in TF_KEYS:
        want = Counter(item[2][key] for item in final.values() if item[2][key])
        assert cache.value_counts(key) == dict(want)
        assert cache.sum_sq[key] == sum(n * n for n in want.values())


@settings(max_examples=60, deadline=None)
@given(st.lists(record, min_size=2, max_size=25), st.integers(2, 5), st.integers(0, 24))
def test_candidates_are_the_pairs_sharing_a_small_block(recs: list[tuple], cap: int, split: int) -> None:
    by_id = {f"p{r[0]}": features(r) for r in recs}
    ids = list(by_id)
    split = min(split, len(ids))
    cache = RecordCache(TF_KEYS, None)
    cache.put_many([(pid, "o", by_id[pid], "d", n + 1) for n, pid in enumerate(ids[:split])])
    changed = ids[split:]
    placed = cache.put_batch([(pid, "o", by_id[pid], "d", split + n + 1) for n, pid in enumerate(changed)])
    assert placed.keys == [blocking_keys(by_id[pid]) for pid in changed]
    ia, ib = candidates(cache, changed, placed, cap)
    # asked afresh (after the batch), the blocking index gives the same pairs
    again = candidates(cache, changed, cache.placed(changed), cap)
    assert sorted(zip(ia.tolist(), ib.tolist(), strict=True)) == sorted(
        zip(again[0].tolist(), again[1].tolist(), strict=True)
    )
    got = [(cache.ids[a], cache.ids[b]) for a, b in zip(ia.tolist(), ib.tolist(), strict=True)]
    sizes = Counter(k for pid in ids for k in blocking_keys(by_id[pid]))
    want = set()
    for a in changed:
        for b in ids:
            if a == b or (b in changed and b < a):
                continue
            shared = set(blocking_keys(by_id[a])) & set(blocking_keys(by_id[b]))
            if any(sizes[k] <= cap for k in shared):
                want.add((a, b))
    assert len(got) == len(set(got))
    assert set(got) == want
    assert np.all(ia != ib)


def test_value_counts_of_a_key_without_values_past_the_first_slots() -> None:
    """The TF slots are shared by the TF keys, but each key's counts grow only with its own values: a
    key that never had a value must still answer (IndexError past 1,024 slots)."""
    cache = RecordCache(TF_KEYS, None)
    empty = dict.fromkeys(("gn", "gm", "fn", "fm", "b", "s", "a", "c", "z", "t"), "")
    cache.put_many(
        [(f"p{i}", "o", {**empty, "g": f"g{i}", "f": f"f{i}", "i": []}, "d", i + 1) for i in range(600)]
    )
    assert cache.value_counts("c") == {}
    assert cache.value_counts("g") == {f"g{i}": 1 for i in range(600)}
