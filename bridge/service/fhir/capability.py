"""The service's R4 CapabilityStatement (``GET /metadata``)."""

from __future__ import annotations

from typing import Any

from bridge import __version__


def capability_statement(base: str) -> dict[str, Any]:
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
                            }
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
