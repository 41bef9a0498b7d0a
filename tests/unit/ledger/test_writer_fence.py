"""The writer epoch: once another handle claims the log, the previous writer appends nothing more."""

from __future__ import annotations

import hashlib

import pytest

from bridge.stores.ledger import open_ledger
from ledger import note
from ledger.errors import WriterFenced
from ledger.log import LedgerEntry

ORIGIN = "fhirbridge.test/fence"
SKEY, _ = note.generate_key(ORIGIN)


def entry(i: int) -> LedgerEntry:
    return LedgerEntry(
        hashlib.sha256(b"%d" % i).hexdigest(),
        "org",
        "fhir",
        "1",
        "fhir.bundles",
        0,
        i,
        "2026-01-01T00:00:00Z",
    )


def test_a_new_writer_fences_the_old_one_out_of_appends_and_checkpoints(url: str) -> None:
    old = open_ledger(url, origin=ORIGIN, signer_key=SKEY, checkpoint_every=1000, checkpoint_interval_ms=0)
    new = open_ledger(url, origin=ORIGIN, signer_key=SKEY, checkpoint_every=1000, checkpoint_interval_ms=0)
    try:
        assert old.writer() is None
        assert old.claim_writer("a:1") == 1
        assert old.append([entry(0), entry(1)]) == [0, 1]
        assert new.claim_writer("b:2") == 2
        assert new.writer()[:2] == (2, "b:2")  # type: ignore[index]
        with pytest.raises(WriterFenced, match="writer epoch 2, ours 1") as caught:
            old.append([entry(2)])
        assert (caught.value.ours, caught.value.current) == (1, 2)
        assert new.size() == 2, "the refused append wrote nothing"
        new.checkpoint_interval_ms = 3_600_000  # leave size 3 unsigned
        assert new.append([entry(2), entry(1)]) == [2, 1]  # the new writer goes on, deduplicating
        with pytest.raises(WriterFenced):
            old.maybe_checkpoint()  # nor does the old one sign what the new one appended
        assert new.checkpoint_at(3) is None
    finally:
        old.close()
        new.close()


def test_handles_that_never_claim_are_not_fenced(url: str) -> None:
    """Replay and other one-off tools append beside the writer (the database serialises them)."""
    writer = open_ledger(url, origin=ORIGIN)
    tool = open_ledger(url, origin=ORIGIN)
    try:
        writer.claim_writer("w")
        assert tool.append([entry(0)]) == [0]
        assert writer.append([entry(1)]) == [1]
    finally:
        writer.close()
        tool.close()


def test_a_reset_keeps_the_writer_epoch(url: str) -> None:
    led = open_ledger(url, origin=ORIGIN)
    try:
        led.claim_writer("w")
        led.append([entry(0)])
        led.reset()
        assert led.writer()[0] == 1  # type: ignore[index]
        assert led.append([entry(0)]) == [0]
    finally:
        led.close()
