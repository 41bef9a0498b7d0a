"""Every request carries an identity and a scope, checked before any data is read (issue 21).

The service runs with its real authorization: tokens are signed with the embedded issuer's key
(tests/support/auth.py) and verified as the token endpoint's are. Patients a1 and b1 are one person
(MPI MATCH); c2 is only a POSSIBLE_MATCH of them, so a ``patient/`` token of a1 never reaches c2.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from bridge.config import Settings
from bridge.service.app import create_app
from bridge.service.auth.marks import PUBLIC, mark_of
from bridge.service.context import Backend
from bridge.stores.index.store import IncomingBundle, IndexStore
from bridge.stores.mpi import PersonIndex
from tests.support.auth import bearer, token

LOINC = "http://loinc.org"
OBS_CAT = "http://terminology.hl7.org/CodeSystem/observation-category"


def _patient(pid: str, ssn: str | None, street: str, city: str, postal: str) -> dict[str, Any]:
    p: dict[str, Any] = {
        "resourceType": "Patient",
        "id": pid,
        "name": [{"family": "Andersen", "given": ["Alice"]}],
        "birthDate": "1980-04-12",
        "gender": "female",
        "address": [{"line": [street], "city": city, "postalCode": postal}],
    }
    if ssn:
        p["identifier"] = [{"system": "http://hl7.org/fhir/sid/us-ssn", "value": ssn}]
    return p


A = _patient("a1", "123456789", "12 Elm Street", "Metro", "12345")
B = _patient("b1", "123456789", "12 Elm St", "Metro", "12345")
C = {k: v for k, v in _patient("c2", None, "400 Harbour View", "Portside", "99999").items() if k != "gender"}


def _obs(oid: str, pid: str, category: str, code: str) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": oid,
        "status": "final",
        "subject": {"reference": f"Patient/{pid}"},
        "category": [{"coding": [{"system": OBS_CAT, "code": category}]}],
        "code": {"coding": [{"system": LOINC, "code": code}]},
        "effectiveDateTime": "2026-01-10T08:00:00Z",
    }


RESOURCES = [
    A,
    B,
    C,
    _obs("lab-a", "a1", "laboratory", "2345-7"),
    _obs("vital-b", "b1", "vital-signs", "8480-6"),
    _obs("lab-c", "c2", "laboratory", "2345-7"),
    {"resourceType": "Condition", "id": "cond-a", "subject": {"reference": "Patient/a1"}},
]


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[tuple[TestClient, Settings, PersonIndex]]:
    settings = Settings.from_env({"FHIRBRIDGE_DATA_DIR": str(tmp_path)})
    store = IndexStore.open(settings.stores.index_url)
    store.apply(
        [
            IncomingBundle(
                {"resourceType": "Bundle", "entry": [{"resource": r} for r in RESOURCES]},
                "h1",
                "st-mary",
                "k",
                "t",
                0,
                0,
                "2026-01-11T00:00:00.000Z",
            )
        ]
    )
    store.close()
    mpi = PersonIndex.open(settings.stores.mpi_url)
    mpi.upsert_patients([("org-a", A), ("org-b", B), ("org-c", C)])
    assert mpi.linked_patient_ids("a1") == ["a1", "b1"] and mpi.linked_patient_ids("c2") == ["c2"]
    backend = Backend(settings, mpi_factory=lambda: mpi)
    async with TestClient(TestServer(create_app(settings, backend))) as client:
        yield client, settings, mpi
    mpi.close()


def _ids(bundle: dict[str, Any]) -> set[str]:
    return {
        e["resource"]["id"] for e in bundle.get("entry", []) if e.get("search", {}).get("mode") == "match"
    }


async def test_no_token_is_401_on_every_protected_route(service: Any) -> None:
    client, _settings, _ = service
    app: web.Application = client.app
    protected = []
    for route in app.router.routes():
        if mark_of(route.handler) == PUBLIC or route.method == "HEAD":
            continue
        info = route.resource.get_info() if route.resource else {}
        path = info.get("path") or info.get("formatter", "")
        path = path.replace("{type}", "Patient").replace("{id}", "a1")
        protected.append((route.method, path.split("{")[0] + ("x" if "{" in path else "")))
    assert {p for _, p in protected} >= {
        "/Patient",
        "/Patient/a1/$everything",
        "/metrics",
        "/Person/$mpi-link",
    }
    for method, path in protected:
        r = await client.request(method, path)
        assert r.status == 401, (method, path)
        assert r.headers["WWW-Authenticate"].startswith('Bearer realm="fhirbridge", error="invalid_token"')
        assert (await r.json())["resourceType"] == "OperationOutcome"


@pytest.mark.parametrize(
    "public", ["/metadata", "/.well-known/smart-configuration", "/openapi.json", "/auth/jwks"]
)
async def test_public_routes_need_no_token(service: Any, public: str) -> None:
    client, _, _ = service
    assert (await client.get(public)).status == 200


def _forge(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> str:
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    return ".".join([b64(json.dumps(header).encode()), b64(json.dumps(claims).encode()), b64(signature)])


async def test_bad_tokens_are_401(service: Any) -> None:
    client, settings, _ = service
    good = token(settings)
    claims = json.loads(base64.urlsafe_b64decode(good.split(".")[1] + "=="))
    cases = {
        "expired": token(settings, issued_at=1_700_000_000, lifetime=300),
        "wrong audience": token(settings, audience="https://elsewhere.example/fhir"),
        "alg none": _forge({"alg": "none", "typ": "at+jwt"}, claims),
        "unknown issuer": _forge({"alg": "ES256", "kid": "x"}, {**claims, "iss": "https://evil.example"}),
        "tampered": good[:-4] + ("AAAA" if not good.endswith("AAAA") else "BBBB"),
        "not a token": "hello",
    }
    for what, bad in cases.items():
        r = await client.get(
            "/Patient", params={"name": "andersen"}, headers={"Authorization": f"Bearer {bad}"}
        )
        assert r.status == 401, what
        assert 'error="invalid_token"' in r.headers["WWW-Authenticate"], what
    assert (
        await client.get("/Patient", params={"name": "andersen"}, headers={"Authorization": f"Bearer {good}"})
    ).status == 200


async def test_a_patient_token_reaches_its_person_only_and_says_nothing_about_others(service: Any) -> None:
    client, settings, _ = service
    h = bearer(settings, "patient/*.rs", patient="a1")
    r = await client.get("/Patient/a1/$everything", headers=h)
    assert r.status == 200
    assert _ids(await r.json()) == {"a1", "b1", "lab-a", "vital-b", "cond-a"}  # b1 is the same person
    refusals = []
    for other in ("c2", "no-such-patient"):  # a POSSIBLE_MATCH, and a patient that does not exist
        r = await client.get(f"/Patient/{other}/$everything", headers=h)
        refusals.append((r.status, await r.text()))
        r = await client.get(f"/Patient/{other}", headers=h)
        refusals.append((r.status, await r.text()))
    assert {s for s, _ in refusals} == {403}
    assert len({body for _, body in refusals}) == 1  # the same answer, whether the patient exists or not
    # another patient's resources read as absent, like resources that do not exist
    assert (await client.get("/Observation/lab-c", headers=h)).status == 404
    assert (await client.get("/Observation/lab-a", headers=h)).status == 200
    r = await client.get("/Patient", params={"name": "andersen"}, headers=h)
    assert {e["resource"]["id"] for e in (await r.json())["entry"]} == {"a1", "b1"}


async def test_a_type_scope_limits_everything_to_that_type(service: Any) -> None:
    client, settings, _ = service
    r = await client.get(
        "/Patient/a1/$everything", headers=bearer(settings, "patient/Observation.rs", patient="a1")
    )
    assert r.status == 200
    assert _ids(await r.json()) == {"lab-a", "vital-b"}


async def test_category_narrowing_hides_vital_signs(service: Any) -> None:
    client, settings, _ = service
    h = bearer(settings, "patient/Observation.rs?category=laboratory", patient="a1")
    r = await client.get("/Patient/a1/$everything", headers=h)
    assert _ids(await r.json()) == {"lab-a"}
    assert (await client.get("/Observation/lab-a", headers=h)).status == 200
    r = await client.get("/Observation/vital-b", headers=h)
    assert r.status == 403 and 'error="insufficient_scope"' in r.headers["WWW-Authenticate"]


async def test_a_patient_token_without_a_known_patient_is_401(service: Any) -> None:
    client, settings, _ = service
    for h in (bearer(settings, "patient/*.rs"), bearer(settings, "patient/*.rs", patient="nobody")):
        r = await client.get("/Patient/a1/$everything", headers=h)
        assert r.status == 401


async def test_mpi_decisions_need_a_user_scope_and_name_the_token_subject(service: Any) -> None:
    client, settings, mpi = service
    body = {"patientA": "a1", "patientB": "c2", "actor": "someone-else", "reason": "same person, checked"}
    r = await client.post(
        "/Person/$mpi-link", json=body, headers=bearer(settings, "patient/*.rs", patient="a1")
    )
    assert r.status == 403 and 'error="insufficient_scope"' in r.headers["WWW-Authenticate"]
    r = await client.post("/Person/$mpi-link", json=body, headers=bearer(settings, "user/Person.rs"))
    assert r.status == 403  # reading the MPI is not deciding for it
    assert mpi.linked_patient_ids("c2") == ["c2"]
    r = await client.post(
        "/Person/$mpi-link", json=body, headers=bearer(settings, "user/Person.u", subject="steward-7")
    )
    assert r.status == 200, await r.text()
    history = mpi.history("c2")
    issuer = f"{settings.http.fhir_base()}/auth"
    assert any(e.get("actor") == f"{issuer}|steward-7" for e in history)
    assert not any(e.get("actor") == "someone-else" for e in history)
