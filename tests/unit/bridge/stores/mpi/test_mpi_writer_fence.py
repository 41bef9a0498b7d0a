"""The MPI's writer epoch (``mpi_writer``): a linker that claimed it writes; once another claims, every
write transaction of the first is refused and rolled back (docs/mpi.md, "The linker as its own process")."""

from __future__ import annotations

from pathlib import Path

import pytest
from mpi_helpers import patient

from bridge.stores.mpi import PersonIndex
from bridge.stores.mpi.config import MpiWriterFenced


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite://{tmp_path / 'mpi.db'}"


def _alice(pid: str, org: str = "org-a") -> tuple[str, dict]:  # type: ignore[type-arg]
    return org, patient(pid, "alice", "smith", "1980-01-02", "female", postal="12345", ssn="123-45-6789")


def test_epochs_grow_and_a_fenced_writer_writes_nothing(url: str) -> None:
    with PersonIndex.open(url) as old, PersonIndex.open(url) as new:
        assert old.writer() is None
        assert old.claim_writer("a:1") == 1
        old.upsert_patients([_alice("p1")])
        assert new.claim_writer("b:2") == 2
        assert new.writer()[:2] == (2, "b:2")  # type: ignore[index]
        with pytest.raises(MpiWriterFenced, match="writer epoch 2, ours 1"):
            old.upsert_patients([_alice("p2", "org-b")])
        with pytest.raises(MpiWriterFenced):
            old.link("p1", "p1x", actor="x")
        with pytest.raises(MpiWriterFenced):
            old.fit()
        assert new.stats()["records"] == 1  # the fenced batch was rolled back
        new.upsert_patients([_alice("p2", "org-b")])
        assert new.linked_patient_ids("p1") == ["p1", "p2"]


def test_the_same_patient_version_twice_changes_nothing(url: str) -> None:
    with PersonIndex.open(url) as mpi:
        mpi.claim_writer("a:1")
        mpi.upsert_patients([_alice("p1"), _alice("p2", "org-b")])
        before = mpi.history("p1")
        gen = mpi.db.one("SELECT value FROM mpi_meta WHERE key = 'records_gen'")
        mpi.upsert_patients([_alice("p1"), _alice("p2", "org-b")])
        assert mpi.history("p1") == before
        assert mpi.db.one("SELECT value FROM mpi_meta WHERE key = 'records_gen'") == gen


def test_an_unfenced_connection_is_not_checked_and_reset_keeps_the_epoch(url: str) -> None:
    with PersonIndex.open(url) as linker, PersonIndex.open(url) as service:
        linker.claim_writer("a:1")
        linker.upsert_patients([_alice("p1"), _alice("p2", "org-b")])
        service.unlink("p1", "p2", actor="reviewer")  # the review API writes without a fence
        linker.upsert_patients([_alice("p3", "org-c")])
        service.reset()
        assert linker.writer()[0] == 1  # type: ignore[index]
        linker.upsert_patients([_alice("p1")])


def test_hold_writer_after_a_reconnection(url: str) -> None:
    with PersonIndex.open(url) as first:
        epoch = first.claim_writer("a:1")
    with PersonIndex.open(url) as again:
        again.hold_writer(epoch)
        again.upsert_patients([_alice("p1")])
        with PersonIndex.open(url) as other:
            other.claim_writer("b:2")
        with pytest.raises(MpiWriterFenced):
            again.upsert_patients([_alice("p2", "org-b")])
