"""The service's R4 CapabilityStatement (``GET /metadata``)."""

from __future__ import annotations

from typing import Any

from bridge import __version__
from bridge.service.fhir import searchparams as sp
from bridge.service.fhir.search import search_types


#: the operations of types the search registry also lists (merged into their generated entries)
def _operations(base: str) -> dict[str, list[dict[str, str]]]:
    return {
        "Patient": [
            {
                "name": "everything",
                "definition": "http://hl7.org/fhir/OperationDefinition/Patient-everything",
            },
            {
                "name": "consent-decision",
                "definition": f"{base}/openapi.json#/paths/~1Patient~1{{id}}~1$consent-decision",
            },
            {
                "name": "access-log",
                "definition": f"{base}/openapi.json#/paths/~1Patient~1{{id}}~1$access-log",
            },
            {
                "name": "export",
                "definition": "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/patient-export",
            },
        ],
        "Observation": [
            {"name": "lastn", "definition": "http://hl7.org/fhir/OperationDefinition/Observation-lastn"}
        ],
    }


def _searched(base: str) -> list[dict[str, Any]]:
    """One entry per searchable type, generated from the search parameter registry (so that it never
    claims a parameter the server does not search), with the interactions every stored type has."""
    ops = _operations(base)
    out = []
    for rtype in search_types():
        params = sp.params_of(rtype)
        entry: dict[str, Any] = {
            "type": rtype,
            "versioning": "versioned",
            "readHistory": True,
            "interaction": [
                {"code": "read"},
                {"code": "vread"},
                {"code": "history-instance"},
                {"code": "search-type"},
            ],
            "searchInclude": sorted(
                ["*", *(f"{rtype}:{p.name}" for p in params.values() if p.type == "reference")]
            ),
            "searchRevInclude": ["Provenance:target"],
            "searchParam": [
                {
                    "name": p.name,
                    "type": p.type,
                    **({"documentation": p.documentation} if p.documentation else {}),
                }
                for p in params.values()
            ],
        }
        if rtype in ops:
            entry["operation"] = ops[rtype]
        out.append(entry)
    return out


def capability_statement(base: str, issuer: str | None = None) -> dict[str, Any]:
    """The CapabilityStatement of the service at ``base``; ``issuer`` is the embedded authorization
    server's (the SMART security service and its OAuth URIs are declared for it)."""
    issuer = issuer or f"{base}/auth"
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026-11-24",
        "kind": "instance",
        "software": {"name": "fhirbridge", "version": __version__},
        "implementation": {"description": "fhirbridge query service", "url": base},
        "instantiates": ["http://hl7.org/fhir/uv/bulkdata/CapabilityStatement/bulk-data"],
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "json"],
        "rest": [
            {
                "mode": "server",
                "documentation": "Merged, de-duplicated, provable cross-provider histories. See /openapi.json.",
                "security": {
                    "cors": False,
                    "service": [
                        {
                            "coding": [
                                {
                                    "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                                    "code": "SMART-on-FHIR",
                                }
                            ],
                            "text": "OAuth2 using SMART-on-FHIR profile (see /.well-known/smart-configuration)",
                        }
                    ],
                    "extension": [
                        {
                            "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
                            "extension": [
                                {"url": "token", "valueUri": f"{issuer}/token"},
                                {"url": "authorize", "valueUri": f"{issuer}/authorize"},
                            ],
                        }
                    ],
                    "description": "Every request but /metadata, /.well-known/*, /openapi.json and the ledger's "
                    "public reads needs a Bearer access token (SMART App Launch 2.2 scopes).",
                },
                "operation": [
                    {
                        "name": "export",
                        "definition": "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/export",
                    }
                ],
                "resource": [
                    {
                        "type": "Consent",
                        "documentation": "Privacy Consents (scope patient-privacy), enforced on every read "
                        "(docs/consent.md). Every version is kept; each is in the ledger.",
                        "versioning": "versioned",
                        "interaction": [
                            {"code": "read"},
                            {"code": "update"},
                            {"code": "search-type"},
                            {"code": "history-instance"},
                        ],
                        "updateCreate": True,
                        "searchParam": [{"name": "patient", "type": "reference"}],
                    },
                    {
                        "type": "AuditEvent",
                        "documentation": "IHE BALP AuditEvents of every access, each provable against the "
                        "audit log's signed checkpoint (docs/audit.md).",
                        "interaction": [{"code": "search-type"}],
                        "searchParam": [
                            {"name": "patient", "type": "reference"},
                            {"name": "agent", "type": "token"},
                        ],
                    },
                    {
                        "type": "Person",
                        "interaction": [{"code": "read"}],
                        "operation": [
                            {
                                "name": "mpi-review-queue",
                                "definition": f"{base}/openapi.json#/paths/~1Person~1$mpi-review-queue",
                            },
                            {
                                "name": "mpi-link",
                                "definition": f"{base}/openapi.json#/paths/~1Person~1$mpi-link",
                            },
                            {
                                "name": "mpi-unlink",
                                "definition": f"{base}/openapi.json#/paths/~1Person~1$mpi-unlink",
                            },
                            {
                                "name": "mpi-history",
                                "definition": f"{base}/openapi.json#/paths/~1Person~1$mpi-history",
                            },
                            {
                                "name": "mpi-explain",
                                "definition": f"{base}/openapi.json#/paths/~1Person~1$mpi-explain",
                            },
                        ],
                    },
                    *_searched(base),
                    {
                        "type": "Provenance",
                        "documentation": "One per delivered bundle, naming its source; returned by "
                        "_revinclude=Provenance:target with its targets narrowed to what the requester sees.",
                        "versioning": "versioned",
                        "interaction": [{"code": "read"}, {"code": "vread"}, {"code": "history-instance"}],
                    },
                    {
                        "type": "Group",
                        "documentation": "A Group per source organisation (org-<id>) and the groups "
                        "`fhirbridge groups` defines, for Bulk Data export (docs/bulk.md).",
                        "interaction": [{"code": "read"}, {"code": "search-type"}],
                        "operation": [
                            {
                                "name": "export",
                                "definition": "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/group-export",
                            }
                        ],
                    },
                ],
            }
        ],
    }
