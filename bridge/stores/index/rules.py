"""Per-resource-type rules: which patient a resource belongs to, its clinical date, and when two
resources from different sources state the same clinical fact (documented in docs/query.md).
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Any

import orjson

from adapters.ids import business_key, resource_id

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
    "Consent": ("patient",),
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
    "Consent": ("dateTime",),
}


def get_path(resource: dict[str, Any], path: str) -> Any:
    node: Any = resource
    for part in path.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


#: the identifier system under which the FHIR adapter keeps a source's own Patient ids
_FHIR_ID_PATIENT = re.compile(r"^urn:fhirbridge:([^:]+):fhir-id:Patient$")


def _ref_id(ref: Any, rtype: str = "Patient") -> str | None:
    """The id a reference to a ``rtype`` names: a literal ``rtype/<id>``, or, for a Patient, the
    logical reference the FHIR adapter writes for a Patient outside the record (``identifier`` under
    ``urn:fhirbridge:<org>:fhir-id:Patient``), whose id is the deterministic one that Patient gets
    (:func:`adapters.ids.resource_id`), whether it has arrived yet or not."""
    if isinstance(ref, dict):
        value = ref.get("reference")
        if isinstance(value, str) and value.startswith(f"{rtype}/"):
            return value[len(rtype) + 1 :]
        ident = ref.get("identifier")
        if value is None and rtype == "Patient" and isinstance(ident, dict):
            system, source_id = ident.get("system"), ident.get("value")
            m = _FHIR_ID_PATIENT.match(system) if isinstance(system, str) else None
            if m and isinstance(source_id, str) and source_id:
                return resource_id(m.group(1), "Patient", business_key("fhir", source_id))
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
        f"{c.get('system', '')}|{c.get('code', '')}"
        for c in concept.get("coding") or ()
        if isinstance(c, dict) and c.get("code")
    )


def _first_code(concept: Any) -> str | None:
    codes = _codings(concept)
    return codes[0] if codes else None


def _number(value: Any) -> str | None:
    """A JSON number in one canonical form (``5``, ``5.0`` and ``5.00`` are the same value)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        return format(Decimal(str(value)).normalize(), "f")
    except InvalidOperation:  # nan, inf
        return None


def _quantity(q: Any) -> str | None:
    if not isinstance(q, dict):
        return None
    number = _number(q.get("value"))
    if number is None:
        return None
    unit = q.get("code") or q.get("unit") or ""
    return f"{q.get('comparator', '')}{number}|{q.get('system', '')}|{unit}"


def _value_of(element: dict[str, Any]) -> str | None:
    """The value an Observation (or one of its components) states, in a canonical form; ``""`` when it
    states none, ``None`` when the value has a form this rule does not compare (never merged)."""
    forms = [k for k in element if k.startswith("value")]
    if len(forms) > 1:
        return None
    if not forms:
        absent = element.get("dataAbsentReason")
        return "absent:" + ",".join(_codings(absent)) if absent is not None else ""
    key = forms[0]
    v = element[key]
    if key == "valueQuantity":
        q = _quantity(v)
        return None if q is None else "q:" + q
    if key == "valueCodeableConcept":
        codes = _codings(v)
        return "c:" + ",".join(codes) if codes else None
    if key == "valueRange" and isinstance(v, dict):
        low, high = (_quantity(v[k]) if k in v else "" for k in ("low", "high"))
        return None if low is None or high is None else f"r:{low}/{high}"
    if key == "valueRatio" and isinstance(v, dict):
        num, den = (_quantity(v.get(k)) for k in ("numerator", "denominator"))
        return None if num is None or den is None else f"ra:{num}/{den}"
    if key == "valuePeriod" and isinstance(v, dict):
        return f"p:{v.get('start', '')}/{v.get('end', '')}"
    if key == "valueInteger" and isinstance(v, int) and not isinstance(v, bool):
        return f"i:{v}"
    if key == "valueBoolean" and isinstance(v, bool):
        return f"b:{'true' if v else 'false'}"
    if key in ("valueString", "valueDateTime", "valueTime") and isinstance(v, str):
        return f"{key}:{v}"
    return None  # SampledData, Attachment, a malformed value...: not compared, never merged


def _observation_value(resource: dict[str, Any]) -> str | None:
    """The Observation's own value and every component's code and value (sorted), or None."""
    own = _value_of(resource)
    if own is None:
        return None
    components = resource.get("component")
    if not components:
        return own
    if not isinstance(components, list):
        return None
    parts = []
    for c in components:
        if not isinstance(c, dict):
            return None
        code, value = _first_code(c.get("code")), _value_of(c)
        if code is None or value is None:
            return None
        parts.append(f"{code}={value}")
    return own + "|components:" + ";".join(sorted(parts))


_UNSET: Any = object()

#: Bumped whenever :func:`dedupe_key` changes: an index written with other rules recomputes its keys
#: when it is opened (``IndexStore``).
DEDUPE_RULES_VERSION = "2"
#: The resource types :func:`dedupe_key` may merge.
DEDUPE_TYPES = (
    "Observation",
    "Condition",
    "AllergyIntolerance",
    "Immunization",
    "MedicationRequest",
    "MedicationStatement",
    "Procedure",
    "DiagnosticReport",
)


def _entered_in_error(resource: dict[str, Any]) -> bool:
    if resource.get("status") == "entered-in-error":
        return True
    vs = resource.get("verificationStatus")  # Condition, AllergyIntolerance: a CodeableConcept
    return isinstance(vs, dict) and any(
        isinstance(c, dict) and c.get("code") == "entered-in-error" for c in vs.get("coding") or ()
    )


def dedupe_key(resource: dict[str, Any], clinical: str | None = _UNSET) -> str | None:
    """Two resources with the same non-None key (and the same person) state the same clinical fact.

    A key is built from the first ``system|code`` of the resource's codings in sorted order and the
    clinical time: as written for Observations, Procedures and DiagnosticReports, its day for the
    others (the same instant written in other time zones or precisions is *not* merged: the rules err
    on the side of showing two entries). Observations add their value: quantities with comparator
    and unit (numbers compared by value), codings, ranges, ratios, periods, strings, booleans, every
    component's code and value, or the data-absent reason; a value of another form is not compared
    and never merged. Medication requests and statements add their dosage. An ``entered-in-error``
    resource is never merged. Types without a safe rule return None and are never merged.
    ``clinical`` is ``clinical_date(resource)`` when the caller has it already.
    """
    rtype = resource.get("resourceType")
    if _entered_in_error(resource):
        return None
    when = (clinical_date(resource) if clinical is _UNSET else clinical) or ""
    if rtype == "Observation":
        code = _first_code(resource.get("code"))
        value = _observation_value(resource)
        if not code or not when or value is None:
            return None
        return f"Observation|{code}|{when}|{value}"
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
        dosage = resource.get("dosageInstruction" if rtype == "MedicationRequest" else "dosage")
        dose = orjson.dumps(dosage, option=orjson.OPT_SORT_KEYS).decode() if dosage else ""
        return f"{rtype}|{code}|{when[:10]}|{dose}" if code and when else None
    if rtype == "Procedure":
        code = _first_code(resource.get("code"))
        return f"Procedure|{code}|{when}" if code and when else None
    if rtype == "DiagnosticReport":
        code = _first_code(resource.get("code"))
        return f"DiagnosticReport|{code}|{when}" if code and when else None
    return None
