"""Per-resource-type rules: which patient a resource belongs to, its clinical date, and when two
resources from different sources state the same clinical fact (documented in docs/query.md).
"""

from __future__ import annotations

from typing import Any

#: Element paths naming the patient a resource belongs to (the Patient compartment, simplified).
PATIENT_REFERENCE_PATHS: dict[str, tuple[str, ...]] = {
    "Encounter": ("subject",),
    "Observation": ("subject",),
    "DiagnosticReport": ("subject",),
    "Condition": ("subject",),
    "Procedure": ("subject",),
    "Immunization": ("patient",),
    "MedicationRequest": ("subject",),
    "MedicationStatement": ("subject",),
    "MedicationAdministration": ("subject",),
    "AllergyIntolerance": ("patient",),
    "ServiceRequest": ("subject",),
    "Specimen": ("subject",),
    "DocumentReference": ("subject",),
    "Composition": ("subject",),
    "CarePlan": ("subject",),
    "Goal": ("subject",),
    "FamilyMemberHistory": ("patient",),
    "Coverage": ("beneficiary",),
    "ChargeItem": ("subject",),
    "Account": ("subject",),
    "RelatedPerson": ("patient",),
    "Claim": ("patient",),
    "ExplanationOfBenefit": ("patient",),
    "ImagingStudy": ("subject",),
    "CareTeam": ("subject",),
    "Device": ("patient",),
}

#: Element paths, in order of preference, giving the clinical date used by ``start``/``end``.
CLINICAL_DATE_PATHS: dict[str, tuple[str, ...]] = {
    "Encounter": ("period.start", "period.end"),
    "Observation": ("effectiveDateTime", "effectivePeriod.start", "effectiveInstant", "issued"),
    "DiagnosticReport": ("effectiveDateTime", "effectivePeriod.start", "issued"),
    "Condition": ("onsetDateTime", "onsetPeriod.start", "recordedDate"),
    "Procedure": ("performedDateTime", "performedPeriod.start"),
    "Immunization": ("occurrenceDateTime", "recorded"),
    "MedicationRequest": ("authoredOn",),
    "MedicationStatement": ("effectiveDateTime", "effectivePeriod.start", "dateAsserted"),
    "MedicationAdministration": ("effectiveDateTime", "effectivePeriod.start"),
    "AllergyIntolerance": ("onsetDateTime", "recordedDate"),
    "ServiceRequest": ("occurrenceDateTime", "occurrencePeriod.start", "authoredOn"),
    "Specimen": ("collection.collectedDateTime", "collection.collectedPeriod.start", "receivedTime"),
    "DocumentReference": ("context.period.start", "date"),
    "Composition": ("date",),
    "CarePlan": ("period.start", "created"),
    "Goal": ("startDate", "statusDate"),
    "FamilyMemberHistory": ("date",),
    "Coverage": ("period.start",),
    "ChargeItem": ("occurrenceDateTime", "occurrencePeriod.start", "enteredDate"),
    "Appointment": ("start",),
    "Claim": ("billablePeriod.start", "created"),
    "ExplanationOfBenefit": ("billablePeriod.start", "created"),
    "ImagingStudy": ("started",),
}


def get_path(resource: dict[str, Any], path: str) -> Any:
    node: Any = resource
    for part in path.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def _ref_id(ref: Any, rtype: str = "Patient") -> str | None:
    if isinstance(ref, dict):
        value = ref.get("reference")
        if isinstance(value, str) and value.startswith(f"{rtype}/"):
            return value[len(rtype) + 1 :]
    return None


def patient_of(resource: dict[str, Any]) -> str | None:
    """The id of the Patient this resource belongs to, or None when it is not patient data."""
    rtype = resource.get("resourceType")
    if rtype == "Patient":
        rid = resource.get("id")
        return rid if isinstance(rid, str) else None
    if rtype == "Appointment":
        for p in resource.get("participant") or ():
            pid = _ref_id(p.get("actor") if isinstance(p, dict) else None)
            if pid:
                return pid
        return None
    for path in PATIENT_REFERENCE_PATHS.get(str(rtype), ()):
        pid = _ref_id(get_path(resource, path))
        if pid:
            return pid
    return None


def clinical_date(resource: dict[str, Any]) -> str | None:
    for path in CLINICAL_DATE_PATHS.get(str(resource.get("resourceType")), ()):
        value = get_path(resource, path)
        if isinstance(value, str) and value:
            return value
    return None


def _codings(concept: Any) -> list[str]:
    if not isinstance(concept, dict):
        return []
    return sorted(
        f"{c.get('system', '')}|{c.get('code', '')}" for c in concept.get("coding") or () if isinstance(c, dict) and c.get("code")
    )


def _first_code(concept: Any) -> str | None:
    codes = _codings(concept)
    return codes[0] if codes else None


def _value(resource: dict[str, Any]) -> str:
    for key in ("valueQuantity", "valueCodeableConcept", "valueString", "valueBoolean", "valueInteger", "valueDateTime"):
        if key in resource:
            v = resource[key]
            if key == "valueQuantity" and isinstance(v, dict):
                return f"q:{v.get('value')}|{v.get('system', '')}|{v.get('code') or v.get('unit') or ''}"
            if key == "valueCodeableConcept":
                return "c:" + ",".join(_codings(v))
            return f"{key}:{v}"
    return ""


_UNSET: Any = object()


def dedupe_key(resource: dict[str, Any], clinical: str | None = _UNSET) -> str | None:
    """Two resources with the same non-None key (and the same person) state the same clinical fact.

    A key is built from the first ``system|code`` of the resource's codings in sorted order, the
    clinical time (to the precision stated, or to the day where sources differ in precision), and for
    Observations the value with its unit. Types without a safe rule return None and are never merged.
    ``clinical`` is ``clinical_date(resource)`` when the caller has it already.
    """
    rtype = resource.get("resourceType")
    when = (clinical_date(resource) if clinical is _UNSET else clinical) or ""
    if rtype == "Observation":
        code = _first_code(resource.get("code"))
        if not code or not when:
            return None
        return f"Observation|{code}|{when}|{_value(resource)}"
    if rtype == "Condition":
        code = _first_code(resource.get("code"))
        return f"Condition|{code}|{when[:10]}" if code else None
    if rtype == "AllergyIntolerance":
        code = _first_code(resource.get("code"))
        return f"AllergyIntolerance|{code}" if code else None
    if rtype == "Immunization":
        code = _first_code(resource.get("vaccineCode"))
        return f"Immunization|{code}|{when[:10]}" if code and when else None
    if rtype in ("MedicationRequest", "MedicationStatement"):
        code = _first_code(resource.get("medicationCodeableConcept"))
        return f"{rtype}|{code}|{when[:10]}" if code and when else None
    if rtype == "Procedure":
        code = _first_code(resource.get("code"))
        return f"Procedure|{code}|{when}" if code and when else None
    if rtype == "DiagnosticReport":
        code = _first_code(resource.get("code"))
        return f"DiagnosticReport|{code}|{when}" if code and when else None
    return None
