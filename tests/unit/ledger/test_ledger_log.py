"""The Ledger API; every test runs on SQLite and on PostgreSQL (marked ``postgres``)."""

from __future__ import annotations

import base64
import sqlite3
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ledger_helpers import make_entry

from bridge.stores.ledger import open_ledger
from ledger import checkpoint, merkle, note
from ledger.audit import audit
from ledger.errors import (
    EntryTooLarge,
    InvalidEntry,
    LedgerError,
    OutOfRange,
    StorageUnavailable,
    VerificationError,
)
from ledger.log import Ledger, LedgerEntry

ORIGIN = "fhirbridge.test/ledger"
LOG_SKEY, LOG_VKEY = note.generate_key(ORIGIN)


@pytest.fixture
def led(url: str) -> Iterator[Ledger]:
    ledger = open_ledger(
        url, origin=ORIGIN, signer_key=LOG_SKEY, checkpoint_every=100, checkpoint_interval_ms=3_600_000
    )
    yield ledger
    ledger.close()


def raw_exec(url: str, sql: str, params: tuple[Any, ...] = ()) -> None:
    """Tamper with the database behind the ledger's back."""
    if url.startswith("sqlite:///"):
        conn = sqlite3.connect(url[len("sqlite://") :])
        with conn:
            conn.execute(sql, params)
        conn.close()
    else:
        import psycopg

        with psycopg.connect(url, autocommit=True) as pg:
            pg.execute(sql.replace("?", "%s"), params)


def leaf_hashes(n: int) -> list[bytes]:
    return [merkle.leaf_hash(make_entry(i).canonical()) for i in range(n)]


def test_append_returns_contiguous_indices_and_entries_roundtrip(led: Ledger) -> None:
    assert led.size() == 0
    assert led.append([make_entry(i) for i in range(5)]) == [0, 1, 2, 3, 4]
    assert led.append([make_entry(5)]) == [5]
    assert led.size() == 6
    assert led.entry(3) == make_entry(3)
    assert led.find(make_entry(4).bundle_sha256, "org-a") == 4
    assert led.find(make_entry(4).bundle_sha256, "org-b") is None
    assert led.append([]) == []


def test_append_is_idempotent_across_and_within_batches(led: Ledger) -> None:
    led.append([make_entry(i) for i in range(3)])
    # Same bundle and source, other offset (a Kafka replay): existing index, nothing appended.
    again = [make_entry(1, offset=99), make_entry(3), make_entry(3, offset=7), make_entry(1, org="org-b")]
    assert led.append(again) == [1, 3, 3, 4]
    assert led.size() == 5
    assert led.entry(3).offset == 3


def test_invalid_entries_are_rejected_before_anything_is_written(led: Ledger) -> None:
    bad = LedgerEntry("XYZ", "org", "a", "1", "t", 0, 0, "2024-01-01T00:00:00Z")
    with pytest.raises(InvalidEntry, match="bundle_sha256"):
        led.append([make_entry(0), bad])
    late = LedgerEntry(make_entry(0).bundle_sha256, "org", "a", "1", "t", 0, 0, "yesterday")
    with pytest.raises(InvalidEntry, match="ingested_at"):
        led.append([late])
    huge = LedgerEntry(make_entry(0).bundle_sha256, "o" * 70_000, "a", "1", "t", 0, 0, "2024-01-01T00:00:00Z")
    with pytest.raises(EntryTooLarge) as info:
        led.append([huge])
    assert info.value.limit == 65536
    assert led.size() == 0


@pytest.mark.parametrize("sizes", [[1], [3, 5], [255, 1, 1], [256, 300, 7]])
def test_roots_and_proofs_match_the_in_memory_tree(url: str, sizes: list[int]) -> None:
    led = open_ledger(url, origin=ORIGIN)
    total = 0
    for n in sizes:
        led.append([make_entry(i) for i in range(total, total + n)])
        total += n
    hashes = leaf_hashes(total)
    for size in sorted({1, 2, 3, total // 2 or 1, total - 1 or 1, total, 255, 256, 257} - {0}):
        if size > total:
            continue
        root = led.root_hash(size)
        assert root == merkle.root_hash(hashes[:size])
        for index in {0, size // 2, size - 1}:
            proof = led.inclusion_proof(index, size)
            assert proof == merkle.inclusion_proof(hashes, index, size)
            merkle.verify_inclusion(hashes[index], index, size, proof, root)
        for size1 in {1, size // 3 or 1, size}:
            proof = led.consistency_proof(size1, size)
            assert proof == merkle.consistency_proof(hashes, size1, size)
            merkle.verify_consistency(size1, size, proof, merkle.root_hash(hashes[:size1]), root)
    assert led.root_hash() == merkle.root_hash(hashes)
    assert led.root_hash(0) == merkle.EMPTY_ROOT
    led.close()


def test_reopened_log_continues_the_same_tree(url: str) -> None:
    led = open_ledger(url, origin=ORIGIN)
    led.append([make_entry(i) for i in range(300)])
    led.close()
    led = open_ledger(url, origin=ORIGIN)
    led.append([make_entry(i) for i in range(300, 530)])
    assert led.root_hash() == merkle.root_hash(leaf_hashes(530))
    led.close()


def test_out_of_range_requests_raise_out_of_range(led: Ledger) -> None:
    led.append([make_entry(i) for i in range(4)])
    with pytest.raises(OutOfRange):
        led.entry(4)
    with pytest.raises(OutOfRange):
        led.inclusion_proof(4, 4)
    with pytest.raises(OutOfRange):
        led.inclusion_proof(0, 5)
    with pytest.raises(OutOfRange):
        led.consistency_proof(0, 4)
    with pytest.raises(OutOfRange):
        led.consistency_proof(2, 5)
    with pytest.raises(OutOfRange):
        led.root_hash(5)


def test_checkpoints_are_signed_every_n_entries(led: Ledger) -> None:
    assert led.latest_checkpoint() is None
    led.append([make_entry(i) for i in range(60)])
    first = led.latest_checkpoint()  # the very first append signs (no previous checkpoint)
    assert first is not None and checkpoint.open(first, [LOG_VKEY]).size == 60
    led.append([make_entry(i) for i in range(60, 120)])
    assert checkpoint.open(led.latest_checkpoint() or "", [LOG_VKEY]).size == 60  # only 60 since the last
    led.append([make_entry(i) for i in range(120, 170)])
    cp = checkpoint.open(led.latest_checkpoint() or "", [LOG_VKEY])
    assert (cp.origin, cp.size, cp.root_hash) == (ORIGIN, 170, led.root_hash(170))


def test_checkpoints_are_signed_after_the_interval(url: str) -> None:
    led = open_ledger(
        url, origin=ORIGIN, signer_key=LOG_SKEY, checkpoint_every=10_000, checkpoint_interval_ms=0
    )
    led.append([make_entry(0)])
    led.append([make_entry(1)])
    assert checkpoint.open(led.latest_checkpoint() or "", [LOG_VKEY]).size == 2
    led.close()


def test_checkpoint_now_and_maybe_checkpoint(led: Ledger) -> None:
    assert led.checkpoint_now() is None  # empty log
    led.append([make_entry(i) for i in range(3)])
    led.append([make_entry(3)])
    assert checkpoint.open(led.latest_checkpoint() or "", [LOG_VKEY]).size == 3
    signed = led.checkpoint_now()
    assert signed is not None and checkpoint.open(signed, [LOG_VKEY]).size == 4
    assert led.checkpoint_now() == signed  # same size: the stored one, not a new signature
    assert led.maybe_checkpoint() is None


def test_maybe_checkpoint_waits_for_the_interval(url: str) -> None:
    led = open_ledger(
        url, origin=ORIGIN, signer_key=LOG_SKEY, checkpoint_every=100, checkpoint_interval_ms=300
    )
    led.append([make_entry(0)])  # the first entry is signed at once
    led.append([make_entry(1)])
    assert checkpoint.open(led.latest_checkpoint() or "", [LOG_VKEY]).size == 1
    assert led.maybe_checkpoint() is None  # the interval has not passed: entry 1 stays unsigned
    time.sleep(0.35)
    signed = led.maybe_checkpoint()
    assert signed is not None and checkpoint.open(signed, [LOG_VKEY]).size == 2
    assert led.maybe_checkpoint() is None  # nothing unsigned
    led.close()


def test_without_signer_no_checkpoints(url: str) -> None:
    led = open_ledger(url, origin=ORIGIN)
    led.append([make_entry(0)])
    assert led.checkpoint_now() is None
    assert led.latest_checkpoint() is None
    led.close()


def test_a_reader_sees_the_writers_commits_without_reopening(url: str) -> None:
    writer = open_ledger(url, origin=ORIGIN, signer_key=LOG_SKEY, checkpoint_every=1)
    reader = open_ledger(url, origin=ORIGIN)
    assert reader.size() == 0
    writer.append([make_entry(i) for i in range(10)])
    assert reader.size() == 10
    assert reader.root_hash() == writer.root_hash()
    writer.append([make_entry(10)])
    assert reader.size() == 11
    assert checkpoint.open(reader.latest_checkpoint() or "", [LOG_VKEY]).size == 11
    assert reader.inclusion_proof(10, 11) == writer.inclusion_proof(10, 11)
    writer.close()
    reader.close()


def test_two_writers_interleaving_stay_consistent(url: str) -> None:
    a = open_ledger(url, origin=ORIGIN)
    b = open_ledger(url, origin=ORIGIN)
    a.append([make_entry(i) for i in range(5)])
    b.append([make_entry(i) for i in range(3, 9)])  # b's right edge is stale: it must reload
    a.append([make_entry(9)])
    assert a.size() == 10
    assert a.root_hash() == merkle.root_hash(leaf_hashes(10))
    a.close()
    b.close()


def test_another_origin_is_refused(url: str) -> None:
    open_ledger(url, origin=ORIGIN).close()
    with pytest.raises(LedgerError, match="holds the log"):
        open_ledger(url, origin="other.example/log")


def test_reset_empties_the_log(led: Ledger) -> None:
    led.append([make_entry(i) for i in range(300)])
    led.reset()
    assert led.size() == 0
    assert led.latest_checkpoint() is None
    assert led.find(make_entry(1).bundle_sha256, "org-a") is None
    assert led.append([make_entry(7)]) == [0]
    assert led.root_hash() == merkle.leaf_hash(make_entry(7).canonical())


def test_a_reader_drops_its_tile_cache_when_another_process_resets(url: str) -> None:
    writer = open_ledger(url, origin=ORIGIN)
    reader = open_ledger(url, origin=ORIGIN)
    writer.append([make_entry(i) for i in range(600)])
    before = reader.inclusion_proof(5, 600)  # caches the complete tiles
    writer.reset()
    writer.append([make_entry(i, org="org-new") for i in range(600)])
    after = reader.inclusion_proof(5, 600)
    assert after != before
    assert after == merkle.inclusion_proof(
        [merkle.leaf_hash(make_entry(i, org="org-new").canonical()) for i in range(600)], 5, 600
    )
    writer.close()
    reader.close()


def test_a_writer_notices_a_reset_by_another_process_even_at_the_same_size(url: str) -> None:
    a = open_ledger(url, origin=ORIGIN)
    b = open_ledger(url, origin=ORIGIN)
    a.append([make_entry(i) for i in range(300)])
    b.reset()
    b.append([make_entry(i, org="org-new") for i in range(300)])  # same size, other tree
    a.append([make_entry(1000)])
    hashes = [merkle.leaf_hash(make_entry(i, org="org-new").canonical()) for i in range(300)]
    hashes.append(merkle.leaf_hash(make_entry(1000).canonical()))
    assert a.root_hash() == merkle.root_hash(hashes)
    a.close()
    b.close()


def test_prove_returns_a_verifiable_bundle_proof(led: Ledger) -> None:
    led.append([make_entry(i) for i in range(20)])
    proof = led.prove(make_entry(13).bundle_sha256, "org-a")
    assert proof is not None
    cp = checkpoint.open(proof["checkpoint"], [LOG_VKEY])
    merkle.verify_inclusion(
        base64.b64decode(proof["leaf_hash"]),
        proof["index"],
        proof["size"],
        [base64.b64decode(p) for p in proof["proof"]],
        cp.root_hash,
    )
    assert proof["entry"]["offset"] == 13
    assert led.prove("0" * 64, "org-a") is None


def test_find_leaf(led: Ledger) -> None:
    led.append([make_entry(i) for i in range(4)])
    assert led.find_leaf(leaf_hashes(4)[2]) == 2
    assert led.find_leaf(b"\x00" * 32) is None


def test_cosignatures_from_configured_witnesses_are_attached(url: str) -> None:
    wskey, wvkey = note.generate_key("witness.test/w1", note.ALG_COSIGNATURE_V1)
    led = open_ledger(url, origin=ORIGIN, signer_key=LOG_SKEY, witness_keys=[wvkey])
    led.append([make_entry(0)])
    signed = led.latest_checkpoint() or ""
    line = checkpoint.cosign(signed, LOG_VKEY, wskey)
    assert led.add_cosignatures(signed + line) == 1
    attached = led.latest_checkpoint() or ""
    assert attached == signed + line
    assert checkpoint.open(attached, [LOG_VKEY, wvkey]).signers == (ORIGIN, "witness.test/w1")
    # An unconfigured witness is not accepted, nor a cosignature on a checkpoint the log never signed.
    other_skey, _ = note.generate_key("witness.test/w2", note.ALG_COSIGNATURE_V1)
    with pytest.raises(VerificationError):
        led.add_cosignatures(signed + checkpoint.cosign(signed, LOG_VKEY, other_skey))
    forged = checkpoint.sign(ORIGIN, 1, b"\x00" * 32, LOG_SKEY)
    with pytest.raises(VerificationError):
        led.add_cosignatures(forged + checkpoint.cosign(forged, LOG_VKEY, wskey))
    led.close()


# -- audit: tampering with the database directly ---------------------------------------------------


@pytest.fixture
def audited(url: str) -> Iterator[Ledger]:
    led = open_ledger(url, origin=ORIGIN, signer_key=LOG_SKEY, checkpoint_every=100)
    for start in range(0, 600, 150):
        led.append([make_entry(i) for i in range(start, start + 150)])
    led.checkpoint_now()
    yield led
    led.close()


def test_audit_of_an_untouched_log_passes(audited: Ledger) -> None:
    report = audit(audited, [LOG_VKEY], batch=128)
    assert report.ok, report.problems
    assert report.entries_checked == 600
    assert report.checkpoints_checked == 4  # 150, 300, 450, 600; checkpoint_now adds none at 600
    assert report.tiles_checked >= 3


def test_audit_reports_first_altered_entry(url: str, audited: Ledger) -> None:
    tampered = make_entry(317, org="org-evil").canonical()
    raw_exec(url, "UPDATE ledger_entries SET entry = ? WHERE idx = ?", (tampered, 317))
    report = audit(audited, [LOG_VKEY])
    assert not report.ok
    assert report.first_bad_index == 317


def test_audit_catches_entry_and_leaf_hash_rewritten_together(url: str, audited: Ledger) -> None:
    tampered = make_entry(42, offset=4242).canonical()
    raw_exec(
        url,
        "UPDATE ledger_entries SET entry = ?, leaf_hash = ? WHERE idx = ?",
        (tampered, merkle.leaf_hash(tampered), 42),
    )
    report = audit(audited, [LOG_VKEY])
    assert not report.ok
    assert report.first_bad_index == 42  # the stored tile still commits to the original leaf


def test_audit_catches_a_rewritten_history_with_recomputed_tiles(url: str, audited: Ledger) -> None:
    # An attacker rewrites row 10 and rebuilds every tile: only the signed checkpoints betray it.
    from ledger.storage import leaf_key
    from ledger.tiles import TileBuilder, tile_key

    tampered = make_entry(10, offset=1010).canonical()
    leaf = merkle.leaf_hash(tampered)
    raw_exec(
        url,
        "UPDATE ledger_entries SET entry = ?, leaf_hash = ?, lkey = ? WHERE idx = ?",
        (tampered, leaf, leaf_key(leaf), 10),
    )
    hashes = leaf_hashes(600)
    hashes[10] = merkle.leaf_hash(tampered)
    builder = TileBuilder()
    builder.append(hashes)
    for tile in builder.take_dirty():
        raw_exec(
            url,
            "UPDATE ledger_tiles SET hashes = ? WHERE tile_key = ?",
            (tile.encode(), tile_key(tile.k, tile.t)),
        )
    report = audit(audited, [LOG_VKEY])
    assert not report.ok
    assert report.first_bad_index == 0  # the bad row lies before the first checkpoint (size 150)
    assert any("checkpoint 150" in p for p in report.problems)


def test_audit_catches_a_deleted_row(url: str, audited: Ledger) -> None:
    raw_exec(url, "DELETE FROM ledger_entries WHERE idx = ?", (250,))
    report = audit(audited, [LOG_VKEY])
    assert not report.ok and report.first_bad_index == 250


def test_audit_catches_a_tampered_tile(url: str, audited: Ledger) -> None:
    from ledger.tiles import Tile, tile_key

    stored = audited.storage.get_tiles({(0, 1)})[(0, 1)]
    tile = Tile.decode(0, 1, stored[0], stored[1])
    tile.levels[0][5] = b"\x00" * 32  # leaf 256 + 5
    raw_exec(url, "UPDATE ledger_tiles SET hashes = ? WHERE tile_key = ?", (tile.encode(), tile_key(0, 1)))
    report = audit(audited, [LOG_VKEY])
    assert not report.ok
    assert report.first_bad_index == 261
    raw_exec(url, "UPDATE ledger_tiles SET hashes = ? WHERE tile_key = ?", (b"\x00" * 7, tile_key(0, 1)))
    report = audit(audited, [LOG_VKEY])
    assert not report.ok
    assert report.first_bad_index == 256


def test_audit_catches_a_forged_checkpoint(url: str, audited: Ledger) -> None:
    other_skey, _ = note.generate_key(ORIGIN)
    forged = checkpoint.sign(ORIGIN, 300, audited.root_hash(300), other_skey)
    raw_exec(url, "UPDATE ledger_checkpoints SET note = ? WHERE size = ?", (forged, 300))
    report = audit(audited, [LOG_VKEY])
    assert not report.ok
    assert any("checkpoint 300" in p for p in report.problems)


def test_audit_with_a_trusted_checkpoint(audited: Ledger) -> None:
    good = checkpoint.sign(ORIGIN, 123, audited.root_hash(123), LOG_SKEY)
    assert audit(audited, [LOG_VKEY], trusted_checkpoint=good).ok
    split = checkpoint.sign(ORIGIN, 123, b"\x01" * 32, LOG_SKEY)
    report = audit(audited, [LOG_VKEY], trusted_checkpoint=split)
    assert not report.ok and any("trusted checkpoint" in p for p in report.problems)
    # signed by the same key, but for another log (one key may sign for several origins): refused
    elsewhere = checkpoint.sign("other.example/log", 123, audited.root_hash(123), LOG_SKEY)
    report = audit(audited, [LOG_VKEY], trusted_checkpoint=elsewhere)
    assert not report.ok and any("is for the log 'other.example/log'" in p for p in report.problems)


def test_audit_with_the_wrong_key_fails(audited: Ledger) -> None:
    _, other_vkey = note.generate_key(ORIGIN)
    assert not audit(audited, [other_vkey]).ok


# -- storage failures ---------------------------------------------------------------------------------


def test_sqlite_unreachable_path_is_storage_unavailable(tmp_path: Any) -> None:
    with pytest.raises(StorageUnavailable):
        open_ledger(f"sqlite:///{tmp_path}/missing-dir/x.db", origin=ORIGIN)


def test_sqlite_locked_database_is_storage_unavailable_then_recovers(tmp_path: Any) -> None:
    from dataclasses import replace

    from bridge.stores.ledger import LEDGER_TUNING, ledger_connector
    from ledger.storage import SqliteStorage

    path = f"{tmp_path}/l.db"
    connector = ledger_connector(f"sqlite:///{path}", replace(LEDGER_TUNING, busy_timeout_ms=50))
    led = Ledger(SqliteStorage(connector, ORIGIN), origin=ORIGIN)
    led.append([make_entry(0)])
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    with pytest.raises(StorageUnavailable):
        led.append([make_entry(1)])
    blocker.execute("ROLLBACK")
    blocker.close()
    assert led.append([make_entry(1)]) == [1]
    assert led.root_hash() == merkle.root_hash(leaf_hashes(2))
    led.close()


def test_a_corrupt_sqlite_file_is_a_ledger_error_not_a_raw_sqlite_error(tmp_path: Any) -> None:
    path = tmp_path / "corrupt.db"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(LedgerError):
        open_ledger(f"sqlite:///{path}", origin=ORIGIN)


def test_append_of_non_entries_is_invalid_entry(led: Ledger) -> None:
    with pytest.raises(InvalidEntry):
        led.append([{"bundle_sha256": "x"}])  # type: ignore[list-item]


def test_bad_url_is_a_ledger_error() -> None:
    with pytest.raises(LedgerError):
        open_ledger("mysql://x", origin=ORIGIN)


def test_sqlite_entries_are_keyed_by_rowid_and_the_keys_live_in_clustered_tables(tmp_path: Any) -> None:
    # `idx INTEGER PRIMARY KEY` is the rowid; `BIGINT PRIMARY KEY` would add another B-tree per row.
    # The lookup keys are in WITHOUT ROWID tables (one B-tree each), not in indexes on the entries.
    open_ledger(f"sqlite:///{tmp_path}/l.db", origin=ORIGIN).close()
    conn = sqlite3.connect(f"{tmp_path}/l.db")
    sql = "SELECT name FROM sqlite_master WHERE tbl_name = 'ledger_entries' AND type = 'index'"
    indexes = {r[0] for r in conn.execute(sql)}
    ddl = dict(conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'table'").fetchall())
    conn.close()
    assert indexes == set()
    assert "WITHOUT ROWID" in ddl["ledger_dkeys"] and "WITHOUT ROWID" in ddl["ledger_lkeys"]


@pytest.mark.parametrize("dup_at", [None, 0, 150, 299])
def test_batch_paths_build_the_same_tree(url: str, dup_at: int | None) -> None:
    # An all-new batch takes the vectorised path; a batch with a duplicate (within the batch or of a
    # logged entry) takes the per-entry path. Both must give the same indices, rows and tree.
    with open_ledger(url, origin=ORIGIN, signer_key=LOG_SKEY) as led:
        led.append([make_entry(i) for i in range(100)])
        batch = [make_entry(i) for i in range(100, 400)]
        # a replay (other offset) of a logged entry, or of the batch entry just before it
        dup_of = None if dup_at is None else 5 if dup_at == 0 else 100 + dup_at - 1
        if dup_at is not None and dup_of is not None:
            batch.insert(dup_at, make_entry(dup_of, offset=1))
        got = led.append(batch)
        expected = list(range(100, 400))
        if dup_at is not None and dup_of is not None:
            expected.insert(dup_at, dup_of)
        assert got == expected
        assert led.size() == 400
        assert led.root_hash() == merkle.root_hash(leaf_hashes(400))
        assert led.find(make_entry(399).bundle_sha256, "org-a") == 399
        assert led.find_leaf(leaf_hashes(400)[123]) == 123
        led.checkpoint_now()
        report = audit(led, [LOG_VKEY], batch=128)
        assert report.ok, report.problems
        assert report.entries_checked == 400


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(min_size=32, max_size=32), max_size=20))
def test_property_batch_keys_equal_the_single_keys(hashes: list[bytes]) -> None:
    from ledger.storage import dedup_key, dedup_keys, leaf_key, leaf_keys

    bundles = [h.hex() for h in hashes]
    assert dedup_keys(bundles) == [dedup_key(b, "any-org") for b in bundles]
    assert leaf_keys(hashes) == [leaf_key(h) for h in hashes]
    assert all(-(2**31) <= k < 2**31 for k in dedup_keys(bundles) + leaf_keys(hashes))


def test_a_database_of_another_schema_version_is_refused(tmp_path: Any) -> None:
    url = f"sqlite:///{tmp_path}/l.db"
    open_ledger(url, origin=ORIGIN).close()
    raw_exec(url, "UPDATE ledger_meta SET schema_version = 1")
    with pytest.raises(LedgerError, match="schema version 1"):
        open_ledger(url, origin=ORIGIN)


def test_a_new_sqlite_ledger_uses_16_kb_pages_and_wal(tmp_path: Any) -> None:
    with open_ledger(f"sqlite:///{tmp_path}/l.db", origin=ORIGIN) as led:
        led.append([make_entry(i) for i in range(3)])
    conn = sqlite3.connect(f"{tmp_path}/l.db")
    assert conn.execute("PRAGMA page_size").fetchone()[0] == 16384
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_append_of_objects_that_only_look_like_entries_is_invalid_entry(led: Ledger) -> None:
    class HalfEntry:  # has canonical() but not the key fields
        def canonical(self) -> bytes:
            return make_entry(0).canonical()

    with pytest.raises(InvalidEntry):
        led.append([make_entry(1), HalfEntry()])  # type: ignore[list-item]
    assert led.size() == 0


# -- regressions ---------------------------------------------------------------------------------


def test_an_audit_of_a_live_log_covers_the_size_it_started_with(led: Ledger, url: str) -> None:
    """Entries appended while ``ledger verify`` runs are not tampering: the audit covers the first
    ``size`` entries and says that more arrived."""
    led.append([make_entry(i) for i in range(300)])
    led.checkpoint_now()
    reader = open_ledger(url, origin=ORIGIN)
    try:
        original = reader.storage.iter_entries

        def growing(start: int, batch: int) -> Iterator[Any]:
            led.append([make_entry(i) for i in range(1000, 1003)])  # after the audit read the size
            led.checkpoint_now()
            yield from original(start, batch)

        reader.storage.iter_entries = growing  # type: ignore[method-assign]
        report = audit(reader, [LOG_VKEY])
        assert report.ok, report.problems
        assert report.size == report.entries_checked == 300
        assert any("3 entries were appended" in n for n in report.notes)
    finally:
        reader.close()
    assert audit(led, [LOG_VKEY]).ok  # and tampering within the first entries is still found:
    raw_exec(url, "UPDATE ledger_entries SET leaf_hash = ? WHERE idx = 7", (b"\x00" * 32,))
    assert audit(led, [LOG_VKEY]).first_bad_index == 7


def test_a_proof_and_its_checkpoint_are_for_the_same_size(led: Ledger, url: str) -> None:
    """prove() read the latest checkpoint twice: one signed in between paired an older proof with a
    newer note, which a client then failed to verify."""
    led.append([make_entry(i) for i in range(25)])
    led.checkpoint_now()
    reader = open_ledger(url, origin=ORIGIN)
    try:
        original = reader.storage.latest_checkpoint
        calls = 0

        def racing() -> Any:
            nonlocal calls
            calls += 1
            found = original()
            if calls == 1:
                led.append([make_entry(i) for i in range(200, 213)])
                led.checkpoint_now()
            return found

        reader.storage.latest_checkpoint = racing  # type: ignore[method-assign]
        out = reader.prove(make_entry(3).bundle_sha256, "org-a")
    finally:
        reader.close()
    assert out is not None
    cp = checkpoint.open(out["checkpoint"], [LOG_VKEY])
    assert cp.size == out["size"] == 25
    proof = [base64.b64decode(h) for h in out["proof"]]
    merkle.verify_inclusion(base64.b64decode(out["leaf_hash"]), out["index"], cp.size, proof, cp.root_hash)
