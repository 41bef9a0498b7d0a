"""``GET /{type}/{id}``: one indexed resource, as stored."""

from __future__ import annotations

from aiohttp import web

from bridge.metrics import CONSENT_WITHHELD
from bridge.service.audit.middleware import note
from bridge.service.auth.marks import PATH_TYPE, Forbidden, needs
from bridge.service.auth.middleware import access_of
from bridge.service.consent.enforce import Withheld, consent_check, source_org_of
from bridge.service.context import SETTINGS, Backend, base_url, run_db
from bridge.service.http import FhirHTTPError, fhir_response
from bridge.stores.index.rules import patient_of

routes = web.RouteTableDef()


@routes.get(r"/{type:[A-Z][A-Za-z]+}/{id:[A-Za-z0-9\-\.]{1,64}}")
@needs(PATH_TYPE, "r")
async def read_resource(request: web.Request) -> web.Response:
    """One resource of the index."""
    rtype, rid = request.match_info["type"], request.match_info["id"]
    access = access_of(request)
    if access is not None and rtype == "Patient":
        access.require_patient(rid)  # before the read: the same answer whether it exists or not
    check = consent_check(request, access, request.app[SETTINGS], base_url(request))
    resource = await run_db(request, lambda be: be.index().get(rtype, rid))
    unknown = FhirHTTPError(404, "not-found", f"{rtype}/{rid} is not known")
    if resource is None:
        raise unknown
    patient = patient_of(resource)
    patients = [patient] if patient else []
    note(request, "read", "R", patients=patients)  # refused below: nothing touched
    if access is not None:
        limited = rtype != "Patient" and access.grant(rtype, "r")[1]
        if limited and (patient is None or patient not in (access.compartment or ())):
            raise unknown  # outside the compartment reads as absent: no existence oracle
        if not access.permits(resource, "r"):
            raise Forbidden(f"the token's scopes do not grant this {rtype} (a narrowing query excludes it)")
    window = None
    if check is not None and patient is not None:
        gate = await run_db(request, lambda be: check.gate(be, _linked(be, patient)))
        window = gate.window
        if not gate.admits_resource(resource, source_org_of(resource)):
            CONSENT_WITHHELD.inc()
            note(request, "read", "R", patients=patients, window=window)
            raise Withheld()
    note(request, "read", "R", patients=patients, touched={rtype: 1}, window=window)
    return fhir_response(resource)


def _linked(backend: Backend, patient_id: str) -> list[str]:
    """The records the MPI links to ``patient_id`` by MATCH (itself first)."""
    mpi = backend.mpi()
    return mpi.linked_patient_ids(patient_id) if mpi is not None else [patient_id]
