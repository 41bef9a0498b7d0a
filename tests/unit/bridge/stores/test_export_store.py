"""The export store (jobs, files, groups) and its read-only paging of the index, on SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.stores.exports import (
    CANCELLED,
    COMPLETE,
    FAILED,
    FHIR_ID,
    RUNNING,
    ExportError,
    ExportFile,
    ExportStore,
    consenting_patients,
    organization_group_id,
    organization_patients,
    organizations,
    patient_resources,
    resource_page,
    resource_types,
)
from bridge.stores.index.store import IncomingBundle, IndexStore


@pytest.fixture(params=["sqlite", "postgres"])
def index_env(request: pytest.FixtureRequest) -> dict[str, str]:
    """One database URL per backend (both stores share it on PostgreSQL: their tables do not overlap)."""
    return {"FHIRBRIDGE_INDEX_URL": request.getfixturevalue("pg_dsn")} if request.param == "postgres" else {}


@pytest.fixture
def store(tmp_path: Path, index_env: dict[str, str]) -> Iterator[ExportStore]:
    url = index_env.get("FHIRBRIDGE_INDEX_URL") or f"sqlite:///{tmp_path / 'exports.db'}"
    s = ExportStore.open(url)
    yield s
    s.close()


@pytest.fixture
def index(tmp_path: Path, index_env: dict[str, str]) -> Iterator[IndexStore]:
    url = index_env.get("FHIRBRIDGE_INDEX_URL") or f"sqlite:///{tmp_path / 'index.db'}"
    idx = IndexStore.open(url)
    resources: list[dict[str, Any]] = [{"resourceType": "Patient", "id": f"p{i:02d}"} for i in range(7)]
    resources += [
        {
            "resourceType": "Observation",
            "id": f"o{i:02d}",
            "status": "final",
            "subject": {"reference": f"Patient/p{i % 3:02d}"},
        }
        for i in range(9)
    ]
    resources += [{"resourceType": "Organization", "id": "org1"}]
    resources += [
        {"resourceType": "Consent", "id": "c1", "patient": {"reference": "Patient/p01"}, "status": "active"}
    ]
    for k, (org, chunk) in enumerate((("st-mary", resources[:10]), ("riverside", resources[10:]))):
        at = f"2026-01-1{k}T00:00:00.000Z"
        idx.apply(
            [
                IncomingBundle(
                    {"resourceType": "Bundle", "timestamp": at, "entry": [{"resource": r} for r in chunk]},
                    hashlib.sha256(org.encode()).hexdigest(),
                    org,
                    None,
                    "t",
                    0,
                    k,
                    at,
                )
            ]
        )
    yield idx
    idx.close()


def _job(store: ExportStore, job_id: str = "a" * 32, expires: int = 1000) -> None:
    store.create_job(
        job_id,
        owner="iss|c",
        kind="system",
        group_id=None,
        request="GET /$export",
        params={"types": None},
        now=1,
        expires_at=expires,
    )


def _file(job_id: str, name: str, seq: int) -> ExportFile:
    return ExportFile(job_id, name, "output", "Patient", seq, 2, 10, "00" * 32, {"p1": 1, "p2": 1})


def test_job_lifecycle(store: ExportStore) -> None:
    _job(store)
    job = store.job("a" * 32)
    assert (
        job is not None
        and job.status == RUNNING
        and job.params == {"types": None}
        and job.progress == "queued"
    )
    assert not store.create_job(
        "b" * 32,
        owner="o",
        kind="system",
        group_id=None,
        request="r",
        params={},
        now=1,
        expires_at=9,
        max_running=1,
    )  # one runs already
    assert store.job("b" * 32) is None
    assert store.create_job(
        "c" * 32,
        owner="o",
        kind="system",
        group_id=None,
        request="r",
        params={},
        now=1,
        expires_at=9,
        max_running=2,
    )
    store.delete_job("c" * 32)
    store.db.execute("UPDATE export_jobs SET tree_size = 3, checkpoint = 'note' WHERE id = ?", [job.id])
    assert store.set_progress(job.id, "half")
    assert store.add_file(_file(job.id, "Patient-1.ndjson", 1))
    assert store.finish(job.id, COMPLETE, expires_at=2000, transaction_time="2026-01-01T00:00:00.000Z")
    job = store.job(job.id)
    assert job is not None and (job.status, job.tree_size, job.checkpoint, job.expires_at) == (
        COMPLETE,
        3,
        "note",
        2000,
    )
    assert not store.set_progress(job.id, "late")  # no longer running
    assert not store.add_file(_file(job.id, "Patient-2.ndjson", 2))  # a late file is not kept
    assert not store.finish(job.id, FAILED, expires_at=1)
    files = store.files(job.id)
    assert [f.name for f in files] == ["Patient-1.ndjson"] and files[0].patients == {}
    assert store.file(job.id, "Patient-1.ndjson").patients == {"p1": 1, "p2": 1}  # type: ignore[union-attr]
    assert store.file(job.id, "nope") is None
    with pytest.raises(ValueError, match="complete or failed"):
        store.finish(job.id, RUNNING, expires_at=1)


def test_expiry_interruption_and_deletion(store: ExportStore) -> None:
    _job(store, "a" * 32, expires=100)
    _job(store, "b" * 32, expires=10_000)
    assert store.expired(now=500) == ["a" * 32]
    assert store.fail_interrupted("restart", before=1) == []  # created at 1: not before it
    assert store.fail_interrupted("restart", before=2) == ["a" * 32, "b" * 32]
    assert {j.status for j in store.jobs()} == {FAILED}
    store.add_file(_file("a" * 32, "x.ndjson", 1))
    store.delete_job("a" * 32)
    assert store.job("a" * 32) is None and store.files("a" * 32) == []
    assert store.cancel("b" * 32) and not store.cancel("c" * 32)
    job = store.job("b" * 32)
    assert job is not None and job.status == CANCELLED and not store.set_progress(job.id, "x")


def test_groups(store: ExportStore) -> None:
    g = store.create_group("cohort-1", "Cohort", ["Patient/p2", "p1", "p1"], now=5)
    assert g.members == ("p1", "p2")
    assert store.group("cohort-1") == g and [x.id for x in store.groups()] == ["cohort-1"]
    for bad in ("org-x", "bad id", "", "x" * 65):
        with pytest.raises(ExportError):
            store.create_group(bad, "n", [], now=0)
    with pytest.raises(ExportError, match="exists"):
        store.create_group("cohort-1", "again", [], now=0)
    with pytest.raises(ExportError, match="member"):
        store.create_group("cohort-2", "n", ["not a/id"], now=0)
    assert store.group("cohort-2") is None  # nothing kept of a refused group
    assert store.delete_group("cohort-1") and not store.delete_group("cohort-1")
    assert store.group("cohort-1") is None


def test_index_pages_by_type_and_id(index: IndexStore) -> None:
    db = index.db
    assert resource_types(db) == ["Consent", "Observation", "Organization", "Patient"]
    seen, after = [], ""
    while True:
        page = resource_page(db, "Observation", after, limit=4)
        seen += [r.id for r in page]
        if len(page) < 4:
            break
        after = page[-1].id
    assert seen == [f"o{i:02d}" for i in range(9)]
    first = resource_page(db, "Observation", "", limit=1)[0]
    assert first.body.startswith(b"{") and first.patient_id == "p00"
    # since: the riverside bundle (2026-01-11) holds o03..o08
    assert [
        r.id for r in resource_page(db, "Observation", "", since="2026-01-11T00:00:00.000Z", limit=100)
    ] == [f"o{i:02d}" for i in range(3, 9)]
    assert [r.id for r in resource_page(db, "Organization", "", compartment_only=True, limit=10)] == []
    assert [r.id for r in patient_resources(db, "Observation", ["p01", "p02"])] == [
        "o01",
        "o02",
        "o04",
        "o05",
        "o07",
        "o08",
    ]
    assert patient_resources(db, "Observation", []) == []
    assert organizations(db) == {"st-mary": 7}
    assert organization_patients(db, "st-mary") == [f"p{i:02d}" for i in range(7)]
    assert consenting_patients(db) == ["p01"]


@given(st.text(min_size=1, max_size=80), st.text(min_size=1, max_size=80))
def test_organization_group_ids_are_fhir_ids_and_distinct(a: str, b: str) -> None:
    for org in (a, b):
        gid = organization_group_id(org)
        assert gid.startswith("org-") and FHIR_ID.fullmatch(gid)
    assert (organization_group_id(a) == organization_group_id(b)) == (a == b)


def test_organization_group_ids_read_as_the_organisation_when_they_can() -> None:
    assert organization_group_id("st-mary") == "org-st-mary"
    assert (
        organization_group_id("x-ray").startswith("org-x-") and organization_group_id("x-ray") != "org-x-ray"
    )
    assert organization_group_id("a" * 61) != organization_group_id("a" * 62)
