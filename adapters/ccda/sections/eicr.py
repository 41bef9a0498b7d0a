"""eICR (HL7 CDA eICR R2 STU 1.1-3.1) travel history and pregnancy -> Observations as the US eCR FHIR IG
profiles them."""

from __future__ import annotations

from typing import Any

from adapters.ccda.datatypes import (
    NULL_FLAVOR_TO_DAR,
    Ctx,
    El,
    addresses,
    concept,
    effective,
    org_name,
    value_x,
)
from adapters.ccda.sections.entry import (
    LOINC,
    OBS_CAT,
    PARTICIPATION_TYPE,
    SNOMED,
    add,
    cc,
    entry_text,
    negated,
    performer_refs,
    status_code,
    templates,
)
from adapters.ccda.sections.observations import OBS_STATUS, observation

ECR_PROFILE = "http://hl7.org/fhir/us/ecr/StructureDefinition"
TRAVEL_HISTORY = "2.16.840.1.113883.10.20.15.2.3.1"
TRAVEL_PURPOSE = "2.16.840.1.113883.10.20.15.2.3.51"
TRAVEL_CODE = "420008001"
PREGNANCY_OBSERVATION = "2.16.840.1.113883.10.20.15.3.8"
PREGNANT = "77386006"
#: the US Public Health pregnancy status value set's answers for a negated or unknown Pregnancy Observation
_NOT_PREGNANT = ("60001007", "Not pregnant")
_PREGNANCY_UNKNOWN = ("261665006", "Unknown")


def travel_history(act: El, ctx: Ctx) -> list[str]:
    """eICR Travel History act -> Observation per the eCR IG's us-ph-travel-history profile.

    code SNOMED 420008001 "Travel"; effective from effectiveTime (``width`` included); one component
    (code v3-ParticipationType LOC) per ``participant typeCode="LOC"``, the coded place as its value and
    the address in the us-ph-address-extension; the act's text as a LOC component's text (where the IG
    puts free-text travel); each Purpose of Travel observation as a component (SNOMED 280147009). The
    profile is claimed only when its required date and location are there.
    """
    res: dict[str, Any] = {
        "resourceType": "Observation",
        "status": OBS_STATUS.get(status_code(act), "final"),
        "category": [cc(OBS_CAT, "social-history")],
        "code": {**cc(SNOMED, TRAVEL_CODE, "Travel"), "text": "Travel History"},
        "subject": {"reference": ctx.patient_ref},
    }
    point, per = effective(act.find("effectiveTime"), ctx)
    if per:
        res["effectivePeriod"] = per
    elif point:
        res["effectiveDateTime"] = point
    else:
        ctx.warn(
            "travel-history-no-date",
            "travel history has no usable effectiveTime; converted without the eCR travel history profile",
            act,
        )
    location = cc(PARTICIPATION_TYPE, "LOC", "Location")
    components: list[dict[str, Any]] = []
    addressed = True  # the address extension requires a country
    for part in act.findall("participant"):
        pr = part.find("participantRole") if part.get("typeCode") == "LOC" else None
        if pr is None:
            continue
        place = concept(pr.find("code"), ctx)
        name = org_name(pr.find("playingEntity"))
        if place is None and name:
            place = {"text": name}
        found = False
        addrs: list[dict[str, Any] | None] = [*addresses(pr, ctx)] or [None]
        for i, addr in enumerate(addrs):
            comp: dict[str, Any] = {"code": location}
            if addr is not None:
                comp["extension"] = [{"url": f"{ECR_PROFILE}/us-ph-address-extension", "valueAddress": addr}]
                addressed = addressed and "country" in addr
            if place and i == 0:
                comp["valueCodeableConcept"] = place
            if len(comp) > 1:
                components.append(comp)
                found = True
        if not found:
            ctx.warn("travel-location-empty", "travel history location has no code, name or address", pr)
    text = entry_text(act, ctx)
    if text:
        components.append({"code": location, "valueCodeableConcept": {"text": text}})
    located = bool(components)
    for er in act.findall("entryRelationship"):
        for child in er:
            if not isinstance(child.tag, str):
                continue
            ccode = child.find("code")
            if child.tag == "observation" and (
                TRAVEL_PURPOSE in templates(child) or (ccode is not None and ccode.get("code") == "280147009")
            ):
                purpose = concept(child.find("value"), ctx)
                if purpose:
                    components.append(
                        {"code": cc(SNOMED, "280147009", "Type of activity"), "valueCodeableConcept": purpose}
                    )
                else:
                    ctx.warn("travel-purpose-empty", "purpose of travel observation has no value", child)
            else:
                ctx.warn(
                    "unmapped-entry",
                    f"{child.tag} inside a travel history is not converted "
                    f"(templateId {', '.join(sorted(templates(child))) or 'none'})",
                    child,
                )
    if components:
        res["component"] = components
    if (per or point) and located and addressed:
        res["meta"] = {"profile": [f"{ECR_PROFILE}/us-ph-travel-history"]}
    perf = performer_refs(act, ctx)
    if perf:
        res["performer"] = [{"reference": r} for r in perf]
    if ctx.encounter_ref:
        res["encounter"] = {"reference": ctx.encounter_ref}
    return [add(ctx, act, res)]


def pregnancy(o: El, ctx: Ctx) -> list[str]:
    """eICR Pregnancy Observation (code ASSERTION, value "Pregnant") -> Observation coded LOINC 82810-3
    "Pregnancy status", as the eCR IG's us-ph-pregnancy-status-observation.

    negationInd="true" on "Pregnant" means not pregnant, an observation nullFlavor means unknown: both
    become the value set's answers (60001007, 261665006) rather than a "Pregnant" value with a note.
    Nested observations (estimated date of delivery, gestational age) become components.
    """
    val = o.find("value")
    answer = None
    if o.get("nullFlavor"):
        answer = _PREGNANCY_UNKNOWN
    elif negated(o) and val is not None and val.get("code") == PREGNANT:
        answer = _NOT_PREGNANT
    ref = observation(o, ctx, "social-history", negation_expressed=answer is not None, members=False)
    if ref is None:
        return []
    res = ctx.b.get(ref) or {}
    res["code"] = cc(LOINC, "82810-3", "Pregnancy status")
    if answer:
        res.pop("dataAbsentReason", None)
        res["valueCodeableConcept"] = cc(SNOMED, *answer)
    components = []
    for er in o.findall("entryRelationship"):
        sub = er.find("observation")
        code = concept(sub.find("code"), ctx) if sub is not None else None
        if sub is None or code is None:
            continue
        comp: dict[str, Any] = {"code": code}
        sv = sub.find("value")
        v = value_x(sv, ctx) if sv is not None else {}
        if v:
            comp.update(v)
        elif sv is not None and sv.get("nullFlavor"):
            comp["dataAbsentReason"] = cc(
                "http://terminology.hl7.org/CodeSystem/data-absent-reason",
                NULL_FLAVOR_TO_DAR.get(sv.get("nullFlavor") or "", "unknown"),
            )
        else:
            ctx.warn(
                "pregnancy-component-empty", "observation inside a pregnancy observation has no value", sub
            )
            continue
        components.append(comp)
    if components:
        res["component"] = components
    if "effectiveDateTime" not in res:  # the profile takes a period only
        res["meta"] = {
            **res.get("meta", {}),
            "profile": [f"{ECR_PROFILE}/us-ph-pregnancy-status-observation"],
        }
    return [ref]
