"""``GET /{type}/{id}``: one indexed resource, as stored."""

from __future__ import annotations

from aiohttp import web

from bridge.service.auth.marks import PATH_TYPE, needs
from bridge.service.context import run_db
from bridge.service.http import FhirHTTPError, fhir_response

routes = web.RouteTableDef()


@routes.get(r"/{type:[A-Z][A-Za-z]+}/{id:[A-Za-z0-9\-\.]{1,64}}")
@needs(PATH_TYPE, "r")
async def read_resource(request: web.Request) -> web.Response:
    """One resource of the index."""
    rtype, rid = request.match_info["type"], request.match_info["id"]
    resource = await run_db(request, lambda be: be.index().get(rtype, rid))
    if resource is None:
        raise FhirHTTPError(404, "not-found", f"{rtype}/{rid} is not known")
    return fhir_response(resource)
