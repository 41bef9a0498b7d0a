"""The service's R4 CapabilityStatement (``GET /metadata``)."""

from __future__ import annotations

from typing import Any

from bridge import __version__


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
                "resource": [
                    {
                        "type": "Patient",
                        "interaction": [{"code": "read"}, {"code": "search-type"}],
                        "searchParam": [
                            {"name": "identifier", "type": "token"},
                            {"name": "name", "type": "string"},
                            {"name": "birthdate", "type": "date"},
                        ],
                        "operation": [
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
                        ],
                    },
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
                        ],
                    },
                    *(
                        {"type": t, "interaction": [{"code": "read"}]}
                        for t in (
                            # every type the built-in adapters emit (the read route serves any stored type)
                            "Encounter",
                            "Observation",
                            "DiagnosticReport",
                            "Condition",
                            "Procedure",
                            "Immunization",
                            "MedicationRequest",
                            "MedicationStatement",
                            "AllergyIntolerance",
                            "ServiceRequest",
                            "Appointment",
                            "DocumentReference",
                            "Practitioner",
                            "PractitionerRole",
                            "Organization",
                            "Location",
                            "Coverage",
                            "Specimen",
                            "Device",
                            "DeviceUseStatement",
                            "Composition",
                            "CarePlan",
                            "Goal",
                            "FamilyMemberHistory",
                            "ImagingStudy",
                            "ChargeItem",
                            "SupplyDelivery",
                            "Provenance",
                        )
                    ),
                ],
            }
        ],
    }
