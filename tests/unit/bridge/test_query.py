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


# -- found by review (2026-12-03) ----------------------------------------------------------------


async def test_since_compares_instants_not_strings(client: Any) -> None:
    """``_since`` is an instant: the stored ``lastUpdated`` (``...00.000Z``) at exactly that instant is
    included, and an offset is honoured (a string comparison got both wrong)."""
    later = {"pb", "ob1", "ob2", "pc"}  # received at 2026-03-11T00:00:00.000Z
    assert set(_ids(await _everything(client, _since="2026-03-11T00:00:00Z"))) == later - {"pc"}
    assert set(_ids(await _everything(client, _since="2026-03-11T05:00:00+05:00"))) == later - {"pc"}
    assert set(_ids(await _everything(client, _since="2026-03-10T20:00:00-05:00"))) == set()  # 01:00 UTC


async def test_repeated_parameters_are_refused_and_links_repeat_the_query(client: Any) -> None:
    resp = await client.get("/Patient/pa/$everything?_type=Encounter&_type=Patient")
    assert resp.status == 400 and "_type is given 2 times" in (await resp.json())["issue"][0]["diagnostics"]
    page = await _everything(client, _type="Observation", _count="1", foo="1")
    nxt = next(link["url"] for link in page["link"] if link["relation"] == "next")
    assert "_type=Observation" in nxt and "foo=1" in nxt and "_offset=1" in nxt


async def test_format_proof_and_type_values_are_checked(client: Any) -> None:
    assert (await client.get("/Patient/pa/$everything", params={"_format": "xml"})).status == 400
    assert (await client.get("/Patient", params={"name": "doe", "_format": "xml"})).status == 400
    assert _ids(await _everything(client, _format="application/fhir+json"))
    assert (await client.get("/Patient/pa/$everything", params={"_proof": "yes"})).status == 400
    b = await _everything(client, _proof="true")  # this service has no ledger: said, not silently skipped
    outcomes = [e["resource"]["issue"][0]["diagnostics"] for e in b["entry"] if e["search"]["mode"] == "outcome"]
    assert any("no ledger is configured" in d for d in outcomes)
    b = await _everything(client, _type="Observation,Foo")
    outcomes = [e["resource"]["issue"][0]["diagnostics"] for e in b["entry"] if e["search"]["mode"] == "outcome"]
    assert any("'Foo'" in d for d in outcomes) and set(_ids(b)) == {"oa1", "oa2", "ob2"}


def _store_with(tmp_path: Path, bundles: list[IncomingBundle], **env: str) -> Settings:
    settings = Settings.from_env({"FHIRBRIDGE_DATA_DIR": str(tmp_path), **env})
    store = IndexStore.open(settings.index_url)
    store.apply(bundles)
    store.close()
    return settings


@pytest.mark.parametrize("by_key_max", [64, 0])
async def test_provenance_does_not_depend_on_the_page_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, by_key_max: int
) -> None:
    """A resource delivered first under another subject keeps both deliveries as its sources, on a
    small page and on a large one (whose provenance is found by patient, and by key for moved ones)."""
    import bridge.index.store as index_store

    monkeypatch.setattr(index_store, "SOURCES_BY_KEY_MAX", by_key_max)
    x = _glucose("x", "pc", "2026-01-05T08:00:00Z", 70)
    settings = _store_with(tmp_path, [
        _bundle("h4", "st-mary", [{"resourceType": "Patient", "id": "pa"}, {"resourceType": "Patient", "id": "pc"}, x],
                "2026-01-06T00:00:00.000Z"),
        _bundle("h5", "riverside", [{**x, "subject": {"reference": "Patient/pa"}}], "2026-01-07T00:00:00.000Z"),
        _bundle("h6", "riverside", [_glucose(f"y{i}", "pa", f"2026-02-{i % 28 + 1:02d}T{i // 28:02d}:00:00Z", 80 + i)
                                    for i in range(60)],  # a page of over 50 entries took another path
                "2026-02-28T00:00:00.000Z"),
    ])
    async with TestClient(TestServer(create_app(settings, Backend(settings)))) as c:
        for count in ("5", "100"):
            b = await _everything(c, _count=count)
            entry = next(e for e in b["entry"] if e["resource"]["id"] == "x")
            shas = {s["valueString"] for ext in entry["extension"] for s in ext["extension"] if s["url"] == "bundleSha256"}
            assert shas == {"h4", "h5"}, count


async def test_name_search_folds_non_ascii_and_is_not_cut_short(tmp_path: Path) -> None:
    patients = [{"resourceType": "Patient", "id": f"p{i:03d}", "name": [{"family": "Doe", "given": ["Jane"]}],
                 "address": [{"line": ["1 Élodie Martin Street"]}]} for i in range(230)]
    patients.append({"resourceType": "Patient", "id": "p999", "name": [{"family": "Martin", "given": ["Élodie"]}]})
    settings = _store_with(tmp_path, [_bundle("h7", "st-mary", patients, "2026-01-01T00:00:00.000Z")])
    async with TestClient(TestServer(create_app(settings, Backend(settings)))) as c:
        # 231 bodies mention each name; only the last by id has it as a name (the first 200 do not)
        for needle, expected in (("élodie", ["p999"]), ("ÉLODIE", ["p999"]), ("martin", ["p999"]), ("elodie", [])):
            resp = await c.get("/Patient", params={"name": needle})
            ids = [e["resource"]["id"] for e in (await resp.json())["entry"] if e["search"]["mode"] == "match"]
            assert ids == expected, needle
