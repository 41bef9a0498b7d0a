"""Who has seen my record: ``GET /Patient/{id}/$access-log`` and ``GET /AuditEvent?patient=|agent=``.

Both answer a FHIR Bundle of the stored AuditEvents (docs/audit.md), newest first, each entry with its
place in the audit log: ``leafIndex``, ``leafHash`` and the RFC 9162 inclusion proof (``proofHash``, leaf
upwards) against the latest signed checkpoint of the audit log, which the Bundle carries once in
``meta``; an event the checkpoint does not cover yet says ``pending``. ``_count`` and the ``next`` link
page through them.

``$access-log`` covers the person: every record the MPI links to the patient by MATCH. The patient's own
``patient/`` token may read it, and a ``user/`` token with ``AuditEvent.r``; a patient never sees another
patient's log (the same refusal whether that patient exists or not).
"""

from __future__ import annotations

import uuid
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from bridge.service.audit.access_log import AccessLogEntry, prove_rows
from bridge.service.audit.middleware import note, open_patient_operation
from bridge.service.auth.marks import needs
from bridge.service.auth.middleware import access_of
from bridge.service.context import Backend, base_url, run_db
from bridge.service.fhir.everything import CHECKPOINT_EXT
from bridge.service.http import FhirHTTPError, check_query, fhir_response, int_param

routes = web.RouteTableDef()

PROOF_EXT = "https://fhirbridge.dev/fhir/StructureDefinition/audit-log-proof"
DEFAULT_COUNT = 50
MAX_COUNT = 500


def _page(
    be: Backend, column: str, values: list[str], count: int, after: int | None
) -> tuple[list[tuple[AccessLogEntry, dict[str, Any]]], str | None, bool]:
    """The newest ``count`` events naming any of ``values`` (before ``after``), proven against the
    latest checkpoint: (entry, event) pairs, the checkpoint, and whether the page is full."""
    store = be.audit()
    fetch = store.for_patient if column == "patient" else store.for_agent
    rows = [r for v in values for r in fetch(v, limit=count, after=after, descending=True)]
    rows = sorted({r.seq: r for r in rows}.values(), key=lambda r: -r.seq)[:count]
    entries, checkpoint, _size = prove_rows(rows, be.audit_log())
    return [(e, r.event()) for e, r in zip(entries, rows, strict=True)], checkpoint, len(rows) == count


def _entry(e: AccessLogEntry, event: dict[str, Any], base: str) -> dict[str, Any]:
    sub: list[dict[str, Any]] = [
        {"url": "leafHash", "valueBase64Binary": e.leaf_hash},
        {"url": "sha256", "valueString": e.sha256},
    ]
    if e.leaf_index is not None:
        sub.insert(0, {"url": "leafIndex", "valueInteger": e.leaf_index})
    if e.proof is None:
        sub.append({"url": "pending", "valueBoolean": True})
    else:
        sub += [{"url": "proofHash", "valueBase64Binary": h} for h in e.proof]
    return {
        "fullUrl": f"{base}/AuditEvent/{e.event_id}",
        "resource": event,
        "search": {"mode": "match"},
        "extension": [{"url": PROOF_EXT, "extension": sub}],
    }


async def _bundle(
    request: web.Request, column: str, values: list[str], self_path: str, query: dict[str, str]
) -> dict[str, Any]:
    count = int_param(request, "_count", DEFAULT_COUNT, 1, MAX_COUNT)
    after = int_param(request, "_after", 0, 1, 2**62) if "_after" in request.query else None
    page, checkpoint, full = await run_db(request, _page, column, values, count, after)
    base = base_url(request)
    links = [{"relation": "self", "url": f"{base}{self_path}?{urlencode({**query, '_count': count})}"}]
    if full and page:
        nxt = {**query, "_count": count, "_after": page[-1][0].seq}
        links.append({"relation": "next", "url": f"{base}{self_path}?{urlencode(nxt)}"})
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "type": "searchset",
        "link": links,
        "entry": [_entry(e, event, base) for e, event in page],
    }
    if checkpoint is not None:
        bundle["meta"] = {"extension": [{"url": CHECKPOINT_EXT, "valueString": checkpoint}]}
    return bundle


def _linked(be: Backend, patient_id: str) -> list[str]:
    mpi = be.mpi()
    return mpi.linked_patient_ids(patient_id) if mpi is not None else [patient_id]


@routes.get(r"/Patient/{id}/$access-log")
@needs("AuditEvent", "r", contexts=("patient", "user"))
async def patient_access_log(request: web.Request) -> web.Response:
    """Who read the patient's record (the person's, across MATCH-linked records), when, why, and what."""
    pid = open_patient_operation(request, {"_count", "_after"}, "AuditEvent", "r")
    linked = await run_db(request, _linked, pid)
    bundle = await _bundle(request, "patient", linked, f"/Patient/{pid}/$access-log", {})
    note(request, "operation", "E", patients=[pid], touched={"AuditEvent": len(bundle["entry"])})
    return fhir_response(bundle)


@routes.get("/AuditEvent")
@needs("AuditEvent", "s", contexts=("patient", "user"))
async def search_audit_events(request: web.Request) -> web.Response:
    """``AuditEvent?patient=<id>`` (the events naming that record) or ``AuditEvent?agent=<issuer|subject>``."""
    check_query(request, {"patient", "agent", "_count", "_after", "_format"})
    patient = request.query.get("patient", "").removeprefix("Patient/")
    agent = request.query.get("agent", "")
    if bool(patient) == bool(agent):
        raise FhirHTTPError(400, "required", "give exactly one of patient=<id> or agent=<issuer|subject>")
    access = access_of(request)
    if patient:
        note(request, "search-type", "E", patients=[patient])
        if access is not None:
            access.require_patient(patient, "AuditEvent", "s")
        bundle = await _bundle(request, "patient", [patient], "/AuditEvent", {"patient": patient})
        note(request, "search-type", "E", patients=[patient], touched={"AuditEvent": len(bundle["entry"])})
    else:
        note(request, "search-type", "E")
        if access is not None and access.grant("AuditEvent", "s")[1]:
            raise FhirHTTPError(
                403, "forbidden", "a patient/ token searches its own record's events by patient="
            )
        bundle = await _bundle(request, "agent", [agent], "/AuditEvent", {"agent": agent})
        note(request, "search-type", "E", touched={"AuditEvent": len(bundle["entry"])})
    return fhir_response(bundle)
