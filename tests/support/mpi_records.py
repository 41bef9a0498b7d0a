"""Three Patient records for the web app's MPI tests: a1 and b1 MATCH (same SSN, the same address
written two ways), c2 a possible match of their person (the records of
tests/unit/bridge/service/auth/test_authorization.py), with Conditions and the bundles that carry them."""

from __future__ import annotations

from typing import Any

from bridge.stores.index.store import IncomingBundle


def patient(
    pid: str, ssn: str | None, street: str, city: str, postal: str, *, org: str | None = None
) -> dict[str, Any]:
    """Alice Andersen's record at one address (``org``: the sending organisation, as ``meta.source``)."""
    p: dict[str, Any] = {
        "resourceType": "Patient",
        "id": pid,
        **({"meta": {"source": f"urn:fhirbridge:{org}"}} if org else {}),
        "name": [{"family": "Andersen", "given": ["Alice"]}],
        "birthDate": "1980-04-12",
        "gender": "female",
        "address": [{"line": [street], "city": city, "postalCode": postal}],
    }
    if ssn:
        p["identifier"] = [{"system": "http://hl7.org/fhir/sid/us-ssn", "value": ssn}]
    return p


A = patient("a1", "123456789", "12 Elm Street", "Metro", "12345")
B = patient("b1", "123456789", "12 Elm St", "Metro", "12345")
C = {k: v for k, v in patient("c2", None, "400 Harbour View", "Portside", "99999").items() if k != "gender"}


def condition(cid: str, pid: str, text: str) -> dict[str, Any]:
    return {
        "resourceType": "Condition",
        "id": cid,
        "subject": {"reference": f"Patient/{pid}"},
        "code": {"text": text},
    }


def bundle(sha: str, org: str, resources: list[dict[str, Any]]) -> IncomingBundle:
    return IncomingBundle(
        {"resourceType": "Bundle", "entry": [{"resource": r} for r in resources]},
        sha,
        org,
        f"{org}|1",
        "t",
        0,
        0,
        "2026-01-11T00:00:00.000Z",
    )
