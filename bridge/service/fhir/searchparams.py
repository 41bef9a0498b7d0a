"""The FHIR R4 search parameters of the resource types the index stores, and their values in a resource.

Each parameter is written as in the R4 specification's search parameter registry
(http://hl7.org/fhir/R4/searchparameter-registry.html): its name, its type, and the element paths its
FHIRPath expression selects, written out as dotted paths with the choice types spelt out
(``effective[x]`` as ``effectiveDateTime``, ``effectivePeriod``, ...). ``where(resolve() is Patient)``
restrictions become ``targets``. :func:`values` extracts the typed values the search code compares:

* token: ``(system, code, text)`` from Coding, CodeableConcept, Identifier, ContactPoint and the
  ``code``/``boolean``/``string`` primitives;
* string: strings, HumanName and Address parts;
* date: half-open UTC intervals (microseconds, :func:`bridge.service.fhir.dates.interval`'s scale) of
  dates, dateTimes, instants, Periods and Timing events;
* reference: the ``reference`` strings (``Type/id``);
* quantity: ``(value, system, code, unit)``; number: values; uri: strings.

The CapabilityStatement is generated from this table, so it claims exactly what the server searches.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date
from decimal import Decimal, InvalidOperation
from typing import Any

from bridge.service.fhir.dates import stored_interval

TYPES = ("token", "string", "date", "reference", "quantity", "number", "uri")

_US_PER_DAY = 86_400_000_000
#: the ends of an open Period (the ends of the calendar, as :func:`bridge.service.fhir.dates.interval` counts)
MIN_US = date.min.toordinal() * _US_PER_DAY
MAX_US = (date.max.toordinal() + 1) * _US_PER_DAY - 1


@dataclass(frozen=True, slots=True)
class SearchParam:
    name: str
    type: str
    paths: tuple[str, ...]
    #: reference parameters: the resource types a reference may name (empty: any)
    targets: tuple[str, ...] = ()
    documentation: str = ""
    #: values computed by the index, not read from the resource (``_source``, ``_lastUpdated``)
    column: str | None = field(default=None)


def _p(name: str, ptype: str, *paths: str, targets: tuple[str, ...] = (), doc: str = "") -> SearchParam:
    return SearchParam(name, ptype, paths, targets, doc)


_PATIENT = ("Patient",)


def _subject(*paths: str) -> tuple[SearchParam, SearchParam]:
    """``subject`` (any target) and ``patient`` (the same paths, Patient targets only)."""
    return _p("subject", "reference", *paths), _p("patient", "reference", *paths, targets=_PATIENT)


_EFFECTIVE = ("effectiveDateTime", "effectivePeriod", "effectiveInstant", "effectiveTiming")

#: parameters every type has (the R4 Resource parameters we support; ``_source`` is fhirbridge's: the
#: sending organisation, docs/query.md)
COMMON: tuple[SearchParam, ...] = (
    _p("_id", "token", "id"),
    SearchParam("_lastUpdated", "date", ("meta.lastUpdated",), column="last_updated"),
    SearchParam(
        "_source",
        "uri",
        (),
        documentation="the organisation that sent the resource (its id in fhirbridge, e.g. riverside)",
        column="source_org",
    ),
)

_BY_TYPE: dict[str, tuple[SearchParam, ...]] = {
    "Patient": (
        _p("identifier", "token", "identifier"),
        _p("name", "string", "name"),
        _p("family", "string", "name.family"),
        _p("given", "string", "name.given"),
        _p("birthdate", "date", "birthDate"),
        _p("gender", "token", "gender"),
        _p("address", "string", "address"),
        _p("address-city", "string", "address.city"),
        _p("address-postalcode", "string", "address.postalCode"),
        _p("address-state", "string", "address.state"),
        _p("telecom", "token", "telecom"),
        _p("phone", "token", "telecom[phone]"),
        _p("email", "token", "telecom[email]"),
        _p("active", "token", "active"),
        _p("deceased", "token", "deceasedBoolean", "deceasedDateTime"),
        _p("general-practitioner", "reference", "generalPractitioner"),
        _p("organization", "reference", "managingOrganization"),
        _p("link", "reference", "link.other"),
        _p("language", "token", "communication.language"),
    ),
    "Observation": (
        _p("identifier", "token", "identifier"),
        _p("code", "token", "code"),
        _p("category", "token", "category"),
        _p("status", "token", "status"),
        _p("date", "date", *_EFFECTIVE),
        *_subject("subject"),
        _p("encounter", "reference", "encounter"),
        _p("performer", "reference", "performer"),
        _p("based-on", "reference", "basedOn"),
        _p("specimen", "reference", "specimen"),
        _p("derived-from", "reference", "derivedFrom"),
        _p("has-member", "reference", "hasMember"),
        _p("value-quantity", "quantity", "valueQuantity"),
        _p("value-concept", "token", "valueCodeableConcept"),
        _p("value-string", "string", "valueString"),
        _p("value-date", "date", "valueDateTime", "valuePeriod"),
        _p("component-code", "token", "component.code"),
        _p("component-value-quantity", "quantity", "component.valueQuantity"),
        _p("combo-code", "token", "code", "component.code"),
        _p("data-absent-reason", "token", "dataAbsentReason"),
        _p("method", "token", "method"),
    ),
    "Encounter": (
        _p("identifier", "token", "identifier"),
        _p("class", "token", "class"),
        _p("type", "token", "type"),
        _p("status", "token", "status"),
        _p("date", "date", "period"),
        *_subject("subject"),
        _p("participant", "reference", "participant.individual"),
        _p("practitioner", "reference", "participant.individual", targets=("Practitioner",)),
        _p("service-provider", "reference", "serviceProvider"),
        _p("location", "reference", "location.location"),
        _p("reason-code", "token", "reasonCode"),
        _p("diagnosis", "reference", "diagnosis.condition"),
        _p("account", "reference", "account"),
        _p("episode-of-care", "reference", "episodeOfCare"),
        _p("part-of", "reference", "partOf"),
        _p("special-arrangement", "token", "hospitalization.specialArrangement"),
    ),
    "Condition": (
        _p("identifier", "token", "identifier"),
        _p("code", "token", "code"),
        _p("category", "token", "category"),
        _p("clinical-status", "token", "clinicalStatus"),
        _p("verification-status", "token", "verificationStatus"),
        _p("severity", "token", "severity"),
        _p("body-site", "token", "bodySite"),
        _p("onset-date", "date", "onsetDateTime", "onsetPeriod"),
        _p("abatement-date", "date", "abatementDateTime", "abatementPeriod"),
        _p("recorded-date", "date", "recordedDate"),
        *_subject("subject"),
        _p("encounter", "reference", "encounter"),
        _p("asserter", "reference", "asserter"),
    ),
    "Procedure": (
        _p("identifier", "token", "identifier"),
        _p("code", "token", "code"),
        _p("category", "token", "category"),
        _p("status", "token", "status"),
        _p("date", "date", "performedDateTime", "performedPeriod"),
        *_subject("subject"),
        _p("encounter", "reference", "encounter"),
        _p("performer", "reference", "performer.actor"),
        _p("location", "reference", "location"),
        _p("reason-code", "token", "reasonCode"),
        _p("based-on", "reference", "basedOn"),
    ),
    "DiagnosticReport": (
        _p("identifier", "token", "identifier"),
        _p("code", "token", "code"),
        _p("category", "token", "category"),
        _p("status", "token", "status"),
        _p("date", "date", "effectiveDateTime", "effectivePeriod"),
        _p("issued", "date", "issued"),
        *_subject("subject"),
        _p("encounter", "reference", "encounter"),
        _p("result", "reference", "result"),
        _p("performer", "reference", "performer"),
        _p("based-on", "reference", "basedOn"),
        _p("specimen", "reference", "specimen"),
        _p("conclusion", "token", "conclusionCode"),
    ),
    "Immunization": (
        _p("identifier", "token", "identifier"),
        _p("vaccine-code", "token", "vaccineCode"),
        _p("status", "token", "status"),
        _p("status-reason", "token", "statusReason"),
        _p("date", "date", "occurrenceDateTime"),
        _p("patient", "reference", "patient", targets=_PATIENT),
        _p("location", "reference", "location"),
        _p("performer", "reference", "performer.actor"),
        _p("lot-number", "string", "lotNumber"),
        _p("manufacturer", "reference", "manufacturer"),
        _p("reason-code", "token", "reasonCode"),
    ),
    "MedicationRequest": (
        _p("identifier", "token", "identifier"),
        _p("code", "token", "medicationCodeableConcept"),
        _p("medication", "reference", "medicationReference"),
        _p("status", "token", "status"),
        _p("intent", "token", "intent"),
        _p("category", "token", "category"),
        _p("priority", "token", "priority"),
        _p("authoredon", "date", "authoredOn"),
        _p("date", "date", "dosageInstruction.timing"),
        *_subject("subject"),
        _p("encounter", "reference", "encounter"),
        _p("requester", "reference", "requester"),
        _p("intended-performer", "reference", "performer"),
    ),
    "MedicationStatement": (
        _p("identifier", "token", "identifier"),
        _p("code", "token", "medicationCodeableConcept"),
        _p("medication", "reference", "medicationReference"),
        _p("status", "token", "status"),
        _p("category", "token", "category"),
        _p("effective", "date", "effectiveDateTime", "effectivePeriod"),
        *_subject("subject"),
        _p("context", "reference", "context"),
        _p("source", "reference", "informationSource"),
        _p("part-of", "reference", "partOf"),
    ),
    "MedicationAdministration": (
        _p("identifier", "token", "identifier"),
        _p("code", "token", "medicationCodeableConcept"),
        _p("medication", "reference", "medicationReference"),
        _p("status", "token", "status"),
        _p("effective-time", "date", "effectiveDateTime", "effectivePeriod"),
        *_subject("subject"),
        _p("context", "reference", "context"),
        _p("performer", "reference", "performer.actor"),
        _p("request", "reference", "request"),
        _p("reason-given", "token", "reasonCode"),
    ),
    "AllergyIntolerance": (
        _p("identifier", "token", "identifier"),
        _p("code", "token", "code", "reaction.substance"),
        _p("clinical-status", "token", "clinicalStatus"),
        _p("verification-status", "token", "verificationStatus"),
        _p("type", "token", "type"),
        _p("category", "token", "category"),
        _p("criticality", "token", "criticality"),
        _p("severity", "token", "reaction.severity"),
        _p("manifestation", "token", "reaction.manifestation"),
        _p("route", "token", "reaction.exposureRoute"),
        _p("date", "date", "recordedDate"),
        _p("onset", "date", "reaction.onset"),
        _p("last-date", "date", "lastOccurrence"),
        _p("patient", "reference", "patient", targets=_PATIENT),
        _p("recorder", "reference", "recorder"),
        _p("asserter", "reference", "asserter"),
    ),
    "ServiceRequest": (
        _p("identifier", "token", "identifier"),
        _p("code", "token", "code"),
        _p("category", "token", "category"),
        _p("status", "token", "status"),
        _p("intent", "token", "intent"),
        _p("priority", "token", "priority"),
        _p("authored", "date", "authoredOn"),
        _p("occurrence", "date", "occurrenceDateTime", "occurrencePeriod", "occurrenceTiming"),
        *_subject("subject"),
        _p("encounter", "reference", "encounter"),
        _p("requester", "reference", "requester"),
        _p("performer", "reference", "performer"),
        _p("based-on", "reference", "basedOn"),
        _p("specimen", "reference", "specimen"),
        _p("requisition", "token", "requisition"),
    ),
    "Specimen": (
        _p("identifier", "token", "identifier"),
        _p("accession", "token", "accessionIdentifier"),
        _p("type", "token", "type"),
        _p("status", "token", "status"),
        _p("bodysite", "token", "collection.bodySite"),
        _p("collected", "date", "collection.collectedDateTime", "collection.collectedPeriod"),
        *_subject("subject"),
        _p("parent", "reference", "parent"),
        _p("collector", "reference", "collection.collector"),
    ),
    "DocumentReference": (
        _p("identifier", "token", "masterIdentifier", "identifier"),
        _p("type", "token", "type"),
        _p("category", "token", "category"),
        _p("status", "token", "status"),
        _p("date", "date", "date"),
        _p("period", "date", "context.period"),
        *_subject("subject"),
        _p("encounter", "reference", "context.encounter"),
        _p("author", "reference", "author"),
        _p("custodian", "reference", "custodian"),
        _p("contenttype", "token", "content.attachment.contentType"),
        _p("format", "token", "content.format"),
        _p("language", "token", "content.attachment.language"),
        _p("description", "string", "description"),
        _p("setting", "token", "context.practiceSetting"),
        _p("facility", "token", "context.facilityType"),
        _p("event", "token", "context.event"),
        _p("security-label", "token", "securityLabel"),
        _p("relatesto", "reference", "relatesTo.target"),
    ),
    "Composition": (
        _p("identifier", "token", "identifier"),
        _p("type", "token", "type"),
        _p("category", "token", "category"),
        _p("status", "token", "status"),
        _p("date", "date", "date"),
        *_subject("subject"),
        _p("encounter", "reference", "encounter"),
        _p("author", "reference", "author"),
        _p("title", "string", "title"),
        _p("section", "token", "section.code"),
        _p("confidentiality", "token", "confidentiality"),
    ),
    "CarePlan": (
        _p("identifier", "token", "identifier"),
        _p("category", "token", "category"),
        _p("status", "token", "status"),
        _p("intent", "token", "intent"),
        _p("date", "date", "period"),
        *_subject("subject"),
        _p("encounter", "reference", "encounter"),
        _p("care-team", "reference", "careTeam"),
        _p("goal", "reference", "goal"),
        _p("activity-code", "token", "activity.detail.code"),
        _p("condition", "reference", "addresses"),
    ),
    "Goal": (
        _p("identifier", "token", "identifier"),
        _p("lifecycle-status", "token", "lifecycleStatus"),
        _p("achievement-status", "token", "achievementStatus"),
        _p("category", "token", "category"),
        _p("start-date", "date", "startDate"),
        _p("target-date", "date", "target.dueDate"),
        *_subject("subject"),
    ),
    "FamilyMemberHistory": (
        _p("identifier", "token", "identifier"),
        _p("code", "token", "condition.code"),
        _p("status", "token", "status"),
        _p("relationship", "token", "relationship"),
        _p("sex", "token", "sex"),
        _p("date", "date", "date"),
        _p("patient", "reference", "patient", targets=_PATIENT),
    ),
    "Coverage": (
        _p("identifier", "token", "identifier"),
        _p("status", "token", "status"),
        _p("type", "token", "type"),
        _p("beneficiary", "reference", "beneficiary"),
        _p("patient", "reference", "beneficiary", targets=_PATIENT),
        _p("subscriber", "reference", "subscriber"),
        _p("policy-holder", "reference", "policyHolder"),
        _p("payor", "reference", "payor"),
        _p("dependent", "string", "dependent"),
        _p("class-type", "token", "class.type"),
        _p("class-value", "string", "class.value"),
    ),
    "ChargeItem": (
        _p("identifier", "token", "identifier"),
        _p("code", "token", "code"),
        _p("occurrence", "date", "occurrenceDateTime", "occurrencePeriod", "occurrenceTiming"),
        _p("entered-date", "date", "enteredDate"),
        *_subject("subject"),
        _p("context", "reference", "context"),
        _p("account", "reference", "account"),
        _p("quantity", "quantity", "quantity"),
    ),
    "Account": (
        _p("identifier", "token", "identifier"),
        _p("status", "token", "status"),
        _p("type", "token", "type"),
        _p("name", "string", "name"),
        _p("period", "date", "servicePeriod"),
        *_subject("subject"),
        _p("owner", "reference", "owner"),
    ),
    "RelatedPerson": (
        _p("identifier", "token", "identifier"),
        _p("name", "string", "name"),
        _p("relationship", "token", "relationship"),
        _p("gender", "token", "gender"),
        _p("birthdate", "date", "birthDate"),
        _p("active", "token", "active"),
        _p("telecom", "token", "telecom"),
        _p("address", "string", "address"),
        _p("patient", "reference", "patient", targets=_PATIENT),
    ),
    "Claim": (
        _p("identifier", "token", "identifier"),
        _p("status", "token", "status"),
        _p("use", "token", "use"),
        _p("priority", "token", "priority"),
        _p("created", "date", "created"),
        _p("patient", "reference", "patient", targets=_PATIENT),
        _p("provider", "reference", "provider"),
        _p("insurer", "reference", "insurer"),
        _p("encounter", "reference", "item.encounter"),
        _p("facility", "reference", "facility"),
    ),
    "ExplanationOfBenefit": (
        _p("identifier", "token", "identifier"),
        _p("status", "token", "status"),
        _p("created", "date", "created"),
        _p("patient", "reference", "patient", targets=_PATIENT),
        _p("provider", "reference", "provider"),
        _p("claim", "reference", "claim"),
        _p("coverage", "reference", "insurance.coverage"),
        _p("encounter", "reference", "item.encounter"),
        _p("facility", "reference", "facility"),
    ),
    "ImagingStudy": (
        _p("identifier", "token", "identifier"),
        _p("status", "token", "status"),
        _p("started", "date", "started"),
        *_subject("subject"),
        _p("encounter", "reference", "encounter"),
        _p("modality", "token", "series.modality"),
        _p("bodysite", "token", "series.bodySite"),
        _p("basedon", "reference", "basedOn"),
        _p("reason", "token", "reasonCode"),
    ),
    "CareTeam": (
        _p("identifier", "token", "identifier"),
        _p("status", "token", "status"),
        _p("category", "token", "category"),
        _p("date", "date", "period"),
        *_subject("subject"),
        _p("encounter", "reference", "encounter"),
        _p("participant", "reference", "participant.member"),
    ),
    "Device": (
        _p("identifier", "token", "identifier"),
        _p("type", "token", "type"),
        _p("status", "token", "status"),
        _p("patient", "reference", "patient", targets=_PATIENT),
        _p("organization", "reference", "owner"),
        _p("location", "reference", "location"),
        _p("manufacturer", "string", "manufacturer"),
        _p("model", "string", "modelNumber"),
        _p("device-name", "string", "deviceName.name"),
        _p("udi-di", "string", "udiCarrier.deviceIdentifier"),
        _p("udi-carrier", "string", "udiCarrier.carrierHRF"),
    ),
    "Appointment": (
        _p("identifier", "token", "identifier"),
        _p("status", "token", "status"),
        _p("date", "date", "start"),
        _p("actor", "reference", "participant.actor"),
        _p("patient", "reference", "participant.actor", targets=_PATIENT),
        _p("practitioner", "reference", "participant.actor", targets=("Practitioner",)),
        _p("location", "reference", "participant.actor", targets=("Location",)),
        _p("service-type", "token", "serviceType"),
        _p("appointment-type", "token", "appointmentType"),
        _p("reason-code", "token", "reasonCode"),
        _p("based-on", "reference", "basedOn"),
    ),
    "Organization": (
        _p("identifier", "token", "identifier"),
        _p("name", "string", "name", "alias"),
        _p("active", "token", "active"),
        _p("type", "token", "type"),
        _p("address", "string", "address"),
        _p("address-city", "string", "address.city"),
        _p("partof", "reference", "partOf"),
    ),
    "Practitioner": (
        _p("identifier", "token", "identifier"),
        _p("name", "string", "name"),
        _p("family", "string", "name.family"),
        _p("given", "string", "name.given"),
        _p("active", "token", "active"),
        _p("gender", "token", "gender"),
        _p("telecom", "token", "telecom"),
        _p("address", "string", "address"),
    ),
    "PractitionerRole": (
        _p("identifier", "token", "identifier"),
        _p("active", "token", "active"),
        _p("practitioner", "reference", "practitioner"),
        _p("organization", "reference", "organization"),
        _p("role", "token", "code"),
        _p("specialty", "token", "specialty"),
        _p("location", "reference", "location"),
    ),
    "Location": (
        _p("identifier", "token", "identifier"),
        _p("name", "string", "name", "alias"),
        _p("status", "token", "status"),
        _p("type", "token", "type"),
        _p("address", "string", "address"),
        _p("address-city", "string", "address.city"),
        _p("organization", "reference", "managingOrganization"),
        _p("partof", "reference", "partOf"),
    ),
    "DeviceUseStatement": (
        _p("identifier", "token", "identifier"),
        *_subject("subject"),
        _p("device", "reference", "device"),
    ),
    "SupplyDelivery": (
        _p("identifier", "token", "identifier"),
        _p("status", "token", "status"),
        _p("patient", "reference", "patient", targets=_PATIENT),
        _p("supplier", "reference", "supplier"),
        _p("receiver", "reference", "receiver"),
    ),
    # only as ``_revinclude=Provenance:target`` (bridge/service/fhir/search.py)
    "Provenance": (
        _p("target", "reference", "target"),
        _p("recorded", "date", "recorded"),
        _p("agent", "reference", "agent.who"),
        _p("entity", "reference", "entity.what"),
    ),
    "Medication": (
        _p("identifier", "token", "identifier"),
        _p("code", "token", "code"),
        _p("status", "token", "status"),
        _p("form", "token", "form"),
        _p("manufacturer", "reference", "manufacturer"),
        _p("ingredient-code", "token", "ingredient.itemCodeableConcept"),
        _p("lot-number", "token", "batch.lotNumber"),
    ),
}


def searchable_types() -> tuple[str, ...]:
    return tuple(sorted(_BY_TYPE))


def params_of(resource_type: str) -> dict[str, SearchParam]:
    """The parameters of ``resource_type`` by name (the common ones included); {} for an unknown type."""
    own = _BY_TYPE.get(resource_type)
    if own is None:
        return {}
    return {p.name: p for p in (*COMMON, *own)}


# -- values -------------------------------------------------------------------------------------


def _walk(node: Any, parts: list[str]) -> Iterator[Any]:
    """The values at ``parts`` below ``node``, lists flattened at every step. A part ``telecom[phone]``
    keeps the ContactPoints whose ``system`` is ``phone``."""
    if isinstance(node, list):
        for item in node:
            yield from _walk(item, parts)
        return
    if not parts:
        if node is not None:
            yield node
        return
    if not isinstance(node, dict):
        return
    head = parts[0]
    only = None
    if head.endswith("]"):
        head, _, only = head[:-1].partition("[")
    child = node.get(head)
    if only is not None:
        child = [
            c
            for c in (child if isinstance(child, list) else [child])
            if isinstance(c, dict) and c.get("system") == only
        ]
    yield from _walk(child, parts[1:])


def raw_values(resource: dict[str, Any], param: SearchParam) -> list[Any]:
    out: list[Any] = []
    for path in param.paths:
        out.extend(_walk(resource, path.split(".")))
    return out


Token = tuple[str | None, str | None, str | None]  # system, code, text (display or CodeableConcept.text)


def token_values(resource: dict[str, Any], param: SearchParam) -> list[Token]:
    out: list[Token] = []
    # R4's Patient.deceased: deceased.exists() and deceased != false (a deceasedDateTime means true)
    if (
        param.name == "deceased"
        and resource.get("resourceType") == "Patient"
        and "deceasedDateTime" in resource
    ):
        return [(None, "true", None)]
    for v in raw_values(resource, param):
        if isinstance(v, bool):
            out.append((None, "true" if v else "false", None))
        elif isinstance(v, str | int):
            out.append((None, str(v), None))
        elif isinstance(v, dict):
            if "coding" in v or ("text" in v and "value" not in v and "code" not in v):  # CodeableConcept
                codings = v.get("coding") or []
                for c in codings if isinstance(codings, list) else ():
                    if isinstance(c, dict):
                        out.append((c.get("system"), c.get("code"), c.get("display") or v.get("text")))
                if not codings and v.get("text"):
                    out.append((None, None, v.get("text")))
            elif "code" in v or ("system" in v and "value" not in v):  # Coding
                out.append((v.get("system"), v.get("code"), v.get("display")))
            elif "value" in v:  # Identifier, ContactPoint
                ident_type = v.get("type") or {}
                text = ident_type.get("text") if isinstance(ident_type, dict) else None
                out.append((v.get("system"), str(v["value"]), text))
    return out


def token_texts(resource: dict[str, Any], param: SearchParam) -> list[str]:
    """The texts a token's ``:text`` modifier searches: CodeableConcept.text, each Coding's display,
    an Identifier's type text."""
    out: list[str] = []
    for v in raw_values(resource, param):
        if not isinstance(v, dict):
            continue
        if isinstance(v.get("text"), str):
            out.append(v["text"])
        if isinstance(v.get("display"), str):
            out.append(v["display"])
        for c in v.get("coding") or () if isinstance(v.get("coding"), list) else ():
            if isinstance(c, dict) and isinstance(c.get("display"), str):
                out.append(c["display"])
        kind = v.get("type")
        if isinstance(kind, dict) and isinstance(kind.get("text"), str):
            out.append(kind["text"])
    return out


def identifier_types(
    resource: dict[str, Any], param: SearchParam
) -> list[tuple[str | None, str | None, str]]:
    """``(type system, type code, value)`` of each Identifier (the ``:of-type`` modifier)."""
    out = []
    for v in raw_values(resource, param):
        if isinstance(v, dict) and "value" in v:
            for c in (v.get("type") or {}).get("coding") or ():
                out.append((c.get("system"), c.get("code"), str(v["value"])))
    return out


def string_values(resource: dict[str, Any], param: SearchParam) -> list[str]:
    out: list[str] = []
    for v in raw_values(resource, param):
        if isinstance(v, str):
            out.append(v)
        elif isinstance(v, dict):  # HumanName, Address
            for key in (
                "text",
                "family",
                "given",
                "prefix",
                "suffix",
                "line",
                "city",
                "district",
                "state",
                "postalCode",
                "country",
            ):
                part = v.get(key)
                if isinstance(part, str):
                    out.append(part)
                elif isinstance(part, list):
                    out.extend(p for p in part if isinstance(p, str))
    return out


def date_values(resource: dict[str, Any], param: SearchParam) -> list[tuple[int, int]]:
    """The intervals of the parameter's values: a Period from its start to its end (an open end is
    unbounded), a Timing by its events, a date/dateTime/instant at its precision."""
    out: list[tuple[int, int]] = []
    for v in raw_values(resource, param):
        try:
            if isinstance(v, str):
                out.append(stored_interval(v))
            elif isinstance(v, dict) and ("start" in v or "end" in v):
                lo = stored_interval(v["start"])[0] if isinstance(v.get("start"), str) else MIN_US
                hi = stored_interval(v["end"])[1] if isinstance(v.get("end"), str) else MAX_US
                out.append((lo, hi))
            elif isinstance(v, dict) and isinstance(v.get("event"), list):
                out.extend(stored_interval(e) for e in v["event"] if isinstance(e, str))
        except (ValueError, TypeError):
            continue  # an unreadable stored date matches no date search
    return out


Quantity = tuple[Decimal, str | None, str | None, str | None]  # value, system, code, unit


def quantity_values(resource: dict[str, Any], param: SearchParam) -> list[Quantity]:
    out: list[Quantity] = []
    for v in raw_values(resource, param):
        if (
            isinstance(v, dict)
            and isinstance(v.get("value"), int | float | str)
            and not isinstance(v.get("value"), bool)
        ):
            try:
                out.append((Decimal(str(v["value"])), v.get("system"), v.get("code"), v.get("unit")))
            except InvalidOperation:
                continue
    return out


def reference_values(resource: dict[str, Any], param: SearchParam) -> list[str]:
    out = []
    for v in raw_values(resource, param):
        if isinstance(v, dict) and isinstance(v.get("reference"), str):
            ref = v["reference"]
            if param.targets and not any(ref.startswith(f"{t}/") or f"/{t}/" in ref for t in param.targets):
                continue
            out.append(ref)
    return out
