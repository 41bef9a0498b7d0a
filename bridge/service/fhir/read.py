"""``GET /{type}/{id}`` (read), ``/{type}/{id}/_history`` (its versions) and
``/{type}/{id}/_history/{vid}`` (vread): indexed resources, as stored.

Every version the index received is kept (``meta.versionId`` is the version's content digest, so a
rebuilt index gives the same ids). Reads carry ``ETag: W/"<versionId>"`` and ``Last-Modified``; a read
with ``If-None-Match`` naming the current version is a 304. Each is authorized, checked against the
patient's Consents and audited exactly like a read.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

from aiohttp import web

from bridge.metrics import CONSENT_WITHHELD
from bridge.service.audit.middleware import note
from bridge.service.auth.marks import PATH_TYPE, Forbidden, needs
from bridge.service.auth.middleware import access_of
from bridge.service.consent.enforce import (
    ConsentCheck,
    Withheld,
    consent_check,
    source_org_of,
    suppressed_outcome,
)
from bridge.service.context import SETTINGS, Backend, base_url, run_db
from bridge.service.http import FhirHTTPError, fhir_response
from bridge.stores.breakglass import Window
from bridge.stores.index.rules import patient_of

routes = web.RouteTableDef()


_TYPE = r"{type:[A-Z][A-Za-z]+}"
_ID = r"{id:[A-Za-z0-9\-\.]{1,64}}"


def _before_read(request: web.Request) -> ConsentCheck | None:
    """What is decided before any read: a ``patient/`` token's right to the Patient named by the path
    (the same answer whether it exists or not), and the request's consent check."""
    access = access_of(request)
    if access is not None and request.match_info["type"] == "Patient":
        access.require_patient(request.match_info["id"])
    return consent_check(request, access, request.app[SETTINGS], base_url(request))


async def _decide(
    request: web.Request, resource: dict[str, Any], check: ConsentCheck | None, source_org: str | None = None
) -> tuple[str, str | None, Window | None]:
    """Whether the requester may see ``resource`` (a version of the path's resource): ``ok``, ``absent``
    (outside a ``patient/`` token's compartment: answered as if absent), ``narrowed`` (a narrowing
    scope excludes it) or ``withheld`` (the patient's Consent); with its patient and any open
    break-the-glass window."""
    rtype, rid = request.match_info["type"], request.match_info["id"]
    access = access_of(request)
    patient = patient_of(resource) if rtype != "Patient" else rid
    if access is not None:
        limited = rtype != "Patient" and access.grant(rtype, "r")[1]
        if limited and (patient is None or patient not in (access.compartment or ())):
            return "absent", patient, None
        if not access.permits(resource, "r"):
            return "narrowed", patient, None
    window = None
    if check is not None and patient is not None:
        gate = await run_db(request, lambda be: check.gate(be, _linked(be, patient)))
        window = gate.window
        if not gate.admits_resource(resource, source_org or source_org_of(resource)):
            CONSENT_WITHHELD.inc()
            return "withheld", patient, window
    return "ok", patient, window


async def _checked(
    request: web.Request, resource: dict[str, Any] | None, interaction: str, check: ConsentCheck | None
) -> dict[str, Any]:
    """``resource`` (of the path's type and id) if the requester may see it: 404 when absent or outside a
    ``patient/`` token's compartment, 403 for a narrowing scope that excludes it, 403 ``Withheld`` for
    the patient's Consent; the access is noted for the audit either way."""
    rtype, rid = request.match_info["type"], request.match_info["id"]
    unknown = FhirHTTPError(404, "not-found", f"{rtype}/{rid} is not known")
    if resource is None:
        raise unknown
    verdict, patient, window = await _decide(request, resource, check)
    patients = [patient] if patient else []
    if verdict == "absent":
        note(request, interaction, "R", patients=patients)
        raise unknown  # outside the compartment reads as absent: no existence oracle
    if verdict == "narrowed":
        note(request, interaction, "R", patients=patients)
        raise Forbidden(f"the token's scopes do not grant this {rtype} (a narrowing query excludes it)")
    if verdict == "withheld":
        note(request, interaction, "R", patients=patients, window=window)
        raise Withheld()
    note(request, interaction, "R", patients=patients, touched={rtype: 1}, window=window)
    return resource


def _version_headers(resource: dict[str, Any]) -> dict[str, str]:
    meta = resource.get("meta") or {}
    headers = {}
    if meta.get("versionId"):
        headers["ETag"] = f'W/"{meta["versionId"]}"'
    updated = meta.get("lastUpdated")
    if isinstance(updated, str):
        try:
            when = datetime.fromisoformat(updated.replace("Z", "+00:00"))
            headers["Last-Modified"] = format_datetime(when.astimezone(UTC), usegmt=True)
        except ValueError:
            pass
    return headers


def _not_modified(request: web.Request, headers: dict[str, str]) -> bool:
    """Whether ``If-None-Match`` names the version about to be returned (weak comparison)."""
    wanted = request.headers.get("If-None-Match")
    etag = headers.get("ETag")
    if not wanted or not etag:
        return False
    tags = {t.strip().removeprefix("W/") for t in wanted.split(",")}
    return "*" in tags or etag.removeprefix("W/") in tags


@routes.get(f"/{_TYPE}/{_ID}")
@needs(PATH_TYPE, "r")
async def read_resource(request: web.Request) -> web.Response:
    """One resource of the index (its current version)."""
    rtype, rid = request.match_info["type"], request.match_info["id"]
    check = _before_read(request)
    resource = await _checked(
        request, await run_db(request, lambda be: be.index().get(rtype, rid)), "read", check
    )
    headers = _version_headers(resource)
    if _not_modified(request, headers):
        return web.Response(status=304, headers=headers)
    return fhir_response(resource, headers=headers)


@routes.get(f"/{_TYPE}/{_ID}/_history/{{vid:[A-Za-z0-9\\-\\.]{{1,64}}}}")
@needs(PATH_TYPE, "r")
async def vread_resource(request: web.Request) -> web.Response:
    """One version of a resource (``meta.versionId``), current or earlier."""
    rtype, rid, vid = request.match_info["type"], request.match_info["id"], request.match_info["vid"]
    check = _before_read(request)
    found = await run_db(request, lambda be: be.index().version(rtype, rid, vid))
    if found is None:
        # whether the resource exists is told only to who may see it: no existence oracle
        await _checked(request, await run_db(request, lambda be: be.index().get(rtype, rid)), "vread", check)
        raise FhirHTTPError(404, "not-found", f"{rtype}/{rid} has no version {vid!r}")
    resource = await _checked(request, found, "vread", check)
    headers = _version_headers(resource)
    if _not_modified(request, headers):
        return web.Response(status=304, headers=headers)
    return fhir_response(resource, headers=headers)


@routes.get(f"/{_TYPE}/{_ID}/_history")
@needs(PATH_TYPE, "r")
async def resource_history(request: web.Request) -> web.Response:
    """Every version of a resource the index received, newest first (a ``history`` Bundle)."""
    rtype, rid = request.match_info["type"], request.match_info["id"]
    check = _before_read(request)
    current = await run_db(request, lambda be: be.index().get(rtype, rid))
    await _checked(request, current, "history-instance", check)  # who may see the resource, first
    versions = await run_db(request, lambda be: be.index().versions(rtype, rid))
    # then each version on its own: an earlier one may belong to another patient, or have come from an
    # organisation the patient's Consent withholds
    shown, patients, withheld, window = [], set(), 0, None
    for v in versions:
        verdict, patient, opened = await _decide(request, v["resource"], check, v["source_org"])
        window = window or opened
        if verdict == "ok":
            shown.append(v)
            if patient:
                patients.add(patient)
        elif verdict == "withheld":
            withheld += 1
    note(
        request,
        "history-instance",
        "R",
        patients=sorted(patients),
        touched_by_patient={
            p: {rtype: sum(1 for v in shown if _owner(v["resource"], rtype, rid) == p)} for p in patients
        },
        window=window,
    )
    base = base_url(request)
    entries: list[dict[str, Any]] = [
        {
            "fullUrl": f"{base}/{rtype}/{rid}",
            "resource": v["resource"],
            "request": {"method": "PUT", "url": f"{rtype}/{rid}"},
            "response": {
                "status": "200",
                "etag": f'W/"{v["resource"]["meta"]["versionId"]}"',
                "lastModified": v["resource"]["meta"].get("lastUpdated"),
            },
        }
        for v in shown
        if isinstance(v["resource"].get("meta"), dict) and v["resource"]["meta"].get("versionId")
    ]
    total = len(entries)
    if withheld:  # said, never what or why (FHIR's break-the-glass hint)
        entries.append(
            {
                "request": {"method": "GET", "url": f"{rtype}/{rid}/_history"},
                "response": {"status": "403 Forbidden", "outcome": suppressed_outcome()},
            }
        )
    return fhir_response(
        {
            "resourceType": "Bundle",
            "id": str(uuid.uuid4()),
            "type": "history",
            "total": total,
            "link": [{"relation": "self", "url": f"{base}/{rtype}/{rid}/_history"}],
            "entry": entries,
        }
    )


def _owner(resource: dict[str, Any], rtype: str, rid: str) -> str | None:
    return rid if rtype == "Patient" else patient_of(resource)


def _linked(backend: Backend, patient_id: str) -> list[str]:
    """The records the MPI links to ``patient_id`` by MATCH (itself first)."""
    mpi = backend.mpi()
    return mpi.linked_patient_ids(patient_id) if mpi is not None else [patient_id]
