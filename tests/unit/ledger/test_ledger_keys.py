"""The two-level key index (B-trees plus a tail of packed batch keys) behind idempotency and proof by
leaf hash: merges, other writers, rollbacks, concurrent readers and the schema 2 migration. Every test
runs on SQLite and on PostgreSQL (marked ``postgres``)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ledger_helpers import make_entry as entry

from bridge.stores.ledger import open_ledger
from ledger import merkle, note
from ledger.audit import audit
from ledger.errors import StorageUnavailable
from ledger.log import Ledger, LedgerEntry

ORIGIN = "fhirbridge.test/keys"
SKEY, VKEY = note.generate_key(ORIGIN)


def open_small(url: str, merge_at: int = 50) -> Ledger:
    led = open_ledger(url, origin=ORIGIN, signer_key=SKEY, checkpoint_every=10**9)
    led.storage.merge_at = merge_at  # type: ignore[attr-defined]
    return led


@pytest.fixture
def led(url: str) -> Iterator[Ledger]:
    ledger = open_small(url)
    yield ledger
    ledger.close()


def counts(led: Ledger) -> tuple[int, int, int]:
    """(rows in ledger_dkeys, rows in ledger_lkeys, entries covered by the tail)."""
    storage: Any = led.storage
    with storage._guard() as conn:
        d = conn.execute("SELECT COUNT(*) FROM ledger_dkeys").fetchone()[0]
        lk = conn.execute("SELECT COUNT(*) FROM ledger_lkeys").fetchone()[0]
        t = conn.execute("SELECT COALESCE(SUM(n), 0) FROM ledger_tail").fetchone()[0]
    return int(d), int(lk), int(t)


def test_the_tail_is_merged_when_it_reaches_merge_at(led: Ledger) -> None:
    led.append([entry(i) for i in range(30)])
    assert counts(led) == (0, 0, 30)
    led.append([entry(i) for i in range(30, 60)])  # 60 >= 50: merged in this append
    assert counts(led) == (60, 60, 0)
    led.append([entry(i) for i in range(60, 70)])
    assert counts(led) == (60, 60, 10)
    for i in (0, 29, 59, 60, 69):
        assert led.find(entry(i).bundle_sha256, "org-a") == i
        assert led.find_leaf(merkle.leaf_hash(entry(i).canonical())) == i
    assert led.find(entry(70).bundle_sha256, "org-a") is None
    assert led.find(entry(5).bundle_sha256, "org-b") is None


def test_replays_get_existing_indices_from_both_levels(led: Ledger) -> None:
    led.append([entry(i) for i in range(60)])  # merged
    led.append([entry(i) for i in range(60, 80)])  # tail
    replay = [entry(3, offset=999), entry(65, offset=999), entry(80), entry(3, offset=7)]
    assert led.append(replay) == [3, 65, 80, 3]
    assert led.size() == 81
    assert audit(led, [VKEY]).ok


def test_another_writer_and_a_reader_see_the_same_index(url: str) -> None:
    a, b = open_small(url), open_small(url)
    reader = open_small(url)
    try:
        a.append([entry(i) for i in range(20)])
        assert reader.find(entry(7).bundle_sha256, "org-a") == 7  # from the tail, cached
        b.append([entry(i) for i in range(10, 40)])  # b never saw a's tail
        assert b.size() == 40
        a.append([entry(i) for i in range(35, 55)])  # a's cached tail is stale: reloaded; merges
        assert a.size() == 55 and counts(a) == (55, 55, 0)
        for i in (7, 19, 39, 54):
            assert reader.find(entry(i).bundle_sha256, "org-a") == i
        a.reset()
        assert reader.find(entry(7).bundle_sha256, "org-a") is None  # the reset epoch drops the cache
        b.append([entry(100)])
        assert reader.find(entry(100).bundle_sha256, "org-a") == 0
        assert audit(b, [VKEY]).ok
    finally:
        a.close()
        b.close()
        reader.close()


def test_a_rolled_back_append_leaves_no_key_behind(led: Ledger, monkeypatch: pytest.MonkeyPatch) -> None:
    from ledger import storage as storage_mod

    led.append([entry(i) for i in range(10)])

    def boom(self: Any, tiles: Any) -> None:
        raise RuntimeError("disk on fire")

    with monkeypatch.context() as m:
        m.setattr(storage_mod._SqlTxn, "put_tiles", boom)
        with pytest.raises(RuntimeError):
            led.append([entry(i) for i in range(10, 20)])  # entries and tail row written, rolled back
    assert led.size() == 10
    assert led.find(entry(12).bundle_sha256, "org-a") is None
    assert led.append([entry(12), entry(3)]) == [10, 3]  # not "already logged at 12"
    assert audit(led, [VKEY]).ok


def test_reader_batch_lookup_over_many_keys(led: Ledger) -> None:
    led.append([entry(i) for i in range(0, 1200, 2)])  # 600 entries: merged
    led.append([entry(i) for i in range(1200, 1210, 2)])  # tail
    keys = [(entry(i).bundle_sha256, "org-a") for i in range(1210)]
    found = led.find_many(keys)
    assert found == {(entry(i).bundle_sha256, "org-a"): i // 2 for i in range(0, 1210, 2)}


def test_a_lookup_that_keeps_racing_merges_is_unavailable(
    led: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    led.append([entry(i) for i in range(10)])
    storage: Any = led.storage
    monkeypatch.setattr(storage, "_load_reader_tail", lambda conn, epoch, firsts: False)
    with pytest.raises(StorageUnavailable):
        led.find(entry(1).bundle_sha256, "org-a")


def test_a_schema_2_database_is_migrated_in_place(tmp_path: Any) -> None:
    path = tmp_path / "v2.db"
    url = f"sqlite:///{path}"
    with open_small(url, merge_at=10**6) as led:
        led.append([entry(i) for i in range(40)])
        led.checkpoint_now()
    # What schema 2 looked like: keys indexed on the entries table, none in the key tables or tail.
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("DELETE FROM ledger_dkeys")
        conn.execute("DELETE FROM ledger_lkeys")
        conn.execute("DELETE FROM ledger_tail")
        conn.execute("CREATE INDEX ledger_entries_dkey ON ledger_entries (dkey)")
        conn.execute("CREATE INDEX ledger_entries_lkey ON ledger_entries (lkey)")
        conn.execute("UPDATE ledger_meta SET schema_version = 2")
    conn.close()
    with open_small(url) as led:
        assert counts(led) == (40, 40, 0)
        assert led.find(entry(33).bundle_sha256, "org-a") == 33
        assert led.append([entry(5), entry(40)]) == [5, 40]
        assert audit(led, [VKEY]).ok
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT schema_version FROM ledger_meta").fetchone()[0] == 3
    assert (
        conn.execute(
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'index' AND name LIKE 'ledger_entries_%'"
        ).fetchone()[0]
        == 0
    )
    conn.close()


batches = st.lists(st.lists(st.integers(0, 120), min_size=1, max_size=40), min_size=1, max_size=12)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batches=batches, merge_at=st.integers(1, 100))
def test_property_indices_match_a_dictionary(
    tmp_path_factory: Any, batches: list[list[int]], merge_at: int
) -> None:
    # Whatever the batches (with replays within and across them) and wherever merges fall, every
    # append returns what a plain dictionary of first appearances says, and both lookups agree.
    url = f"sqlite:///{tmp_path_factory.mktemp('p')}/l.db"
    model: dict[int, int] = {}
    with open_small(url, merge_at=merge_at) as led:
        for batch in batches:
            expected = [model.setdefault(i, len(model)) for i in batch]
            assert led.append([entry(i, offset=j + 1) for j, i in enumerate(batch)]) == expected
        assert led.size() == len(model)
        for i in range(121):
            assert led.find(entry(i).bundle_sha256, "org-a") == model.get(i)
        for idx in model.values():
            assert led.find_leaf(led.leaf_hash(idx)) == idx
        d, lk, t = counts(led)
        assert d == lk and d + t == len(model)


def test_colliding_dedup_keys_are_different_entries(led: Ledger) -> None:
    # Two bundles whose hashes share the first 4 bytes share a 32-bit dedup key: in one batch, across
    # batches, and across a merge they are still two entries (and a replay of each finds its own).
    fields = {f: getattr(entry(1), f) for f in LedgerEntry.__dataclass_fields__}
    twins = [LedgerEntry(**{**fields, "bundle_sha256": "abcdef01" + c * 56}) for c in "0123"]
    assert led.append(twins[:2]) == [0, 1]
    led.append([entry(i) for i in range(100, 160)])  # merged now (merge_at 50)
    assert led.append([twins[2], twins[0], twins[3], twins[1]]) == [62, 0, 63, 1]
    assert [led.find(t.bundle_sha256, "org-a") for t in twins] == [0, 1, 62, 63]


@settings(max_examples=200, deadline=None)
@given(
    batches=st.lists(
        st.lists(st.integers(-5, 5) | st.integers(-(2**31), 2**31 - 1), max_size=30), max_size=6
    ),
    query=st.lists(st.integers(-6, 6) | st.integers(-(2**32), 2**32), max_size=20),
)
def test_property_key_index_lookup_equals_a_scan(batches: list[list[int]], query: list[int]) -> None:
    import numpy as np

    from ledger.storage import _KeyIndex

    index, flat = _KeyIndex(), []
    for batch in batches:
        index.add(np.array(batch, dtype=np.int32), len(flat))
        flat += batch
    present, idxs = index.lookup(query)
    assert idxs == [i for i, k in enumerate(flat) if k in set(query)]
    assert present == set(query) & set(flat)
