"""SMART's Python client (``fhirclient``, whose models are generated from the FHIR R4 4.0.1
StructureDefinitions and refuse, with ``strict=True``, any element R4 does not define or a value of the
wrong type): it reads the CapabilityStatement, finds the SMART endpoints there, and every resource of a
search and of ``$everything`` parses strictly as the class its ``resourceType`` names."""

from __future__ import annotations

from typing import Any

import pytest

from tests.clients import labdata
from tests.clients.stack import ClientStack

pytestmark = pytest.mark.clients


def _server(stack: ClientStack, token: str) -> Any:
    from fhirclient import client
    from fhirclient.auth import FHIROAuth2Auth

    smart = client.FHIRClient(settings={"app_id": "fhirbridge-interop", "api_base": stack.base + "/"})
    server = smart.server
    server.prepare()
    assert isinstance(server.auth, FHIROAuth2Auth), (
        f"the CapabilityStatement's SMART oauth-uris extension was not found (auth: {server.auth!r})"
    )
    server.auth.access_token = token
    assert server.ready
    return server


def _strict(resource: dict[str, Any]) -> Any:
    """Parse ``resource`` strictly as the R4 class its resourceType names; fails on an unknown type."""
    from fhirclient.models.fhirelementfactory import FHIRElementFactory

    empty = FHIRElementFactory.instantiate(resource["resourceType"], None)
    assert type(empty).__name__ == resource["resourceType"], (
        f"{resource['resourceType']} is not an R4 resource type"
    )
    return type(empty)(resource, strict=True)


def test_prepare_reads_the_capability_statement_and_the_smart_endpoints(stack: ClientStack) -> None:
    server = _server(stack, stack.system_token())
    cs = server.capabilityStatement  # parsed strictly by fhirclient (CapabilityStatement.read_from)
    assert cs.fhirVersion == "4.0.1"
    assert server.auth._token_uri == f"{stack.base}/auth/token"
    assert server.auth._authorize_uri == f"{stack.base}/auth/authorize"
    resources = {r.type: r for r in cs.rest[0].resource}
    observation = resources.get("Observation")
    assert observation is not None, f"Observation not in the CapabilityStatement: {sorted(resources)}"
    assert "search-type" in {i.code for i in observation.interaction}
    params = {p.name for p in observation.searchParam or []}
    assert {"patient", "code", "date"} <= params, f"Observation search parameters: {sorted(params)}"


def test_search_resources_parse_strictly_as_r4(stack: ClientStack) -> None:
    from fhirclient.models.observation import Observation

    server = _server(stack, stack.system_token())
    search = Observation.where(struct={"patient": stack.patient_id, "_count": "25", "_total": "accurate"})
    bundles = list(search.perform_iter(server))  # every page, each Bundle parsed strictly
    assert len(bundles) > 1, "expected a multi-page search"
    resources = [e.resource for b in bundles for e in b.entry or []]
    observations = [r for r in resources if r.resource_type == "Observation"]
    assert len(observations) >= 2 * len(labdata.INITIAL)
    assert len({r.id for r in observations}) == len(observations)
    assert bundles[0].total == len(observations)
    for r in resources:
        assert type(r).__name__ == r.resource_type  # the Bundle's strict parse made the entry its own class
        _strict(r.as_json())
        assert r.resource_type != "Observation" or r.subject.reference == f"Patient/{stack.patient_id}"


def test_everything_resources_parse_strictly_as_r4(stack: ClientStack) -> None:
    from fhirclient.models.bundle import Bundle

    server = _server(stack, stack.system_token())
    url: str | None = f"Patient/{stack.patient_id}/$everything?_count=50"
    types: dict[str, int] = {}
    total = None
    seen = 0
    while url:
        page = server.request_json(url)
        Bundle(page, strict=True)
        total = page["total"] if total is None else total
        for entry in page.get("entry", []):
            parsed = _strict(entry["resource"])
            if entry.get("search", {}).get("mode") != "outcome":
                types[parsed.resource_type] = types.get(parsed.resource_type, 0) + 1
                seen += 1
        url = next((link["url"] for link in page.get("link", []) if link["relation"] == "next"), None)
    assert seen == total
    assert {"Patient", "Observation", "DiagnosticReport", "ServiceRequest", "Encounter"} <= set(types), types
