"""``GET /Person/$mpi-explain``: the matcher's field-by-field scoring of two records, through the service."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mpi_helpers import patient

from bridge.config import Settings
from bridge.service.app import create_app
from bridge.service.context import Backend
from bridge.stores.audit import AuditStore
from bridge.stores.mpi import PersonIndex, person_id_for
from bridge.stores.mpi.compare import FIELDS
from bridge.stores.mpi.model import WEIGHT_TERMS
from tests.support.auth import bearer

A = patient(
    "a1",
    "Alice",
    "Andersen",
    "1980-04-12",
    "female",
    line="12 Elm Street",
    city="Metro",
    postal="12345",
    phone="555-010-2030",
    ssn="123456789",
)
B = patient(
    "b1",
    "Alice",
    "Andersen",
    "1980-04-12",
    "female",
    line="12 Elm St",
    city="Metro",
    postal="12345",
    ssn="123-45-6789",
)
C = patient(
    "c2", "Alice", "Andersen", "1980-04-12", None, line="400 Harbour View", city="Portside", postal="99999"
)
D = patient("d3", "Bruno", "Baptiste", "1955-11-02", "male", city="Elsewhere")


@pytest.fixture
def mpi(tmp_path: Path) -> Iterator[PersonIndex]:
    idx = PersonIndex.open(f"sqlite://{tmp_path / 'mpi.db'}")
    idx.upsert_patients([("org-a", A), ("org-b", B), ("org-c", C), ("org-d", D)])
    yield idx
    idx.close()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings.from_env({"FHIRBRIDGE_DATA_DIR": str(tmp_path / "service")})


@pytest.fixture
async def client(aiohttp_client: Any, mpi: PersonIndex, settings: Settings) -> Any:
    app = create_app(settings, Backend(settings, mpi_factory=lambda: mpi))
    return await aiohttp_client(app, headers=bearer(settings, "user/Person.rus", subject="dr.who"))


def params(body: dict[str, Any], name: str) -> list[dict[str, Any]]:
    return [p for p in body["parameter"] if p["name"] == name]


def value(p: dict[str, Any]) -> Any:
    return next(v for k, v in p.items() if k.startswith("value"))


def parts(p: dict[str, Any]) -> dict[str, Any]:
    return {q["name"]: value(q) for q in p["part"]}


async def explain(client: Any, a: str, b: str) -> dict[str, Any]:
    r = await client.get("/Person/$mpi-explain", params={"a": a, "b": b})
    assert r.status == 200, await r.text()
    assert r.content_type == "application/fhir+json"
    body: dict[str, Any] = await r.json()
    return body


async def test_a_matched_pair_field_by_field(client: Any, mpi: PersonIndex) -> None:
    body = await explain(client, "a1", "Patient/b1")
    assert body["resourceType"] == "Parameters"
    rec_a, rec_b = parts(params(body, "recordA")[0]), parts(params(body, "recordB")[0])
    assert rec_a["patient"] == {"reference": "Patient/a1"} and rec_b["patient"] == {"reference": "Patient/b1"}
    assert rec_a["source"] == "org-a" and rec_b["person"] == {"reference": f"Person/{person_id_for('a1')}"}
    assert rec_a["identifierSystem"] == "http://hl7.org/fhir/sid/us-ssn"

    fields = {parts(p)["name"]: parts(p) for p in params(body, "field")}
    assert list(fields) == [f.name for f in FIELDS]  # the matcher's order
    assert fields["given"]["valueA"] == "alice" and fields["given"]["agreement"] == "exact"
    assert fields["birth"]["valueA"] == "1980-04-12" and fields["birth"]["level"] == 3
    assert fields["address"]["valueA"] == "12 elm street" and fields["address"]["valueB"] == "12 elm st"
    assert fields["address"]["agreement"] == "approximate"
    assert fields["address"]["levelMeaning"] == "similarity>=75"
    assert fields["phone"]["agreement"] == "missing" and "valueB" not in fields["phone"]
    assert "m" not in fields["phone"] and fields["phone"]["weight"] == 0
    assert fields["ident"]["agreement"] == "exact"  # 123456789 and 123-45-6789 as the matcher sees them
    assert fields["ident"]["bayesFactorBits"] > 10
    for f in fields.values():
        assert f["weight"] == f["bayesFactorBits"] + f.get("termFrequencyBits", 0.0)

    # the waterfall: the prior, then every term in the matcher's order; its running total is the weight
    prior = value(params(body, "priorWeight")[0])
    terms = [parts(p) for p in params(body, "term")]
    assert [t["name"] for t in terms] == list(WEIGHT_TERMS)
    running = prior
    for t in terms:
        running += t["weight"]
        assert t["cumulative"] == running
    weight = value(params(body, "weight")[0])
    assert running == weight

    [stored] = mpi.person(person_id_for("a1"))["links"][:1]
    assert (stored["patient_a"], stored["patient_b"]) == ("a1", "b1")
    assert round(value(params(body, "probability")[0]), 6) == stored["score"]
    assert value(params(body, "decision")[0]) == "MATCH"
    assert value(params(body, "matchThreshold")[0]) == 0.95
    assert value(params(body, "possibleThreshold")[0]) == 0.30
    assert value(params(body, "minMatchEvidenceBits")[0]) == 4.0
    assert value(params(body, "evidenceBits")[0]) == weight - prior
    link = parts(params(body, "link")[0])
    assert link["state"] == "MATCH" and link["origin"] == "auto" and link["score"] == stored["score"]
    assert value(params(body, "samePerson")[0]) is True
    assert parts(params(body, "model")[0])["source"] == "prior"

    # identifier values are never shown, only their systems (as in the review queue)
    text = await (await client.get("/Person/$mpi-explain?a=a1&b=b1")).text()
    assert "123456789" not in text and "123-45" not in text


async def test_link_states_none_possible_and_manual_unlink(client: Any, mpi: PersonIndex) -> None:
    body = await explain(client, "c2", "a1")
    assert parts(params(body, "link")[0])["state"] == "POSSIBLE_MATCH"
    assert value(params(body, "decision")[0]) == "POSSIBLE_MATCH"
    assert value(params(body, "samePerson")[0]) is False

    body = await explain(client, "a1", "d3")
    assert parts(params(body, "link")[0]) == {"state": "none"}
    assert value(params(body, "decision")[0]) == "NO_MATCH"
    fields = {parts(p)["name"]: parts(p) for p in params(body, "field")}
    assert fields["given"]["agreement"] == "disagree" and fields["given"]["bayesFactorBits"] < 0

    mpi.unlink("a1", "b1", actor="dr.who", reason="twins")
    body = await explain(client, "b1", "a1")
    link = parts(params(body, "link")[0])
    assert (link["state"], link["origin"], link["actor"], link["reason"]) == (
        "NO_MATCH",
        "manual",
        "dr.who",
        "twins",
    )
    assert value(params(body, "decision")[0]) == "MATCH"  # what the matcher says; the steward decided
    assert value(params(body, "samePerson")[0]) is False


async def test_the_response_is_strict_fhir(client: Any) -> None:
    from fhir.resources.R4B import get_fhir_model_class

    for a, b in (("a1", "b1"), ("a1", "d3"), ("c2", "b1")):
        body = await explain(client, a, b)
        get_fhir_model_class("Parameters").model_validate(body)


@pytest.mark.parametrize(
    ("query", "status", "says"),
    [
        ("a=a1", 400, "parameter b: required"),
        ("b=a1", 400, "parameter a: required"),
        ("a=a1&b=b1&b=c2", 400, "parameter b: given more than once"),
        ("a=a1&b=", 400, "parameter b: not a Patient id"),
        ("a=a%241&b=b1", 400, "parameter a: not a Patient id"),
        ("a=a%001&b=b1", 400, "parameter a: not a Patient id"),
        ("a=a1&b=Patient/a1", 400, "b: a record cannot be compared with itself"),
        ("a=a1&b=nobody", 404, "'nobody' is not in the master patient index"),
        ("a=Patient/nobody&b=a1", 404, "'nobody'"),
    ],
)
async def test_bad_requests_are_located_outcomes(client: Any, query: str, status: int, says: str) -> None:
    r = await client.get(f"/Person/$mpi-explain?{query}")
    assert r.status == status
    body = await r.json()
    assert body["resourceType"] == "OperationOutcome"
    assert says in body["issue"][0]["diagnostics"]
    assert "Traceback" not in str(body)


async def test_needs_a_person_read_scope_and_is_audited(
    aiohttp_client: Any, client: Any, mpi: PersonIndex, settings: Settings
) -> None:
    r = await client.get("/Person/$mpi-explain", params={"a": "a1", "b": "c2"})
    assert r.status == 200
    audit = AuditStore.open(settings.audit.url)
    try:
        for pid in ("a1", "c2"):
            [row] = audit.for_patient(pid)
            assert row.outcome == "success" and row.agent and row.agent.endswith("|dr.who")
        assert audit.for_patient("b1") == []
    finally:
        audit.close()

    app = create_app(settings, Backend(settings, mpi_factory=lambda: mpi))
    other = await aiohttp_client(app, headers=bearer(settings, "user/Patient.rs", subject="dr.no"))
    r = await other.get("/Person/$mpi-explain", params={"a": "a1", "b": "c2"})
    assert r.status == 403
    assert "alice" not in await r.text()


async def test_listed_in_the_capability_statement_and_openapi(client: Any) -> None:
    metadata = await (await client.get("/metadata")).json()
    [person] = [r for r in metadata["rest"][0]["resource"] if r["type"] == "Person"]
    [op] = [o for o in person["operation"] if o["name"] == "mpi-explain"]
    assert op["definition"].endswith("/openapi.json#/paths/~1Person~1$mpi-explain")
    openapi = await (await client.get("/openapi.json")).json()
    assert openapi["paths"]["/Person/$mpi-explain"]["get"]["summary"].startswith("Why two Patient records")
