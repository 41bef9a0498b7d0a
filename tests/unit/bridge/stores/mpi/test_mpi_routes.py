from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mpi_helpers import patient

from bridge.config import Settings
from bridge.service.app import create_app
from bridge.service.context import Backend
from bridge.service.mpi import EXT_SCORE, EXT_STATE
from bridge.stores.mpi import PersonIndex, person_id_for
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


@pytest.fixture
def mpi(tmp_path: Path) -> Iterator[PersonIndex]:
    idx = PersonIndex.open(f"sqlite://{tmp_path / 'mpi.db'}")
    idx.upsert_patients([("org-a", A), ("org-b", B), ("org-c", C)])
    yield idx
    idx.close()


@pytest.fixture
async def client(aiohttp_client: Any, mpi: PersonIndex, tmp_path: Path) -> Any:
    # the whole query service, whose catch-all read route must not take the MPI's paths
    settings = Settings.from_env({"FHIRBRIDGE_DATA_DIR": str(tmp_path / "service")})
    app = create_app(settings, Backend(settings, mpi_factory=lambda: mpi))
    # a data steward's token: the MPI's reads and decisions
    return await aiohttp_client(app, headers=bearer(settings, "user/Person.rus", subject="dr.who"))


def ext(link: dict[str, Any], url: str) -> Any:
    [e] = [e for e in link["extension"] if e["url"] == url]
    return next(v for k, v in e.items() if k.startswith("value"))


async def test_get_person(client: Any) -> None:
    pid = person_id_for("a1")
    r = await client.get(f"/Person/{pid}")
    assert r.status == 200 and r.content_type == "application/fhir+json"
    body = await r.json()
    assert body["resourceType"] == "Person" and body["id"] == pid
    links = {lk["target"]["reference"]: lk for lk in body["link"]}
    assert set(links) == {"Patient/a1", "Patient/b1", "Patient/c2"}
    assert ext(links["Patient/b1"], EXT_STATE) == "MATCH" and ext(links["Patient/b1"], EXT_SCORE) > 0.95
    assert links["Patient/b1"]["assurance"] == "level3"
    assert (
        ext(links["Patient/c2"], EXT_STATE) == "POSSIBLE_MATCH"
        and links["Patient/c2"]["assurance"] == "level2"
    )
    assert len(body["extension"]) == 3  # a1-b1 MATCH, a1-c2 and b1-c2 POSSIBLE


async def test_unknown_person_is_404_outcome(client: Any) -> None:
    r = await client.get("/Person/does-not-exist")
    assert r.status == 404
    body = await r.json()
    assert body["resourceType"] == "OperationOutcome" and body["issue"][0]["code"] == "not-found"


async def test_review_queue_and_manual_link_unlink(client: Any, mpi: PersonIndex) -> None:
    r = await client.get("/Person/$mpi-review-queue", params={"_count": "1"})
    body = await r.json()
    links = [p for p in body["parameter"] if p["name"] == "link"]
    assert len(links) == 1
    parts = {p["name"]: p for p in links[0]["part"]}
    assert parts["matchResult"]["valueCode"] == "POSSIBLE_MATCH"
    assert "_offset=1" in next(p for p in body["parameter"] if p["name"] == "next")["valueUri"]

    r = await client.post(
        "/Person/$mpi-link",
        json={
            "resourceType": "Parameters",
            "parameter": [
                {"name": "patientA", "valueReference": {"reference": "Patient/a1"}},
                {"name": "patientB", "valueString": "c2"},
                {"name": "actor", "valueString": "dr.who"},
                {"name": "reason", "valueString": "verified"},
            ],
        },
    )
    assert r.status == 200, await r.text()
    person = await r.json()
    assert {lk["target"]["reference"] for lk in person["link"]} == {"Patient/a1", "Patient/b1", "Patient/c2"}
    assert mpi.linked_patient_ids("c2") == ["c2", "a1", "b1"]
    r = await client.get("/Person/$mpi-review-queue")
    assert [p for p in (await r.json())["parameter"] if p["name"] == "link"] == []

    r = await client.post(
        "/Person/$mpi-unlink",
        json={"patient_a": "a1", "patient_b": "c2"},
        headers={"X-Fhirbridge-Actor": "dr.who"},
    )
    assert r.status == 200
    # still joined through b1 (auto MATCH with a1, auto POSSIBLE with c2): the manual link is gone, c2 alone
    assert mpi.linked_patient_ids("c2") == ["c2"]

    r = await client.get("/Person/$mpi-history", params={"id": "Patient/c2"})
    actions = [
        next(p["valueCode"] for p in e["part"] if p["name"] == "action")
        for e in (await r.json())["parameter"]
    ]
    assert "link" in actions and "unlink" in actions


@pytest.mark.parametrize(
    ("path", "payload", "status"),
    [
        ("/Person/$mpi-link", {"patient_a": "a1", "actor": "x"}, 400),
        ("/Person/$mpi-link", {"patient_a": "a1", "patient_b": "zz", "actor": "x"}, 404),
        ("/Person/$mpi-link", [1, 2], 400),
        ("/Person/$mpi-link", {"resourceType": "Parameters", "parameter": 5}, 400),  # a 500 once
        ("/Person/$mpi-link", {"patient_a": "a1", "patient_b": "c\u00002", "actor": "x"}, 400),
        ("/Person/$mpi-unlink", {"patient_a": "a1", "patient_b": "c2", "reason": "x\u0000"}, 400),
    ],
)
async def test_bad_requests(client: Any, path: str, payload: Any, status: int) -> None:
    r = await client.post(path, json=payload)
    assert r.status == status
    assert (await r.json())["resourceType"] == "OperationOutcome"


async def test_conflict_and_bad_params(client: Any, mpi: PersonIndex) -> None:
    mpi.upsert_patients([("org-d", patient("d1", "Bob", "Baptiste", "1975-01-30", "male"))])
    mpi.link("a1", "d1", actor="u")
    mpi.link("d1", "c2", actor="u")
    r = await client.post("/Person/$mpi-unlink", json={"patient_a": "a1", "patient_b": "c2", "actor": "u"})
    assert r.status == 409
    mpi.unlink("d1", "c2", actor="u")  # allowed: now a1 = d1 (manual), c2 apart
    r = await client.post("/Person/$mpi-link", json={"patient_a": "a1", "patient_b": "c2", "actor": "u"})
    assert r.status == 409  # would join the unlinked d1 and c2
    assert "manually unlinked" in str(await r.json())
    r = await client.get("/Person/$mpi-review-queue", params={"_count": "x"})
    assert r.status == 400
    r = await client.get("/Person/$mpi-history")
    assert r.status == 400
    r = await client.post("/Person/$mpi-link", data=b"{not json")
    assert r.status == 400


async def test_merged_person_id_resolves(client: Any, mpi: PersonIndex) -> None:
    mpi.upsert_patients([("org-d", patient("d1", "Bob", "Baptiste", "1975-01-30", "male"))])
    old = person_id_for("d1")
    mpi.link("a1", "d1", actor="u")
    r = await client.get(f"/Person/{old}")
    assert r.status == 200
    assert (await r.json())["id"] == person_id_for("a1")
    assert r.headers["Content-Location"] == f"Person/{person_id_for('a1')}"


async def test_responses_are_valid_fhir(client: Any, mpi: PersonIndex) -> None:
    from fhir.resources.R4B import get_fhir_model_class

    mpi.unlink("a1", "b1", actor="dr.who", reason="checked")
    urls = [
        f"/Person/{person_id_for('a1')}",
        "/Person/$mpi-review-queue?_count=1",
        "/Person/$mpi-history?id=a1",
    ]
    for url in urls:
        body = await (await client.get(url)).json()
        assert body.get("parameter", body.get("link"))  # non-trivial content
        get_fhir_model_class(body["resourceType"]).model_validate(body)


async def test_count_zero_has_no_next_page_and_nul_ids_are_refused(client: Any, mpi: PersonIndex) -> None:
    """``_count=0`` linked to itself as the next page (a client following it looped);
    an id holding U+0000 reached the database (a 500 on PostgreSQL)."""
    r = await client.get("/Person/$mpi-review-queue", params={"_count": "0"})
    assert r.status == 200
    assert [p for p in (await r.json())["parameter"] if p["name"] == "next"] == []
    r = await client.get("/Person/$mpi-history", params={"id": "Patient/a\u00001"})
    assert r.status == 400 and "NUL" in await r.text()
    r = await client.get("/Person/a%001")
    assert r.status == 404  # the route's id pattern does not match it
