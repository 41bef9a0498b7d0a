"""Privacy Consents for tests: a person's Consent denying one organisation their record."""

from __future__ import annotations

from typing import Any

CONSENT_SCOPE = "http://terminology.hl7.org/CodeSystem/consentscope"
ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
PARTICIPATION = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"


def deny_organization(cid: str, patient: str, organization: str, status: str = "active") -> dict[str, Any]:
    """An R4 privacy Consent (opt-out) on ``Patient/<patient>``: ``organization`` (a source organisation
    id, named by a logical reference) may not receive the record."""
    return {
        "resourceType": "Consent",
        "id": cid,
        "status": status,
        "scope": {"coding": [{"system": CONSENT_SCOPE, "code": "patient-privacy"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": f"Patient/{patient}"},
        "dateTime": "2026-01-01T00:00:00Z",
        "policyRule": {"coding": [{"system": ACT_CODE, "code": "OPTOUT"}]},
        "provision": {
            "type": "deny",
            "actor": [
                {
                    "role": {"coding": [{"system": PARTICIPATION, "code": "IRCP"}]},
                    "reference": {"type": "Organization", "identifier": {"value": organization}},
                }
            ],
        },
    }
