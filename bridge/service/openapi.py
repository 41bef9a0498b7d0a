"""An OpenAPI 3.1 document for every HTTP endpoint, built from the app's routes (``GET /openapi.json``)."""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web

from bridge import __version__
from bridge.service.auth.marks import public
from bridge.service.http import json_response

DESCRIPTIONS: dict[tuple[str, str], str] = {
    ("GET", "/metadata"): "FHIR R4 CapabilityStatement.",
    ("GET", "/metrics"): "Prometheus metrics.",
    ("GET", "/{type}"): "FHIR R4 search on any stored type: the parameters /metadata lists, prefixes, "
    "modifiers, _sort, _count, _total, _summary, _elements, _include, _revinclude; paging by _cursor.",
    ("POST", "/{type}/_search"): "The same search, its parameters in an x-www-form-urlencoded body.",
    ("GET", "/Observation/$lastn"): "The newest max Observations of each code for one person (patient=).",
    (
        "GET",
        "/Patient/{id}/$everything",
    ): "Merged cross-provider history: start, end, _since, _type, _count, _proof; paging by _cursor.",
    ("GET", "/{type}/{id}"): "Read one indexed resource (ETag, Last-Modified; If-None-Match gives 304).",
    ("GET", "/{type}/{id}/_history"): "Every version of a resource the index received, newest first.",
    ("GET", "/{type}/{id}/_history/{vid}"): "One version of a resource (vread).",
    ("GET", "/ledger/checkpoint"): "Latest signed checkpoint (C2SP signed note, text/plain).",
    ("GET", "/ledger/entries/{index}"): "One ledger entry.",
    ("GET", "/ledger/proof/inclusion"): "RFC 9162 inclusion proof (leaf_hash or index, size).",
    ("GET", "/ledger/proof/consistency"): "RFC 9162 consistency proof (from, to).",
    ("GET", "/Person/{id}"): "A linked person: member patients with link states and scores.",
    (
        "GET",
        "/Person/$mpi-explain",
    ): "Why two Patient records (a=, b=) match or not: per field both values, the agreement level and "
    "its weight; the weight's terms in the matcher's order, the thresholds, the decision, the link state.",
    ("PUT", "/Consent/{id}"): "Create or replace a privacy Consent (the patient's own token or a registrar).",
    ("GET", "/Consent"): "The patient's current Consents (patient=).",
    ("GET", "/Consent/{id}/_history"): "Every version of a Consent, with its bundle and ledger leaf.",
    (
        "GET",
        "/Patient/{id}/$consent-decision",
    ): "Whether the patient's Consents let an actor read their record for a purpose, and why.",
    (
        "GET",
        "/Patient/{id}/$access-log",
    ): "Who has seen the patient's record, each access provable against the audit log.",
    ("GET", "/AuditEvent"): "AuditEvents by patient= or agent=, with inclusion proofs.",
    ("GET", "/$export"): "Bulk Data 2.0 system-level export (Prefer: respond-async; _type, _since, "
    "_outputFormat, _typeFilter): 202 and Content-Location of the status URL.",
    ("GET", "/Patient/$export"): "Bulk Data 2.0 export of every patient's compartment (as /$export).",
    ("GET", "/Group/{id}/$export"): "Bulk Data 2.0 export of a group's patients and their linked records.",
    (
        "GET",
        "/_bulk/{job}",
    ): "An export's status: 202 with X-Progress while it runs, the manifest when complete.",
    ("DELETE", "/_bulk/{job}"): "Cancel an export and delete its files.",
    ("GET", "/_bulk/{job}/{file}"): "One NDJSON file of a complete export (application/fhir+ndjson).",
    ("GET", "/Group"): "The groups that may be exported: one per source organisation, and the defined ones.",
    ("GET", "/Group/{id}"): "A group: a source organisation's (its size) or a defined one (its members).",
}


def build_openapi(app: web.Application) -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("path") or info.get("formatter")
        if not path or route.method == "HEAD":
            continue
        path = re.sub(r"\{(\w+):[^}]+\}", r"{\1}", path)
        params = [
            {"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
            for p in re.findall(r"\{(\w+)\}", path)
        ]
        op: dict[str, Any] = {
            "summary": DESCRIPTIONS.get(
                (route.method, path), (route.handler.__doc__ or "").strip().split("\n")[0]
            ),
            "responses": {
                "200": {"description": "OK"},
                "4XX": {"description": "OperationOutcome", "content": {"application/fhir+json": {}}},
            },
        }
        if params:
            op["parameters"] = params
        paths.setdefault(path, {})[route.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "fhirbridge query service", "version": __version__},
        "paths": dict(sorted(paths.items())),
    }


routes = web.RouteTableDef()


@routes.get("/openapi.json")
@public
async def openapi_json(request: web.Request) -> web.Response:
    """This service's OpenAPI document."""
    return json_response(build_openapi(request.app))
