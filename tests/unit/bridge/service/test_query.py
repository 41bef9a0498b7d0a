"""The query service over a real index store (no Kafka): filters, paging, de-duplication, errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from yarl import URL

from bridge.config import Settings
from bridge.service.app import Backend, create_app
from bridge.service.fhir.dates import date_range, in_range, utc_millis
from bridge.stores.index.store import IncomingBundle, IndexStore
from bridge.stores.ledger import open_ledger
from tests.support.auth import bearer


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


def _glucose(oid: str, pid: str, when: str, value: float) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": oid,
        "status": "final",
        "subject": {"reference": f"Patient/{pid}"},
        "code": {"coding": [{"system": "http://loinc.org", "code": "2345-7"}]},
        "effectiveDateTime": when,
        "valueQuantity": {
            "value": value,
            "unit": "mg/dL",
            "system": "http://unitsofmeasure.org",
            "code": "mg/dL",
        },
    }


@pytest.fixture(params=["sqlite", "postgres"])
async def client(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    env = {"FHIRBRIDGE_DATA_DIR": str(tmp_path)}
    if request.param == "postgres":
        env["FHIRBRIDGE_INDEX_URL"] = request.getfixturevalue("pg_dsn")
    settings = Settings.from_env(env)
    store = IndexStore.open(settings.stores.index_url)
    ssn = {"system": "http://hl7.org/fhir/sid/us-ssn", "value": "123456789"}
    store.apply(
        [
            _bundle(
                "h1",
                "st-mary",
                [
                    {
                        "resourceType": "Patient",
                        "id": "pa",
                        "identifier": [ssn],
                        "name": [{"family": "DOE", "given": ["JANE"]}],
                        "birthDate": "1980-02-14",
                    },
                    _glucose("oa1", "pa", "2026-01-10T08:00:00Z", 98),
                    _glucose("oa2", "pa", "2026-02-10T08:00:00Z", 110),
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
                        "identifier": [ssn],
                        "name": [{"family": "DOE", "given": ["JANE"]}],
                        "birthDate": "1980-02-14",
                    },
                    _glucose("ob1", "pb", "2026-01-10T08:00:00Z", 98),  # the same fact as oa1
                    _glucose("ob2", "pb", "2026-03-10T08:00:00Z", 120),
                ],
                "2026-03-11T00:00:00.000Z",
            ),
            _bundle(
                "h3",
                "lakeside",
                [{"resourceType": "Patient", "id": "pc", "name": [{"family": "OTHER"}]}],
                "2026-03-11T00:00:00.000Z",
            ),
        ]
    )
    store.close()
    backend = Backend(settings)  # no ledger, identifier linking only
    async with TestClient(TestServer(create_app(settings, backend)), headers=bearer(settings)) as c:
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
    orgs = {
        s["valueString"] for ext in merged["extension"] for s in ext["extension"] if s["url"] == "sourceOrg"
    }
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
    # the links page with a cursor pinned to the first page's snapshot (as search does); _offset stays
    seen = _ids(page1)
    page = page1
    while nxt := next((link["url"] for link in page["link"] if link["relation"] == "next"), None):
        assert "_cursor=" in nxt and "_count=2" in nxt
        resp = await client.get(URL(nxt).path_qs)
        page = await resp.json()
        seen += _ids(page)
    assert len(seen) == 5 and len(set(seen)) == 5
    prev = next(link["url"] for link in page["link"] if link["relation"] == "previous")
    assert _ids(await (await client.get(URL(prev).path_qs)).json()) == seen[2:4]
    page3 = await _everything(client, _count="2", _offset="4")
    assert len(_ids(page3)) == 1
    assert not [link for link in page3["link"] if link["relation"] == "next"]
    assert (await client.get("/Patient/pa/$everything?_cursor=nonsense")).status == 400


async def test_unsupported_parameter_is_reported_not_ignored(client: Any) -> None:
    b = await _everything(client, _filter="x eq 1")
    outcomes = [e["resource"] for e in b["entry"] if e["search"]["mode"] == "outcome"]
    assert outcomes and "_filter" in outcomes[0]["issue"][0]["diagnostics"]


async def test_bad_parameters_and_unknown_patient_give_operation_outcome(client: Any) -> None:
    for path, params, status in [
        ("/Patient/pa/$everything", {"start": "yesterday"}, 400),
        ("/Patient/pa/$everything", {"_count": "0"}, 400),
        ("/Patient/nope/$everything", {}, 404),
        ("/Patient", {"birthdate": "yesterday"}, 400),
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


# -- regressions ---------------------------------------------------------------------------------


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
    assert "_type=Observation" in nxt and "foo=1" in nxt and "_cursor=" in nxt


async def test_format_proof_and_type_values_are_checked(client: Any) -> None:
    assert (await client.get("/Patient/pa/$everything", params={"_format": "xml"})).status == 400
    assert (await client.get("/Patient", params={"name": "doe", "_format": "xml"})).status == 400
    assert _ids(await _everything(client, _format="application/fhir+json"))
    assert (await client.get("/Patient/pa/$everything", params={"_proof": "yes"})).status == 400
    b = await _everything(client, _proof="true")  # this service has no ledger: said, not silently skipped
    outcomes = [
        e["resource"]["issue"][0]["diagnostics"] for e in b["entry"] if e["search"]["mode"] == "outcome"
    ]
    assert any("no ledger is configured" in d for d in outcomes)
    b = await _everything(client, _type="Observation,Foo")
    outcomes = [
        e["resource"]["issue"][0]["diagnostics"] for e in b["entry"] if e["search"]["mode"] == "outcome"
    ]
    assert any("'Foo'" in d for d in outcomes) and set(_ids(b)) == {"oa1", "oa2", "ob2"}


def _store_with(tmp_path: Path, bundles: list[IncomingBundle], **env: str) -> Settings:
    settings = Settings.from_env({"FHIRBRIDGE_DATA_DIR": str(tmp_path), **env})
    store = IndexStore.open(settings.stores.index_url)
    store.apply(bundles)
    store.close()
    return settings


@pytest.mark.parametrize("by_key_max", [64, 0])
async def test_provenance_does_not_depend_on_the_page_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, by_key_max: int
) -> None:
    """A resource delivered first under another subject keeps both deliveries as its sources, on a
    small page and on a large one (whose provenance is found by patient, and by key for moved ones)."""
    import bridge.stores.index.store as index_store

    monkeypatch.setattr(index_store, "SOURCES_BY_KEY_MAX", by_key_max)
    x = _glucose("x", "pc", "2026-01-05T08:00:00Z", 70)
    settings = _store_with(
        tmp_path,
        [
            _bundle(
                "h4",
                "st-mary",
                [{"resourceType": "Patient", "id": "pa"}, {"resourceType": "Patient", "id": "pc"}, x],
                "2026-01-06T00:00:00.000Z",
            ),
            _bundle(
                "h5", "riverside", [{**x, "subject": {"reference": "Patient/pa"}}], "2026-01-07T00:00:00.000Z"
            ),
            _bundle(
                "h6",
                "riverside",
                [
                    _glucose(f"y{i}", "pa", f"2026-02-{i % 28 + 1:02d}T{i // 28:02d}:00:00Z", 80 + i)
                    for i in range(60)
                ],  # a page of over 50 entries took another path
                "2026-02-28T00:00:00.000Z",
            ),
        ],
    )
    async with TestClient(TestServer(create_app(settings, Backend(settings))), headers=bearer(settings)) as c:
        for count in ("5", "100"):
            b = await _everything(c, _count=count)
            entry = next(e for e in b["entry"] if e["resource"]["id"] == "x")
            shas = {
                s["valueString"]
                for ext in entry["extension"]
                for s in ext["extension"]
                if s["url"] == "bundleSha256"
            }
            assert shas == {"h4", "h5"}, count


async def test_name_search_folds_non_ascii_and_is_not_cut_short(tmp_path: Path) -> None:
    patients = [
        {
            "resourceType": "Patient",
            "id": f"p{i:03d}",
            "name": [{"family": "Doe", "given": ["Jane"]}],
            "address": [{"line": ["1 Élodie Martin Street"]}],
        }
        for i in range(230)
    ]
    patients.append(
        {"resourceType": "Patient", "id": "p999", "name": [{"family": "Martin", "given": ["Élodie"]}]}
    )
    settings = _store_with(tmp_path, [_bundle("h7", "st-mary", patients, "2026-01-01T00:00:00.000Z")])
    async with TestClient(TestServer(create_app(settings, Backend(settings))), headers=bearer(settings)) as c:
        # 231 bodies mention each name; only the last by id has it as a name
        for needle, expected in (
            ("élodie", ["p999"]),
            ("ÉLODIE", ["p999"]),
            ("martin", ["p999"]),
            ("elodie", ["p999"]),  # FHIR string search ignores accents as well as case
        ):
            resp = await c.get("/Patient", params={"name": needle})
            ids = [
                e["resource"]["id"] for e in (await resp.json())["entry"] if e["search"]["mode"] == "match"
            ]
            assert ids == expected, needle


# -- regressions ----------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgres"])
def index_env(request: pytest.FixtureRequest) -> dict[str, str]:
    """Settings environment for an index on each backend (the data directory is added by the test)."""
    return {"FHIRBRIDGE_INDEX_URL": request.getfixturevalue("pg_dsn")} if request.param == "postgres" else {}


async def _get(c: Any, url: str, **params: str) -> tuple[int, dict[str, Any]]:
    resp = await c.get(url, params=params)
    return resp.status, await resp.json()


def _outcomes(bundle: dict[str, Any]) -> list[str]:
    return [
        e["resource"]["issue"][0]["diagnostics"] for e in bundle["entry"] if e["search"]["mode"] == "outcome"
    ]


async def test_extreme_dates_answer_200_not_500(tmp_path: Path, index_env: dict[str, str]) -> None:
    """A stored date in 9999 and parameters at the ends of the calendar overflowed ``datetime`` (500)."""
    cov = {
        "resourceType": "Coverage",
        "id": "cov",
        "beneficiary": {"reference": "Patient/pa"},
        "period": {"start": "9999-12-31"},
    }
    settings = _store_with(
        tmp_path,
        [
            _bundle(
                "h1",
                "st-mary",
                [
                    {"resourceType": "Patient", "id": "pa"},
                    _glucose("o1", "pa", "2026-01-01T00:00:00Z", 1),
                    cov,
                ],
                "2026-01-01T00:00:00.000Z",
            )
        ],
        **index_env,
    )
    async with TestClient(TestServer(create_app(settings, Backend(settings))), headers=bearer(settings)) as c:
        for params, expected in [
            ({"start": "2026-01-01"}, {"pa", "o1", "cov"}),
            ({"end": "2026-12-31"}, {"pa", "o1"}),
            ({"end": "9999-12-31"}, {"pa", "o1", "cov"}),
            ({"end": "9999-12-31T23:59:59Z"}, {"pa", "o1", "cov"}),
            ({"start": "9999"}, {"pa", "cov"}),
            ({"start": "9999-12"}, {"pa", "cov"}),
            ({"start": "0001-01-01T00:00:00+01:00"}, {"pa", "o1", "cov"}),
            ({"end": "0001-01-01T00:00:00+01:00"}, {"pa"}),
            ({"_since": "0001-01-01T00:00:00+01:00"}, {"pa", "o1", "cov"}),
            ({"_since": "9999-12-31T23:59:59.9999Z"}, set()),
        ]:
            status, body = await _get(c, "/Patient/pa/$everything", **params)
            assert status == 200, (params, body)
            assert set(_ids(body)) == expected, params


@pytest.mark.parametrize(
    ("value", "lo", "hi"),
    [
        ("9999-12-31", "9999-12-31T00:00:00+00:00", "9999-12-31T23:59:59.999999+00:00"),
        ("9999", "9999-01-01T00:00:00+00:00", "9999-12-31T23:59:59.999999+00:00"),
        ("9999-12-31T23:59:59Z", "9999-12-31T23:59:59+00:00", "9999-12-31T23:59:59.999999+00:00"),
        ("0001-01-01T00:00:00+01:00", "0001-01-01T00:00:00+00:00", "0001-01-01T00:00:00+00:00"),
        ("2026-01-10T08:00Z", "2026-01-10T08:00:00+00:00", "2026-01-10T08:01:00+00:00"),
        ("2026-01-10T08:00:00Z", "2026-01-10T08:00:00+00:00", "2026-01-10T08:00:01+00:00"),
        ("2026-01-10T08:00:00.5Z", "2026-01-10T08:00:00.500000+00:00", "2026-01-10T08:00:00.600000+00:00"),
        ("2026-01-10T08:00:00.123Z", "2026-01-10T08:00:00.123000+00:00", "2026-01-10T08:00:00.124000+00:00"),
        (
            "2026-01-10T08:00:00.12345678Z",
            "2026-01-10T08:00:00.123456+00:00",
            "2026-01-10T08:00:00.123457+00:00",
        ),
        ("2026-01-10T08:00+01:00", "2026-01-10T07:00:00+00:00", "2026-01-10T07:01:00+00:00"),
        ("2024-02", "2024-02-01T00:00:00+00:00", "2024-03-01T00:00:00+00:00"),
    ],
)
def test_date_range_follows_the_precision_given_and_clamps(value: str, lo: str, hi: str) -> None:
    assert [d.isoformat() for d in date_range(value)] == [lo, hi]


def test_date_range_refuses_what_is_not_a_date() -> None:
    for value in (
        "0000",
        "2026-13",
        "2026-02-30",
        "2026-01-10T24:00:00Z",
        "2026-01-10T10:00+99:00",
        "٢٠٢٦",
        "2026\n",
    ):
        with pytest.raises(ValueError):
            date_range(value)


def test_utc_millis_rounds_up_to_the_stored_millisecond_and_clamps() -> None:
    assert utc_millis("2026-01-01T10:00:00.5004Z") == "2026-01-01T10:00:00.501Z"
    assert utc_millis("2026-03-11T05:00:00+05:00") == "2026-03-11T00:00:00.000Z"
    assert utc_millis("9999-12-31T23:59:59.9999Z") == "9999-12-31T23:59:59.999Z"
    assert utc_millis("0001-01-01T00:00:00+01:00") == "0001-01-01T00:00:00.000Z"


@pytest.mark.parametrize(
    ("clinical", "start", "end", "expected"),
    [
        ("2026-01-10T08:00:30Z", None, "2026-01-10T08:00Z", True),  # the whole minute, not its first second
        ("2026-01-10T08:00:30Z", "2026-01-10T08:00Z", "2026-01-10T08:00Z", True),
        ("2026-01-10T08:01:00Z", None, "2026-01-10T08:00Z", False),
        ("2026-01-10T07:59:59Z", "2026-01-10T08:00Z", None, False),
        ("2026-01-10T08:00:00.5Z", None, "2026-01-10T08:00:00.4Z", False),
        ("2026-01-10T08:00:00.45Z", None, "2026-01-10T08:00:00.4Z", True),
        (
            "2026-01-10T08:00:00.123456789Z",
            "2026-01-10T08:00:00.123456Z",
            "2026-01-10T08:00:00.123456Z",
            True,
        ),
        ("9999-12-31", "9999-12-31T23:59:59Z", "9999-12-31", True),
        ("9999-12-31T23:59:59.999999Z", None, "9999-12-31", True),
        ("0001-01-01", None, "0001-01-01T00:00:00+01:00", False),  # 0000-12-31T23:00Z: before year 1 starts
        ("0001-01-01", "0001-01-01T00:00:00+01:00", None, True),
    ],
)
def test_in_range_at_every_precision_and_the_ends_of_the_calendar(
    clinical: str, start: str | None, end: str | None, expected: bool
) -> None:
    assert in_range(clinical, start, end) is expected


async def test_a_minute_precision_bound_covers_the_whole_minute(
    tmp_path: Path, index_env: dict[str, str]
) -> None:
    settings = _store_with(
        tmp_path,
        [
            _bundle(
                "h1",
                "st-mary",
                [
                    {"resourceType": "Patient", "id": "pa"},
                    _glucose("o0830", "pa", "2026-01-10T08:00:30Z", 6),
                    _glucose("o0801", "pa", "2026-01-10T08:01:00Z", 7),
                ],
                "2026-01-11T00:00:00.000Z",
            )
        ],
        **index_env,
    )
    async with TestClient(TestServer(create_app(settings, Backend(settings))), headers=bearer(settings)) as c:
        assert _ids(await _everything(c, end="2026-01-10T08:00Z", _type="Observation")) == ["o0830"]
        b = await _everything(c, start="2026-01-10T08:00Z", end="2026-01-10T08:00Z", _type="Observation")
        assert _ids(b) == ["o0830"]
        # a stored value has its own precision too: 08:00:30Z is that whole second
        assert set(_ids(await _everything(c, start="2026-01-10T08:00:30.5Z", _type="Observation"))) == {
            "o0830",
            "o0801",
        }
        assert set(_ids(await _everything(c, start="2026-01-10T08:00:31Z", _type="Observation"))) == {"o0801"}


async def test_proof_true_says_which_entries_carry_no_proof(
    tmp_path: Path, index_env: dict[str, str]
) -> None:
    """An entry whose bundle was logged after the latest checkpoint, or never, got no proof and no notice."""
    import base64
    import hashlib

    from ledger import checkpoint, merkle, note
    from ledger.log import LedgerEntry

    def sha(s: str) -> str:
        return hashlib.sha256(s.encode()).hexdigest()

    def logged(h: str, org: str, off: int) -> LedgerEntry:
        return LedgerEntry(
            bundle_sha256=h,
            source_org=org,
            adapter="hl7v2",
            adapter_version="1",
            topic="t",
            partition=0,
            offset=off,
            ingested_at="2026-01-11T00:00:00Z",
            message_id=None,
        )

    h1, h2, h3, h4 = sha("b1"), sha("b2"), sha("b3"), sha("b4")
    settings = _store_with(
        tmp_path,
        [
            _bundle(
                h1,
                "A",
                [{"resourceType": "Patient", "id": "pa"}, _glucose("o1", "pa", "2026-01-10T08:00:00Z", 98)],
                "2026-01-11T00:00:00.000Z",
            ),
            _bundle(
                h2, "A", [_glucose("o2", "pa", "2026-02-10T08:00:00Z", 120)], "2026-01-12T00:00:00.000Z"
            ),  # logged later
            _bundle(
                h3, "A", [_glucose("o3", "pa", "2026-03-10T08:00:00Z", 130)], "2026-01-13T00:00:00.000Z"
            ),  # logged later
            _bundle(
                h4, "A", [_glucose("o4", "pa", "2026-04-10T08:00:00Z", 140)], "2026-01-14T00:00:00.000Z"
            ),  # never logged
        ],
        **index_env,
    )
    ledger_url = index_env.get("FHIRBRIDGE_INDEX_URL") or f"sqlite:///{tmp_path / 'ledger.db'}"
    origin = "test.fhirbridge/ledger"
    skey, vkey = note.generate_key(origin)
    led = open_ledger(
        ledger_url, origin=origin, signer_key=skey, checkpoint_every=10**6, checkpoint_interval_ms=10**9
    )
    led.append([logged(h1, "A", 1)])
    led.checkpoint_now()
    led.append([logged(h2, "A", 2), logged(h3, "A", 3)])
    led.close()
    backend = Backend(settings, ledger_factory=lambda: open_ledger(ledger_url, origin=origin))
    async with TestClient(TestServer(create_app(settings, backend)), headers=bearer(settings)) as c:
        b = await _everything(c, _proof="true")
        cp = checkpoint.open(b["meta"]["extension"][0]["valueString"], [vkey])
        assert cp.size == 1
        proven = set()
        for e in b["entry"]:
            for ext in e.get("extension", []):
                sub = {x["url"]: x for x in ext["extension"]}
                if "ledgerEntry" in sub:  # the proofs included still verify
                    proof = [
                        base64.b64decode(x["valueBase64Binary"])
                        for x in ext["extension"]
                        if x["url"] == "proofHash"
                    ]
                    leaf = merkle.leaf_hash(base64.b64decode(sub["ledgerEntry"]["valueBase64Binary"]))
                    merkle.verify_inclusion(
                        leaf, sub["ledgerIndex"]["valueInteger"], cp.size, proof, cp.root_hash
                    )
                    proven.add(e["resource"]["id"])
        assert proven == {"pa", "o1"}
        outcomes = _outcomes(b)
        assert len(outcomes) == 2, outcomes
        assert "2 entries on this page carry no inclusion proof" in outcomes[0]
        assert (
            "logged after the latest checkpoint (tree size 1): retry after the next checkpoint" in outcomes[0]
        )
        assert (
            "1 entry on this page carries no inclusion proof" in outcomes[1]
            and "not in the ledger" in outcomes[1]
        )
        # counted per page: the first page holds only proven entries, so it has no such warning
        assert _outcomes(await _everything(c, _proof="true", _count="2")) == []
        # without _proof nothing is said
        assert _outcomes(await _everything(c)) == []


async def test_nul_characters_give_400_or_404_on_both_backends(
    tmp_path: Path, index_env: dict[str, str]
) -> None:
    settings = _store_with(
        tmp_path,
        [_bundle("h1", "st-mary", [{"resourceType": "Patient", "id": "pa"}], "2026-01-01T00:00:00.000Z")],
        **index_env,
    )
    async with TestClient(TestServer(create_app(settings, Backend(settings))), headers=bearer(settings)) as c:
        for path, status, name in [
            ("/Patient/a%00b/$everything", 404, None),
            ("/Patient/pa/$everything?_type=Obs%00", 400, "_type"),
            ("/Patient/pa/$everything?_type=Observation,%00", 400, "_type"),
            ("/Patient/pa/$everything?start=2026%00", 400, "start"),
            ("/Patient?name=a%00", 400, "name"),
            ("/Patient?name=%00", 400, "name"),
            ("/Patient?identifier=s%7Ca%00b", 400, "identifier"),
            ("/Patient?identifier=a%00b", 400, "identifier"),
        ]:
            resp = await c.get(path)
            body = await resp.json()
            assert resp.status == status, (path, body)
            assert body["resourceType"] == "OperationOutcome"
            if name:
                assert body["issue"][0]["diagnostics"].startswith(f"parameter {name}:"), path


async def test_type_with_only_empty_values_matches_nothing_and_says_so(client: Any) -> None:
    for value in (",", "", " , "):
        b = await _everything(client, _type=value)
        assert _ids(b) == [] and b["total"] == 0, value
        assert any("names no resource type" in d for d in _outcomes(b)), value
    assert set(_ids(await _everything(client, _type="Observation,"))) == {"oa1", "oa2", "ob2"}


async def test_name_search_is_the_same_on_both_backends(tmp_path: Path, index_env: dict[str, str]) -> None:
    """The ``lower(body) LIKE`` pre-filter dropped true matches: non-ASCII names on PostgreSQL (``lower``
    is not ``casefold``), and names with ``"`` or ``\\`` on both (the body is JSON-escaped text)."""
    patients = [
        {"resourceType": "Patient", "id": "p1", "name": [{"family": "Strauss", "given": ["Anna"]}]},
        {"resourceType": "Patient", "id": "p2", "name": [{"family": "Ørsted"}]},
        {"resourceType": "Patient", "id": "p3", "name": [{"text": 'Robert "Bob" Smith', "family": "Smith"}]},
        {"resourceType": "Patient", "id": "p4", "name": [{"family": "ΟΔΥΣΣΕΥΣ"}]},
        {"resourceType": "Patient", "id": "p6", "name": [{"family": "Back\\slash"}]},
        {"resourceType": "Patient", "id": "p7", "name": [{"family": "Tab\tName"}]},
    ]
    settings = _store_with(
        tmp_path, [_bundle("h1", "st-mary", patients, "2026-01-01T00:00:00.000Z")], **index_env
    )
    async with TestClient(TestServer(create_app(settings, Backend(settings))), headers=bearer(settings)) as c:
        # name: a prefix of any part (FHIR string search); name:contains: anywhere
        for needle, expected in [
            ("strauß", ["p1"]),
            ("ØRSTED", ["p2"]),
            ('"bob"', []),
            ('robert "bob', ["p3"]),
            ("οδυσσευς", ["p4"]),
            ("back\\slash", ["p6"]),
            ("abc\\", []),
            ("tab\tn", ["p7"]),
            ("smith", ["p3"]),
            ("back", ["p6"]),
        ]:
            status, body = await _get(c, "/Patient", name=needle)
            assert status == 200, (needle, body)
            assert _ids(body) == expected, needle
        for needle, expected in [
            ('"bob"', ["p3"]),
            ('"BOB" smith', ["p3"]),
            ("b\tn", ["p7"]),
            ("ted", ["p2"]),
        ]:
            status, body = await _get(c, "/Patient", **{"name:contains": needle})
            assert status == 200, (needle, body)
            assert _ids(body) == expected, needle


# -- a true total, and a Host the service was not given ----------------------------------


async def test_patient_search_total_is_true_and_pages_follow(
    tmp_path: Path, index_env: dict[str, str]
) -> None:
    ssn = {"system": "http://hl7.org/fhir/sid/us-ssn", "value": "999"}
    patients = [
        {
            "resourceType": "Patient",
            "id": f"p{i:03d}",
            "identifier": [ssn],
            "name": [{"family": "Doe"}],
            "birthDate": "1990-01-01",
        }
        for i in range(230)
    ]
    settings = _store_with(
        tmp_path, [_bundle("h1", "st-mary", patients, "2026-01-01T00:00:00.000Z")], **index_env
    )
    async with TestClient(TestServer(create_app(settings, Backend(settings))), headers=bearer(settings)) as c:
        for params in ({"name": "doe"}, {"birthdate": "1990"}, {"identifier": f"{ssn['system']}|999"}):
            status, body = await _get(c, "/Patient", **params, _count="200")
            assert status == 200
            assert body["total"] == 230, params
            assert len([e for e in body["entry"] if e["search"]["mode"] == "match"]) == 200
            nxt = next(link["url"] for link in body["link"] if link["relation"] == "next")
            rest = await (await c.get(URL(nxt).path_qs)).json()
            assert len(_ids(rest)) == 30 and not set(_ids(rest)) & set(_ids(body)), params
            assert not any(link["relation"] == "next" for link in rest["link"])
        status, body = await _get(c, "/Patient", name="doe", birthdate="1990-01-01")
        assert body["total"] == 230
        # under the limit: everything, no announcement
        status, body = await _get(c, "/Patient", name="nobody")
        assert status == 200 and body["total"] == 0 and _outcomes(body) == []


async def test_a_host_header_the_service_was_not_given_is_refused(tmp_path: Path) -> None:
    settings = _store_with(
        tmp_path,
        [_bundle("h1", "st-mary", [{"resourceType": "Patient", "id": "pa"}], "2026-01-01T00:00:00.000Z")],
    )
    async with TestClient(TestServer(create_app(settings, Backend(settings))), headers=bearer(settings)) as c:
        for host in ("evil.example", "evil.example:8080", "127.0.0.1.evil.example"):
            resp = await c.get("/Patient/pa/$everything", headers={"Host": host})
            assert resp.status == 400, host
            body = await resp.json()
            assert body["resourceType"] == "OperationOutcome" and "evil" not in await resp.text()
        for host in ("localhost", "LOCALHOST:8080", "127.0.0.1", "[::1]:8080"):
            resp = await c.get("/Patient/pa/$everything", headers={"Host": host})
            assert resp.status == 200, host
            full_urls = [e["fullUrl"] for e in (await resp.json())["entry"]]
            assert all(u.lower().startswith(f"http://{host.lower()}/") for u in full_urls)
    # configured names, or a public URL that the links come from
    for env, host, status in (
        ({"FHIRBRIDGE_ALLOWED_HOSTS": "fhir.hospital.example"}, "fhir.hospital.example", 200),
        ({"FHIRBRIDGE_ALLOWED_HOSTS": "fhir.hospital.example"}, "localhost", 400),
        ({"FHIRBRIDGE_PUBLIC_URL": "https://fhir.hie.example"}, "internal-proxy-name", 200),
    ):
        s = Settings.from_env({"FHIRBRIDGE_DATA_DIR": str(tmp_path), **env})
        async with TestClient(TestServer(create_app(s, Backend(s))), headers=bearer(s)) as c:
            resp = await c.get("/Patient/pa/$everything", headers={"Host": host})
            assert resp.status == status, (env, host)
            if "FHIRBRIDGE_PUBLIC_URL" in env:
                assert all(
                    e["fullUrl"].startswith("https://fhir.hie.example/") for e in (await resp.json())["entry"]
                )
