"""FHIR search on every stored type: parameters, prefixes, modifiers, paging pinned to a snapshot,
``patient=`` over linked records, includes, summaries, and what the requester may see."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import given, settings
from hypothesis import strategies as st
from yarl import URL

from bridge.config import Settings
from bridge.service.app import create_app
from bridge.service.context import Backend
from bridge.service.fhir.query import parse_search
from bridge.service.http import FhirHTTPError
from bridge.stores.index.store import IncomingBundle, IndexStore
from tests.support.auth import bearer

LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"


def _bundle(sha: str, org: str, resources: list[dict[str, Any]], ts: str) -> IncomingBundle:
    return IncomingBundle(
        {"resourceType": "Bundle", "entry": [{"resource": r} for r in resources]},
        sha,
        org,
        f"{org}|1",
        "t",
        0,
        0,
        ts,
    )


def _obs(oid: str, pid: str, when: str, value: float, code: str = "2345-7", **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": oid,
        "status": extra.pop("status", "final"),
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                        "code": "laboratory",
                    }
                ]
            }
        ],
        "subject": {"reference": f"Patient/{pid}"},
        "code": {"coding": [{"system": LOINC, "code": code, "display": "Glucose"}], "text": "Glucose"},
        "effectiveDateTime": when,
        "valueQuantity": {"value": value, "unit": "mg/dL", "system": UCUM, "code": "mg/dL"},
        **extra,
    }


SSN = {"system": "http://hl7.org/fhir/sid/us-ssn", "value": "123456789"}
BUNDLES = [
    _bundle(
        "h1",
        "st-mary",
        [
            {
                "resourceType": "Patient",
                "id": "pa",
                "identifier": [SSN],
                "name": [{"family": "Doe", "given": ["Jane"]}],
                "gender": "female",
                "birthDate": "1980-02-14",
            },
            {
                "resourceType": "Encounter",
                "id": "ea",
                "status": "finished",
                "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
                "subject": {"reference": "Patient/pa"},
                "period": {"start": "2026-01-10T07:00:00Z", "end": "2026-01-10T09:00:00Z"},
            },
            _obs("oa1", "pa", "2026-01-10T08:00:00Z", 98, encounter={"reference": "Encounter/ea"}),
            _obs("oa2", "pa", "2026-02-10T08:00:00Z", 110),
            _obs("oa3", "pa", "2026-02-11T08:00:00Z", 5.1, code="4548-4", status="amended"),
            {
                "resourceType": "Provenance",
                "id": "prov-h1",
                "target": [
                    {"reference": "Patient/pa"},
                    {"reference": "Encounter/ea"},
                    {"reference": "Observation/oa1"},
                    {"reference": "Observation/oa2"},
                    {"reference": "Observation/oa3"},
                ],
                "recorded": "2026-02-11T00:00:00Z",
                "agent": [{"who": {"display": "st-mary"}}],
            },
        ],
        "2026-02-11T00:00:00.000Z",
    ),
    _bundle(
        "h2",
        "riverside",
        [
            {
                "resourceType": "Patient",
                "id": "pb",
                "identifier": [SSN],
                "name": [{"family": "DOE", "given": ["Jane"]}],
                "gender": "female",
            },
            _obs("ob1", "pb", "2026-01-10T08:00:00Z", 98),  # the same fact as oa1
            _obs("ob2", "pb", "2026-03-10T08:00:00Z", 120),
        ],
        "2026-03-11T00:00:00.000Z",
    ),
    _bundle(
        "h3",
        "lakeside",
        [
            {"resourceType": "Patient", "id": "pc", "name": [{"family": "Élodie-Other"}], "gender": "male"},
            _obs("oc1", "pc", "2025-12-01", 70),
        ],
        "2026-03-12T00:00:00.000Z",
    ),
]


@pytest.fixture(params=["sqlite", "postgres"])
def settings_(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    env = {"FHIRBRIDGE_DATA_DIR": str(tmp_path)}
    if request.param == "postgres":
        env["FHIRBRIDGE_INDEX_URL"] = request.getfixturevalue("pg_dsn")
    s = Settings.from_env(env)
    store = IndexStore.open(s.stores.index_url)
    store.apply(BUNDLES)
    store.close()
    return s


@pytest.fixture
async def client(settings_: Settings) -> Any:
    async with TestClient(
        TestServer(create_app(settings_, Backend(settings_))), headers=bearer(settings_)
    ) as c:
        yield c


async def _search(client: Any, path: str, **params: str) -> dict[str, Any]:
    resp = await client.get(path, params=params)
    body = await resp.json()
    assert resp.status == 200, body
    return body  # type: ignore[no-any-return]


def _ids(bundle: dict[str, Any], mode: str = "match") -> list[str]:
    return [e["resource"]["id"] for e in bundle.get("entry", []) if e["search"]["mode"] == mode]


def _outcomes(bundle: dict[str, Any]) -> list[str]:
    return [
        i["diagnostics"]
        for e in bundle.get("entry", [])
        if e["search"]["mode"] == "outcome"
        for i in e["resource"]["issue"]
    ]


def _link(bundle: dict[str, Any], relation: str) -> str | None:
    return next((URL(x["url"]).path_qs for x in bundle["link"] if x["relation"] == relation), None)


async def test_every_type_is_searchable_with_the_common_parameters(client: Any) -> None:
    b = await _search(client, "/Observation")
    assert sorted(_ids(b)) == ["oa1", "oa2", "oa3", "ob1", "ob2", "oc1"] and b["total"] == 6
    assert _ids(await _search(client, "/Observation", _id="oa2,ob2")) == ["oa2", "ob2"]
    assert sorted(_ids(await _search(client, "/Observation", _source="riverside"))) == ["ob1", "ob2"]
    assert _ids(await _search(client, "/Encounter", **{"class": "AMB"})) == ["ea"]
    assert _ids(await _search(client, "/Encounter", date="2026-01-10")) == ["ea"]
    assert _ids(await _search(client, "/Encounter", date="2026-01-11")) == []
    assert sorted(_ids(await _search(client, "/Patient", _count="10"))) == ["pa", "pb", "pc"]
    resp = await client.get("/Provenance")
    body = await resp.json()
    assert resp.status == 404
    assert "_revinclude=Provenance:target" in body["issue"][0]["diagnostics"]
    assert (await client.get("/NoSuchType")).status == 404


async def test_tokens_strings_and_modifiers(client: Any) -> None:
    everything = {"oa1", "oa2", "oa3", "ob1", "ob2", "oc1"}
    glucose = everything - {"oa3"}
    assert set(_ids(await _search(client, "/Observation", code=f"{LOINC}|2345-7"))) == glucose
    assert set(_ids(await _search(client, "/Observation", code="2345-7,4548-4"))) == everything
    assert _ids(await _search(client, "/Observation", code="|2345-7")) == []  # the codes have a system
    assert set(_ids(await _search(client, "/Observation", code=f"{LOINC}|"))) == everything
    assert _ids(await _search(client, "/Observation", **{"code:not": "2345-7"})) == ["oa3"]
    assert len(_ids(await _search(client, "/Observation", **{"code:text": "gluc"}))) == 6
    assert _ids(await _search(client, "/Observation", status="amended")) == ["oa3"]
    # string: prefix, case and accents folded; :exact; :contains
    assert sorted(_ids(await _search(client, "/Patient", family="doe"))) == ["pa", "pb"]
    assert _ids(await _search(client, "/Patient", **{"family:exact": "DOE"})) == ["pb"]
    assert _ids(await _search(client, "/Patient", family="elodie")) == ["pc"]
    assert _ids(await _search(client, "/Patient", **{"name:contains": "other"})) == ["pc"]
    assert _ids(await _search(client, "/Patient", **{"birthdate:missing": "true", "gender": "male"})) == [
        "pc"
    ]
    assert sorted(_ids(await _search(client, "/Patient", **{"birthdate:missing": "false"}))) == ["pa"]
    # repeated parameters AND, commas OR
    assert _ids(await client_get_all(client, "/Observation?code=2345-7&code=4548-4")) == []


async def client_get_all(client: Any, path: str) -> dict[str, Any]:
    resp = await client.get(path)
    assert resp.status == 200
    return await resp.json()  # type: ignore[no-any-return]


async def test_dates_and_quantities_with_prefixes(client: Any) -> None:
    def ids(b: dict[str, Any]) -> set[str]:
        return set(_ids(b))

    assert ids(await _search(client, "/Observation", date="ge2026-02")) == {"oa2", "oa3", "ob2"}
    assert ids(await _search(client, "/Observation", date="lt2026-01-10")) == {"oc1"}
    assert ids(await _search(client, "/Observation", date="2026-01")) == {"oa1", "ob1"}
    assert ids(await _search(client, "/Observation", date="sa2026-02-10")) == {"oa3", "ob2"}
    assert ids(await _search(client, "/Observation", date="eb2026-01-10T08:00:00Z")) == {"oc1"}
    assert ids(await client_get_all(client, "/Observation?date=ge2026-01-01&date=lt2026-02-01")) == {
        "oa1",
        "ob1",
    }
    assert ids(await _search(client, "/Observation", **{"value-quantity": "gt100"})) == {"oa2", "ob2"}
    assert ids(await _search(client, "/Observation", **{"value-quantity": f"98|{UCUM}|mg/dL"})) == {
        "oa1",
        "ob1",
    }
    assert ids(await _search(client, "/Observation", **{"value-quantity": "98||mmol/L"})) == set()
    assert ids(await _search(client, "/Observation", **{"value-quantity": "ap100"})) == {"oa1", "oa2", "ob1"}
    assert ids(await _search(client, "/Observation", **{"value-quantity": "le5.1"})) == {"oa3"}
    # the precision of the value given sets the range: 5 is [4.5, 5.5), 5.10 is [5.095, 5.105)
    assert ids(await _search(client, "/Observation", **{"value-quantity": "5"})) == {"oa3"}
    assert ids(await _search(client, "/Observation", **{"value-quantity": "5.10"})) == {"oa3"}
    assert ids(await _search(client, "/Observation", **{"value-quantity": "5.2"})) == set()


async def test_patient_search_covers_the_linked_records_and_merges_copies(client: Any) -> None:
    b = await _search(client, "/Observation", patient="pa", _sort="-date")
    # pa and pb share an SSN (linked without an MPI, as for $everything); oa1 and ob1 are one fact
    assert _ids(b) == ["ob2", "oa3", "oa2", "oa1"] and b["total"] == 4
    assert _ids(await _search(client, "/Observation", subject="Patient/pb", _sort="date", code="2345-7")) == [
        "oa1",
        "oa2",
        "ob2",
    ]
    assert _ids(await _search(client, "/Observation", patient="pc")) == ["oc1"]
    assert _ids(await _search(client, "/Observation", **{"subject:Patient": "pc"})) == ["oc1"]
    assert _ids(await _search(client, "/Observation", encounter="Encounter/ea")) == ["oa1"]


async def test_paging_is_pinned_to_the_first_page_snapshot(client: Any, settings_: Settings) -> None:
    first = await _search(client, "/Observation", _count="2", _sort="-date")
    store = IndexStore.open(settings_.stores.index_url)  # data arriving while the client pages
    store.apply(
        [
            _bundle(
                "h9",
                "lakeside",
                [_obs("new-1", "pc", "2026-12-01T00:00:00Z", 80), _obs("new-2", "pc", "2020-01-01", 81)],
                "2026-12-01T00:00:00.000Z",
            )
        ]
    )
    store.close()
    seen, page = _ids(first), first
    while (nxt := _link(page, "next")) is not None:
        page = await client_get_all(client, nxt)
        assert page["link"][0]["url"].startswith("http")  # absolute links
        seen += _ids(page)
    assert seen == ["ob2", "oa3", "oa2", "oa1", "ob1", "oc1"] or seen == [
        "ob2",
        "oa3",
        "oa2",
        "ob1",
        "oa1",
        "oc1",
    ]
    assert len(set(seen)) == 6  # nothing repeated, nothing stored after the first page
    prev = _link(page, "previous")
    assert prev is not None
    back = await client_get_all(client, prev)
    assert _ids(back) == seen[2:4]
    # a new search sees the new data
    assert "new-1" in _ids(await _search(client, "/Observation", _count="10", _sort="-date"))
    assert (await client.get("/Observation?_cursor=garbage")).status == 400


async def test_include_revinclude_elements_summary_and_total(client: Any) -> None:
    b = await _search(client, "/Observation", _id="oa1", _include="Observation:patient")
    assert _ids(b) == ["oa1"] and _ids(b, "include") == ["pa"]
    b = await _search(client, "/Observation", _id="oa1", _include="Observation:encounter")
    assert _ids(b, "include") == ["ea"]
    b = await _search(client, "/Observation", _id="oa1", _revinclude="Provenance:target")
    (prov,) = [e["resource"] for e in b["entry"] if e["search"]["mode"] == "include"]
    # only the targets on the page: the bundle's other resources are not disclosed by the Provenance
    assert prov["target"] == [{"reference": "Observation/oa1"}]
    assert any(s["code"] == "REDACTED" for s in prov["meta"]["security"])
    b = await _search(client, "/Patient", _id="pa", _revinclude="Observation:patient")
    assert set(_ids(b, "include")) == {"oa1", "oa2", "oa3"}
    b = await _search(client, "/Observation", _id="oa1", _elements="code,value[x]")
    (r,) = [e["resource"] for e in b["entry"]]
    assert set(r) == {"resourceType", "id", "meta", "status", "code", "valueQuantity"}
    assert any(t["code"] == "SUBSETTED" for t in r["meta"]["tag"])
    b = await _search(client, "/Observation", _summary="count", code="2345-7")
    assert b["total"] == 5 and "entry" not in b
    assert "total" not in await _search(client, "/Observation", _total="none")
    b = await _search(client, "/Observation", _id="oa1", _summary="true")
    assert "valueQuantity" in b["entry"][0]["resource"] and "category" not in b["entry"][0]["resource"]


async def test_unknown_and_bad_parameters(client: Any) -> None:
    b = await _search(client, "/Observation", foo="1", **{"subject.name": "x"})
    assert any("'foo' is not supported" in d for d in _outcomes(b)) and len(_ids(b)) == 6
    resp = await client.get("/Observation?foo=1", headers={"Prefer": "handling=strict"})
    assert resp.status == 400 and "foo" in (await resp.json())["issue"][0]["diagnostics"]
    for params, name in [
        ({"date": "yesterday"}, "date"),
        ({"value-quantity": "lots"}, "value-quantity"),
        ({"code:below": "x"}, "code:below"),
        ({"_sort": "nope"}, "_sort"),
        ({"_count": "-1"}, "_count"),
        ({"_include": "Patient:organization"}, "_include"),
        ({"code": "a|b|c"}, "code"),
        ({"code": "x\x00"}, "code"),
        ({"status:missing": "maybe"}, "status:missing"),
    ]:
        resp = await client.get("/Observation", params=params)
        body = await resp.json()
        assert resp.status == 400, params
        assert (
            body["resourceType"] == "OperationOutcome"
            and f"parameter {name}" in body["issue"][0]["diagnostics"]
        )


async def test_post_search_is_the_same_search(client: Any) -> None:
    resp = await client.post(
        "/Observation/_search",
        data="patient=pc",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    body = await resp.json()
    assert resp.status == 200 and _ids(body) == ["oc1"]
    assert "patient=pc" in body["link"][0]["url"]


async def test_a_patient_token_sees_its_compartment_only(settings_: Settings) -> None:
    app = create_app(settings_, Backend(settings_))
    async with TestClient(TestServer(app), headers=bearer(settings_, "patient/*.rs", patient="pc")) as c:
        assert _ids(await _search(c, "/Observation")) == ["oc1"]
        assert _ids(await _search(c, "/Patient")) == ["pc"]
        assert _ids(await _search(c, "/Observation", patient="pa")) == []
    async with TestClient(
        TestServer(create_app(settings_, Backend(settings_))), headers=bearer(settings_, "user/Patient.rs")
    ) as c:
        assert (await c.get("/Observation")).status == 403


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(
                [
                    "code",
                    "date",
                    "value-quantity",
                    "patient",
                    "subject:Patient",
                    "_sort",
                    "_count",
                    "status:not",
                    "family:exact",
                    "_include",
                    "_elements",
                    "x",
                    "name:missing",
                    "identifier:of-type",
                    "_summary",
                    "_total",
                ]
            ),
            st.text(max_size=20),
        ),
        max_size=4,
    ),
    st.sampled_from(["Observation", "Patient", "Encounter"]),
)
def test_any_query_parses_or_gets_a_located_error(params: list[tuple[str, str]], rtype: str) -> None:
    try:
        q = parse_search(rtype, params)
    except FhirHTTPError as exc:
        assert exc.status in (400, 404)
        return
    resource = {
        "resourceType": rtype,
        "id": "x",
        "code": {"coding": [{"code": "1"}]},
        "name": [{"family": "a"}],
    }
    assert isinstance(q.matches(resource), bool)


async def test_reads_carry_versions_and_history_keeps_them(client: Any, settings_: Settings) -> None:
    resp = await client.get("/Observation/oa2")
    etag, modified = resp.headers["ETag"], resp.headers["Last-Modified"]
    first = await resp.json()
    assert etag == f'W/"{first["meta"]["versionId"]}"' and modified.endswith("GMT")
    assert (await client.get("/Observation/oa2", headers={"If-None-Match": etag})).status == 304
    assert (await client.get("/Observation/oa2", headers={"If-None-Match": 'W/"other"'})).status == 200
    # a newer version arrives (a later source time): the read moves on, both versions stay readable
    store = IndexStore.open(settings_.stores.index_url)
    newer = _obs("oa2", "pa", "2026-02-10T08:00:00Z", 111)
    store.apply(
        [
            IncomingBundle(
                {
                    "resourceType": "Bundle",
                    "timestamp": "2026-04-01T00:00:00Z",
                    "entry": [{"resource": newer}],
                },
                "h5",
                "st-mary",
                "st-mary|1",
                "t",
                0,
                1,
                "2026-04-01T00:00:01.000Z",
            )
        ]
    )
    store.close()
    resp = await client.get("/Observation/oa2", headers={"If-None-Match": etag})
    assert resp.status == 200 and (await resp.json())["valueQuantity"]["value"] == 111
    history = await client_get_all(client, "/Observation/oa2/_history")
    assert history["type"] == "history" and history["total"] == 2
    assert [e["resource"]["valueQuantity"]["value"] for e in history["entry"]] == [111, 110]
    old = await client.get(f"/Observation/oa2/_history/{first['meta']['versionId']}")
    assert old.status == 200 and (await old.json())["valueQuantity"]["value"] == 110
    assert (await client.get("/Observation/oa2/_history/nope")).status == 404
    assert (await client.get("/Observation/nope/_history")).status == 404


async def test_lastn_gives_the_newest_of_each_code(client: Any) -> None:
    b = await _search(client, "/Observation/$lastn", patient="pa")
    assert _ids(b) == ["ob2", "oa3"]  # the newest glucose (riverside's, linked) and the only 4548-4
    b = await _search(client, "/Observation/$lastn", patient="pa", max="2", code="2345-7")
    assert _ids(b) == ["ob2", "oa2"]
    assert (await client.get("/Observation/$lastn")).status == 400
    assert (await client.get("/Observation/$lastn?patient=pa&max=0")).status == 400


async def test_the_capability_statement_claims_only_what_the_server_does(client: Any) -> None:
    """Every advertised search parameter is searched (no 'not supported' warning, no error) and every
    advertised read answers, for every advertised type."""
    cap = await client_get_all(client, "/metadata")
    samples = {
        "token": "x",
        "string": "x",
        "date": "ge2026-01-01",
        "reference": "Patient/pa",
        "quantity": "gt1",
        "number": "1",
        "uri": "x",
    }
    called = 0
    for res in cap["rest"][0]["resource"]:
        rtype = res["type"]
        interactions = {i["code"] for i in res.get("interaction", [])}
        if "read" in interactions:
            assert (await client.get(f"/{rtype}/no-such-id")).status == 404, rtype
        if "search-type" not in interactions or rtype in ("Consent", "AuditEvent", "Group"):
            continue
        for sp in res.get("searchParam", []):
            resp = await client.get(f"/{rtype}", params={sp["name"]: samples[sp["type"]]})
            body = await resp.json()
            assert resp.status == 200, (rtype, sp, body)
            assert not _outcomes(body), (rtype, sp, _outcomes(body))
            called += 1
        for inc in res.get("searchInclude", []):
            assert (await client.get(f"/{rtype}", params={"_include": inc})).status == 200, (rtype, inc)
        for inc in res.get("searchRevInclude", []):
            assert (await client.get(f"/{rtype}", params={"_revinclude": inc})).status == 200, (rtype, inc)
    assert called > 300


async def test_a_cursor_of_another_search_is_refused(client: Any) -> None:
    first = await _search(client, "/Observation", _count="2", _sort="-date,code")
    nxt = _link(first, "next")
    assert nxt is not None
    cursor = URL(nxt).query["_cursor"]
    for other in ({"_sort": "date"}, {}):
        resp = await client.get("/Observation", params={**other, "_count": "2", "_cursor": cursor})
        assert resp.status == 400 and "_cursor" in (await resp.json())["issue"][0]["diagnostics"]


# -- regressions found in review ----------------------------------------------------------------


async def test_a_search_scope_narrowing_applies_to_search(settings_: Settings) -> None:
    cat = "http://terminology.hl7.org/CodeSystem/observation-category"
    for value, expected in (("laboratory", 6), ("vital-signs", 0)):
        scope = f"user/Observation.s?category={cat}|{value}"
        app = create_app(settings_, Backend(settings_))
        async with TestClient(TestServer(app), headers=bearer(settings_, scope)) as c:
            assert len(_ids(await _search(c, "/Observation"))) == expected, value


async def test_history_vread_and_provenance_respect_the_compartment(settings_: Settings) -> None:
    store = IndexStore.open(settings_.stores.index_url)  # oa2 moves to pc in a later version
    moved = _obs("oa2", "pc", "2026-02-10T08:00:00Z", 111)
    late = {"resourceType": "Bundle", "timestamp": "2026-05-01T00:00:00Z", "entry": [{"resource": moved}]}
    store.apply([IncomingBundle(late, "h6", "st-mary", "st-mary|1", "t", 0, 2, "2026-05-01T00:00:01.000Z")])
    store.close()
    app = create_app(settings_, Backend(settings_))
    async with TestClient(TestServer(app), headers=bearer(settings_, "patient/*.rs", patient="pc")) as c:
        history = await client_get_all(c, "/Observation/oa2/_history")
        assert [e["resource"]["subject"]["reference"] for e in history["entry"]] == ["Patient/pc"]
        resp = await c.get("/Observation/oa1/_history/bogus")  # pa's: the same answer as a missing id
        assert resp.status == 404 and "is not known" in (await resp.json())["issue"][0]["diagnostics"]
        b = await _search(c, "/Observation", _id="oc1", _revinclude="Provenance:target")
        assert _ids(b, "include") == []


async def test_bad_numbers_cursors_and_foreign_references(client: Any) -> None:
    for q in ("value-quantity=1e1000001", "value-quantity=1e-1000001", "component-value-quantity=9e99999"):
        assert (await client.get(f"/Observation?{q}")).status == 400, q
    import base64

    forged = base64.urlsafe_b64encode(b'{"h":9223372036854775808,"k":null,"b":false}').decode().rstrip("=")
    assert (await client.get(f"/Observation?_cursor={forged}")).status == 400
    assert _ids(await _search(client, "/Observation", subject="http://evil.example/fhir/Patient/pc")) == []
    b = await _search(client, "/Observation", _id="oa1", _elements="valueQuantity")
    assert {"code", "status", "valueQuantity"} <= set(b["entry"][0]["resource"])


def test_escapes_text_and_deceased_match_as_the_spec_says() -> None:
    q = parse_search("Patient", [("identifier", "urn:x\\|y|A\\|B"), ("deceased", "true")])
    patient = {
        "resourceType": "Patient",
        "identifier": [{"system": "urn:x|y", "value": "A|B"}],
        "deceasedDateTime": "2020-01-01",
    }
    assert q.matches(patient)
    with pytest.raises(FhirHTTPError):  # unescaped, the bars are separators: not system|code
        parse_search("Patient", [("identifier", "urn:x|y|A|B")])
    obs = {
        "resourceType": "Observation",
        "code": {
            "coding": [{"system": LOINC, "code": "2345-7", "display": "Glucose"}],
            "text": "Blood sugar",
        },
    }
    for text, hit in (("blood", True), ("gluc", True), ("sugar", True), ("xyz,blood", True), ("ugar", False)):
        assert parse_search("Observation", [("code:text", text)]).matches(obs) is hit, text
    assert parse_search("Patient", [("family", "o\\,brien")]).matches(
        {"resourceType": "Patient", "name": [{"family": "O,Brien"}]}
    )


@pytest.mark.parametrize("sort", [None, "_id", "-_id", "_lastUpdated", "-_lastUpdated"])
async def test_a_large_candidate_set_is_read_page_by_page_in_index_order(
    client: Any, monkeypatch: pytest.MonkeyPatch, sort: str | None
) -> None:
    import bridge.service.fhir.search as search

    everything = await _search(client, "/Observation", _count="100")
    expected = {e["resource"]["id"]: e["resource"] for e in everything["entry"]}
    monkeypatch.setattr(search, "CANDIDATE_LIMIT", 3)  # 6 Observations: more than the in-memory limit
    monkeypatch.setattr(search, "SCAN_CHUNK", 2)
    params = {"_count": "2", **({"_sort": sort} if sort else {})}
    page = await _search(client, "/Observation", **params)
    seen, pages = _ids(page), [page]
    while (nxt := _link(page, "next")) is not None:
        page = await client_get_all(client, nxt)
        pages.append(page)
        seen += _ids(page)
    assert sorted(seen) == sorted(expected) and len(seen) == len(set(seen))
    field = "lastUpdated" if sort and "lastUpdated" in sort else None
    keys = [(expected[i]["meta"][field] if field else "", i) for i in seen]
    assert keys == sorted(keys, reverse=bool(sort and sort.startswith("-")))
    back = await client_get_all(client, _link(pages[-1], "previous") or "")
    assert _ids(back) == _ids(pages[-2])
    resp = await client.get("/Observation", params={"_sort": "date", "_count": "2"})
    assert resp.status == 400 and (await resp.json())["issue"][0]["code"] == "too-costly"
