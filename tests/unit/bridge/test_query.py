"""The query service over a real index store (no Kafka): filters, paging, de-duplication, errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from bridge.config import Settings
from bridge.index.store import IncomingBundle, IndexStore
from bridge.query import in_range
from bridge.service import Backend, create_app


def _bundle(sha: str, org: str, resources: list[dict[str, Any]], ts: str) -> IncomingBundle:
    return IncomingBundle({"resourceType": "Bundle", "entry": [{"resource": r} for r in resources]}, sha, org, f"{org}|1", "t", 0, 0, ts)


def _glucose(oid: str, pid: str, when: str, value: float) -> dict[str, Any]:
    return {
        "resourceType": "Observation", "id": oid, "status": "final", "subject": {"reference": f"Patient/{pid}"},
        "code": {"coding": [{"system": "http://loinc.org", "code": "2345-7"}]}, "effectiveDateTime": when,
        "valueQuantity": {"value": value, "unit": "mg/dL", "system": "http://unitsofmeasure.org", "code": "mg/dL"},
    }


@pytest.fixture(params=["sqlite", "postgres"])
async def client(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    env = {"FHIRBRIDGE_DATA_DIR": str(tmp_path)}
    if request.param == "postgres":
        env["FHIRBRIDGE_INDEX_URL"] = request.getfixturevalue("pg_dsn")
    settings = Settings.from_env(env)
    store = IndexStore.open(settings.index_url)
    ssn = {"system": "http://hl7.org/fhir/sid/us-ssn", "value": "123456789"}
    store.apply([
        _bundle("h1", "st-mary", [
            {"resourceType": "Patient", "id": "pa", "identifier": [ssn], "name": [{"family": "DOE", "given": ["JANE"]}], "birthDate": "1980-02-14"},
            _glucose("oa1", "pa", "2026-01-10T08:00:00Z", 98),
            _glucose("oa2", "pa", "2026-02-10T08:00:00Z", 110),
        ], "2026-02-11T00:00:00.000Z"),
        _bundle("h2", "riverside", [
            {"resourceType": "Patient", "id": "pb", "identifier": [ssn], "name": [{"family": "DOE", "given": ["JANE"]}], "birthDate": "1980-02-14"},
            _glucose("ob1", "pb", "2026-01-10T08:00:00Z", 98),  # the same fact as oa1
            _glucose("ob2", "pb", "2026-03-10T08:00:00Z", 120),
        ], "2026-03-11T00:00:00.000Z"),
        _bundle("h3", "lakeside", [{"resourceType": "Patient", "id": "pc", "name": [{"family": "OTHER"}]}], "2026-03-11T00:00:00.000Z"),
    ])
    store.close()
    backend = Backend(settings)  # no ledger, identifier linking only
    async with TestClient(TestServer(create_app(settings, backend))) as c:
        yield c


async def _everything(client: Any, pid: str = "pa", **params: str) -> dict[str, Any]:
    resp = await client.get(f"/Patient/{pid}/$everything", params=params)
    assert resp.status == 200, await resp.text()
    assert resp.headers["Content-Type"].startswith("application/fhir+json")
    return await resp.json()  # type: ignore[no-any-return]


def _ids(bundle: dict[str, Any]) -> list[str]:
    return [e["resource"]["id"] for e in bundle["entry"] if e["search"]["mode"] == "match"]


async def test_merges_linked_patients_and_dedupes_same_fact(client: Any) -> None:
    b = await _everything(client)
    ids = _ids(b)
    assert set(ids) == {"pa", "pb", "oa1", "oa2", "ob2"}  # ob1 merged into oa1
    merged = next(e for e in b["entry"] if e["resource"]["id"] == "oa1")
    orgs = {s["valueString"] for ext in merged["extension"] for s in ext["extension"] if s["url"] == "sourceOrg"}
    assert orgs == {"st-mary", "riverside"}
    assert b["total"] == 5


async def test_start_end_filter_on_clinical_date(client: Any) -> None:
    ids = _ids(await _everything(client, start="2026-02-01", end="2026-02-28"))
    assert set(ids) == {"pa", "pb", "oa2"}
    ids = _ids(await _everything(client, end="2026-01-10"))
    assert set(ids) == {"pa", "pb", "oa1"}


async def test_since_type_and_paging(client: Any) -> None:
    # ob1 arrived after the cutoff; oa1 (its duplicate) did not, so ob1 stands alone here
    assert set(_ids(await _everything(client, _since="2026-03-01"))) == {"pb", "ob1", "ob2"}
    only_obs = _ids(await _everything(client, _type="Observation"))
    assert set(only_obs) == {"oa1", "oa2", "ob2"}
    page1 = await _everything(client, _count="2")
    assert len(_ids(page1)) == 2 and page1["total"] == 5
    nxt = next(link["url"] for link in page1["link"] if link["relation"] == "next")
    assert "_offset=2" in nxt
    page3 = await _everything(client, _count="2", _offset="4")
    assert len(_ids(page3)) == 1
    assert not [link for link in page3["link"] if link["relation"] == "next"]


async def test_unsupported_parameter_is_reported_not_ignored(client: Any) -> None:
    b = await _everything(client, _filter="x eq 1")
    outcomes = [e["resource"] for e in b["entry"] if e["search"]["mode"] == "outcome"]
    assert outcomes and "_filter" in outcomes[0]["issue"][0]["diagnostics"]


async def test_bad_parameters_and_unknown_patient_give_operation_outcome(client: Any) -> None:
    for path, params, status in [
        ("/Patient/pa/$everything", {"start": "yesterday"}, 400),
        ("/Patient/pa/$everything", {"_count": "0"}, 400),
        ("/Patient/nope/$everything", {}, 404),
        ("/Patient", {}, 400),
        ("/NoSuchThing/x", {}, 404),
    ]:
        resp = await client.get(path, params=params)
        assert resp.status == status, path
        body = await resp.json()
        assert body["resourceType"] == "OperationOutcome"


async def test_patient_search(client: Any) -> None:
    resp = await client.get("/Patient", params={"identifier": "http://hl7.org/fhir/sid/us-ssn|123456789"})
    assert {e["resource"]["id"] for e in (await resp.json())["entry"]} == {"pa", "pb"}
    resp = await client.get("/Patient", params={"name": "other"})
    assert [e["resource"]["id"] for e in (await resp.json())["entry"]] == ["pc"]
    resp = await client.get("/Patient", params={"name": "doe", "birthdate": "1980"})
    assert {e["resource"]["id"] for e in (await resp.json())["entry"]} == {"pa", "pb"}


async def test_metadata_and_openapi(client: Any) -> None:
    cs = await (await client.get("/metadata")).json()
    assert cs["resourceType"] == "CapabilityStatement" and cs["fhirVersion"] == "4.0.1"
    spec = await (await client.get("/openapi.json")).json()
    assert "/Patient/{id}/$everything" in spec["paths"]


@pytest.mark.parametrize(
    ("clinical", "start", "end", "expected"),
    [
        ("2026-01-10T08:00:00Z", "2026-01-10", None, True),
        ("2026-01-10T08:00:00Z", None, "2026-01-10", True),
        ("2026-01-10", "2026-01-10T09:00:00Z", None, True),
        ("2026-01-09", "2026-01-10", None, False),
        ("2026-01-11", None, "2026-01-10", False),
        (None, "2026-01-01", None, False),
        (None, None, None, True),
        ("2026-01-10T23:30:00-06:00", "2026-01-11", "2026-01-11", True),  # 05:30 UTC on the 11th
        ("2026-01", "2026-01-31", None, True),
        ("2025", "2026-01-01", None, False),
    ],
)
def test_in_range(clinical: str | None, start: str | None, end: str | None, expected: bool) -> None:
    assert in_range(clinical, start, end) is expected
