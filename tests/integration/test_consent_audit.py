"""Consent through the real pipeline and API, and the access audit's log end to end (issue 22).

Two hospitals send the same person over a real broker (st-mary's A and riverside's A', linked by the
MPI from the index consumer). riverside's registrar writes a Consent through ``PUT /Consent`` (published,
logged by the ledger consumer, applied at once); a st-mary clinician's ``$everything`` then holds only
st-mary's entries; revoking it takes effect on the next request. The audit log appender logs every
access; ``fhirbridge audit verify`` passes, then fails at the event whose row was deleted.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from adapters.ids import business_key, resource_id
from bridge.config import Settings
from bridge.service.app import create_app
from bridge.stores.index.store import IndexStore
from bridge.stores.mpi import PersonIndex
from tests.support.auth import bearer
from tests.support.consent import deny_organization

from .pipeline import Stack, make_stack

SSN = "http://hl7.org/fhir/sid/us-ssn"
SERVICE_ORG = "local"  # FHIRBRIDGE_AUTH_ORGANIZATION's default: the API's own writes


def _patient(street: str) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "id": "p1",
        "identifier": [{"system": SSN, "value": "123456789"}],
        "name": [{"family": "Andersen", "given": ["Alice"]}],
        "birthDate": "1980-04-12",
        "gender": "female",
        "address": [{"line": [street], "city": "Metro", "postalCode": "12345"}],
    }


def _record(street: str, code: str) -> bytes:
    obs = {
        "resourceType": "Observation",
        "id": "o1",
        "status": "final",
        "subject": {"reference": "Patient/p1"},
        "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
        "effectiveDateTime": "2026-01-10T08:00:00Z",
    }
    bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"resource": _patient(street)}, {"resource": obs}],
    }
    return orjson.dumps(bundle)


def _id(org: str, rtype: str, source_id: str) -> str:
    return resource_id(org, rtype, business_key("fhir", source_id))


def _consent(status: str, patient: str) -> dict[str, Any]:
    return deny_organization("riverside-deny-st-mary", patient, "st-mary", status)


@pytest.fixture
def stack(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Stack:
    return make_stack(settings, monkeypatch, ["st-mary", "riverside", SERVICE_ORG])


@pytest.fixture
async def client(stack: Stack, tmp_path: Path) -> AsyncIterator[TestClient]:
    for org, street, code in (("st-mary", "12 Elm Street", "2345-7"), ("riverside", "12 Elm St", "8480-6")):
        path = tmp_path / f"{org}.json"
        path.write_bytes(_record(street, code))
        assert stack.cli("ingest", "--adapter", "fhir", "--source", org, "--no-progress", str(path)) == 0
    index = IndexStore.open(stack.settings.stores.index_url)
    stack.drain("index", "t-index", lambda rt: index.counts()["bundles"] >= 2)
    index.close()
    mpi = PersonIndex.open(stack.settings.stores.mpi_url)
    assert sorted(mpi.linked_patient_ids(_id("st-mary", "Patient", "p1"))) == sorted(
        [_id("st-mary", "Patient", "p1"), _id("riverside", "Patient", "p1")]
    )
    mpi.close()
    async with TestClient(TestServer(create_app(stack.settings))) as c:
        yield c


def _matches(bundle: dict[str, Any]) -> set[str]:
    return {e["resource"]["id"] for e in bundle["entry"] if e["search"]["mode"] == "match"}


async def test_api_consent_is_enforced_logged_and_revoked(stack: Stack, client: TestClient) -> None:
    s = stack.settings
    a, a2 = _id("st-mary", "Patient", "p1"), _id("riverside", "Patient", "p1")
    everyone = {a, a2, _id("st-mary", "Observation", "o1"), _id("riverside", "Observation", "o1")}
    clinician = bearer(s, "user/*.rs", organization="st-mary", subject="dr-st-mary")
    registrar = bearer(s, "user/Consent.cru user/Patient.rs", organization="riverside", subject="registrar")
    r = await client.get(f"/Patient/{a}/$everything", headers=clinician)
    assert _matches(await r.json()) == everyone

    r = await client.put(
        "/Consent/riverside-deny-st-mary",
        data=orjson.dumps(_consent("active", a2)),
        headers={**registrar, "Content-Type": "application/fhir+json"},
    )
    assert r.status == 201, await r.text()
    # the very next request is decided under it
    r = await client.get(f"/Patient/{a}/$everything", headers=clinician)
    bundle = await r.json()
    assert _matches(bundle) == {a, _id("st-mary", "Observation", "o1")} and bundle["total"] == 2
    assert any(
        e["resource"]["issue"][0]["code"] == "suppressed"
        for e in bundle["entry"]
        if e["search"]["mode"] == "outcome"
    )
    # a patient may not write a Consent for someone else; an invalid Consent is located
    other = bearer(s, "patient/Consent.cu", patient="nobody")
    r = await client.put(
        "/Consent/x1",
        data=orjson.dumps({**_consent("active", a2), "id": "x1"}),
        headers={**other, "Content-Type": "application/fhir+json"},
    )
    assert r.status in (401, 403)
    bad = {**_consent("active", a2), "status": 7}
    r = await client.put(
        "/Consent/riverside-deny-st-mary",
        data=orjson.dumps(bad),
        headers={**registrar, "Content-Type": "application/fhir+json"},
    )
    assert r.status == 422 and "Consent.status" in (await r.json())["issue"][0]["diagnostics"]

    # revoked: the next request sees everything again; both versions are kept, each logged
    r = await client.put(
        "/Consent/riverside-deny-st-mary",
        data=orjson.dumps(_consent("inactive", a2)),
        headers={**registrar, "Content-Type": "application/fhir+json"},
    )
    assert r.status == 200
    r = await client.get(f"/Patient/{a}/$everything", headers=clinician)
    assert _matches(await r.json()) == everyone
    ledger = stack.open_ledger()
    stack.drain("ledger", "t-ledger", lambda rt: ledger.size() >= 4)  # 2 records + 2 Consent versions
    r = await client.get("/Consent/riverside-deny-st-mary/_history", headers=registrar)
    history = await r.json()
    assert [e["resource"]["status"] for e in history["entry"]] == ["inactive", "active"]
    provenance = [{x["url"]: x for x in e["extension"][0]["extension"]} for e in history["entry"]]
    assert all(p["sourceOrg"]["valueString"] == SERVICE_ORG and "ledgerIndex" in p for p in provenance)
    for p in provenance:
        entry = ledger.entry(p["ledgerIndex"]["valueInteger"])
        assert entry.bundle_sha256 == p["bundleSha256"]["valueString"]
    ledger.close()


async def test_audit_verify_names_the_first_deleted_event(
    stack: Stack, client: TestClient, capsys: pytest.CaptureFixture[str]
) -> None:
    s = stack.settings
    a = _id("st-mary", "Patient", "p1")
    clinician = bearer(s, "user/*.rs", organization="st-mary")
    for _ in range(3):
        assert (await client.get(f"/Patient/{a}/$everything", headers=clinician)).status == 200
    assert stack.cli("audit", "keygen") == 0
    assert stack.cli("audit", "run", "--exit-when-idle", "0.3") == 0
    capsys.readouterr()
    assert stack.cli("audit", "verify") == 0
    assert s.audit.url.startswith("sqlite://")
    db = sqlite3.connect(s.audit.url.removeprefix("sqlite://"))
    seq, event_id = db.execute("SELECT seq, id FROM audit_events ORDER BY seq LIMIT 1 OFFSET 2").fetchone()
    db.execute("DELETE FROM audit_events WHERE seq = ?", (seq,))
    db.commit()
    db.close()
    capsys.readouterr()
    assert stack.cli("audit", "verify") == 1
    out = capsys.readouterr()
    assert event_id in out.out + out.err or str(seq) in out.out + out.err
