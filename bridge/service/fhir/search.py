"""``GET /Patient``: search by identifier, name and birth date (the first 200 matches, a true total)."""

from __future__ import annotations

import uuid
from dataclasses import replace
from typing import Any

from aiohttp import web

from bridge.metrics import CONSENT_WITHHELD
from bridge.service.audit.middleware import note
from bridge.service.auth.marks import needs
from bridge.service.auth.middleware import access_of
from bridge.service.consent.enforce import (
    ConsentCheck,
    ConsentGate,
    consent_check,
    source_org_of,
    suppressed_outcome,
)
from bridge.service.context import SETTINGS, Backend, base_url, stores
from bridge.service.http import (
    FhirHTTPError,
    check_no_nul,
    check_query,
    date_param,
    fhir_response,
    operation_outcome,
)

routes = web.RouteTableDef()

SEARCH_LIMIT = 200  # Patient search returns no more entries than this, and says so (no paging yet)


def _search_patients(
    backend: Backend,
    identifier: str | None,
    name: str | None,
    birthdate: str | None,
    only: frozenset[str] | None = None,
    consent: ConsentCheck | None = None,
) -> tuple[list[dict[str, Any]], int, int]:
    """The first ``SEARCH_LIMIT`` matching Patients, the number of matches (among ``only``, the ids of
    a ``patient/`` token's compartment, when given), and the number the patients' Consents withheld
    from this requester (not counted among the matches)."""
    index = backend.index()
    mpi = backend.mpi()
    gates: dict[str, ConsentGate] = {}  # one gate per person, whichever of their records matched
    withheld = 0

    def admitted(p: dict[str, Any]) -> bool:
        nonlocal withheld
        if consent is None:
            return True
        pid = str(p.get("id"))
        gate = gates.get(pid)
        if gate is None:
            linked = mpi.linked_patient_ids(pid) if mpi is not None else [pid]
            gate = consent.gate(backend, linked)
            gates.update(dict.fromkeys(linked, gate))
        if gate.admits_resource(p, source_org_of(p)):
            return True
        withheld += 1
        return False

    def match(p: dict[str, Any]) -> bool:
        return (only is None or p.get("id") in only) and _matches(p, name, birthdate) and admitted(p)

    if identifier:
        system, sep, value = identifier.partition("|")
        ids = index.patients_by_identifier(system if sep else None, value if sep else identifier)
        patients = [
            p for p in (index.get("Patient", i) for i in ids if only is None or i in only) if p is not None
        ]
        found = [p for p in patients if match(p)]
        return found[:SEARCH_LIMIT], len(found), withheld
    page, total = index.search_patients(name=name, birthdate=birthdate, limit=SEARCH_LIMIT, match=match)
    return page, total, withheld


def _matches(patient: dict[str, Any], name: str | None, birthdate: str | None) -> bool:
    if name:
        needle = name.casefold()
        if not any(needle in s.casefold() for s in _name_strings(patient)):
            return False
    return not birthdate or str(patient.get("birthDate", "")).startswith(birthdate)


def _name_strings(patient: dict[str, Any]) -> list[str]:
    out = []
    for n in patient.get("name") or ():
        out += [n.get("family", ""), *n.get("given", []), n.get("text", "")]
    return [s for s in out if s]


@routes.get("/Patient")
@needs("Patient", "s")
async def patient_search(request: web.Request) -> web.Response:
    """Patients by identifier (``system|value``), name (a case-folded substring) and birth date."""
    supported = {"identifier", "name", "birthdate", "_format"}
    check_query(request, supported)
    check_no_nul(request, supported)
    identifier = request.query.get("identifier")
    name = request.query.get("name")
    birthdate = date_param(request, "birthdate")
    if not (identifier or name or birthdate):
        raise FhirHTTPError(400, "required", "give at least one of identifier, name, birthdate")
    access = access_of(request)
    only = access.compartment if access is not None and access.grant("Patient", "s")[1] else None
    base = base_url(request)
    check = consent_check(request, access, request.app[SETTINGS], base)
    if check is not None and check.reason is not None:
        # the glass is broken for one person, never for whoever a search happens to match: windows
        # already open are honoured, none is opened here
        check = replace(check, reason=None)
    backend = stores(request)
    patients, total, withheld = await backend.run(
        _search_patients, backend, identifier, name, birthdate, only, check
    )
    note(
        request,
        "search-type",
        "E",
        patients=[p["id"] for p in patients],
        touched_by_patient={p["id"]: {"Patient": 1} for p in patients},
    )
    entries: list[dict[str, Any]] = [
        {"fullUrl": f"{base}/Patient/{p['id']}", "resource": p, "search": {"mode": "match"}} for p in patients
    ]
    entries += [
        {
            "resource": operation_outcome(
                "warning", "not-supported", f"search parameter {k!r} is not supported and was ignored"
            ),
            "search": {"mode": "outcome"},
        }
        for k in dict.fromkeys(request.query)
        if k not in supported
    ]
    if withheld:
        CONSENT_WITHHELD.inc(withheld)
        entries.append({"resource": suppressed_outcome(), "search": {"mode": "outcome"}})
    if total > len(patients):
        entries.append(
            {
                "resource": operation_outcome(
                    "warning",
                    "too-costly",
                    f"{total} patients match; only the first {len(patients)} are returned (this search has no paging): "
                    "narrow it with more parameters",
                ),
                "search": {"mode": "outcome"},
            }
        )
    return fhir_response(
        {
            "resourceType": "Bundle",
            "id": str(uuid.uuid4()),
            "type": "searchset",
            "total": total,
            "link": [{"relation": "self", "url": str(request.url)}],
            "entry": entries,
        }
    )
