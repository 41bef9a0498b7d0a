"""``GET /{type}/{id}``: one indexed resource, as stored."""

from __future__ import annotations

from aiohttp import web

from bridge.service.auth.marks import PATH_TYPE, Forbidden, needs
from bridge.service.auth.middleware import access_of
from bridge.service.context import run_db
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
    resource = await run_db(request, lambda be: be.index().get(rtype, rid))
    unknown = FhirHTTPError(404, "not-found", f"{rtype}/{rid} is not known")
    if resource is None:
        raise unknown
    if access is not None:
        if rtype != "Patient" and access.grant(rtype, "r")[1]:
            patient = patient_of(resource)
            if patient is None or patient not in (access.compartment or ()):
                raise unknown  # outside the compartment reads as absent: no existence oracle
        if not access.permits(resource, "r"):
            raise Forbidden(f"the token's scopes do not grant this {rtype} (a narrowing query excludes it)")
    return fhir_response(resource)
