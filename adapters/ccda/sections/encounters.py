"""Encounters section and the header's encompassingEncounter -> Encounter, with typed participants,
locations, diagnoses and reasons."""

from __future__ import annotations

from typing import Any

from adapters.ccda.datatypes import Ctx, El, concept, first, period
from adapters.ccda.header import location, organization, practitioner, practitioner_role
from adapters.ccda.sections.entry import PARTICIPATION_TYPE, T, add, cc, status_code, templates
from adapters.ccda.sections.plan import planned
from adapters.ccda.sections.problems import problem_concern
from adapters.common.encounter_class import ENCOUNTER_CLASSES, encounter_class

#: v3-ParticipationType codes of encounter participants (FHIR's encounter-participant-type value set
#: and the CDA performer type) -> display.
_PARTICIPATION_TYPES = {
    "ADM": "admitter",
    "ATND": "attender",
    "CALLBCK": "callback contact",
    "CON": "consultant",
    "DIS": "discharger",
    "ESC": "escort",
    "REF": "referrer",
    "PPRF": "primary performer",
    "SPRF": "secondary performer",
    "PRF": "performer",
    "PART": "Participation",
}
#: v3-ParticipationFunction (sdtc:functionCode of a performer) -> the participation type it means.
_FUNCTION_TO_TYPE = {"ATTPHYS": "ATND", "ADMPHYS": "ADM", "DISPHYS": "DIS"}
_PARTICIPATION_FUNCTION_OID = "2.16.840.1.113883.5.88"


def _participation(code: str) -> dict[str, Any]:
    return cc(PARTICIPATION_TYPE, code, _PARTICIPATION_TYPES[code])


def _encounter_participants(
    e: El, ctx: Ctx, *, header: bool
) -> tuple[list[dict[str, Any]], list[tuple[str, El]]]:
    """Encounter.participant entries (Practitioners with their v3-ParticipationType) and the
    organisations named where a person was expected, with their elements (for the service provider).

    The header's responsibleParty is the attender (the eCR IG's responsible provider, ATND);
    encounterParticipant keeps its typeCode (ADM, ATND, CON, DIS, REF) and time; an encounter activity's
    performer is typed by its sdtc:functionCode (ATTPHYS, ADMPHYS, DISPHYS), else by its typeCode (PRF,
    PPRF, SPRF). Authors are participants without a type: FHIR R4 Encounter has no recorder.
    """
    people: list[tuple[El, str | None, El | None, El | None]] = []  # (assignedEntity, type, function, time)
    if header:
        rp = first(e, "responsibleParty/assignedEntity")
        if rp is not None:
            people.append((rp, "ATND", None, None))
    for tag, default_type in (("encounterParticipant", ""), ("performer", "PRF")):
        for p in e.findall(tag):
            ae = p.find("assignedEntity")
            if ae is not None:
                tc = p.get("typeCode") or default_type
                fn = first(p, "sdtc_functionCode", "functionCode")
                people.append((ae, tc if tc in _PARTICIPATION_TYPES else None, fn, p.find("time")))
    for au in e.findall("author"):
        ae = au.find("assignedAuthor")
        if ae is not None:
            people.append((ae, None, None, None))
    parts: list[dict[str, Any]] = []
    orgs: list[tuple[str, El]] = []
    for ae, ptype, fn, time in people:
        ref = practitioner(ae, ctx)
        if ref is None:
            continue
        if not ref.startswith("Practitioner/"):
            if ref.startswith("Organization/"):
                orgs.append((ref, ae))
            else:  # an authoring device: not a participant of the encounter
                ctx.warn("encounter-participant-dropped", "a device cannot be an encounter participant", ae)
            continue
        types: list[dict[str, Any]] = []
        function = concept(fn, ctx) if fn is not None else None
        if (
            fn is not None
            and (fn.get("codeSystem") or _PARTICIPATION_FUNCTION_OID) == _PARTICIPATION_FUNCTION_OID
        ):
            ptype = _FUNCTION_TO_TYPE.get(fn.get("code") or "", ptype)
        if ptype:
            types.append(_participation(ptype))
        if function:
            types.append(function)
        part: dict[str, Any] = {}
        if types:
            part["type"] = types
        per = period(time, ctx)
        if per:
            part["period"] = per
        part["individual"] = {"reference": ref}
        if part not in parts:
            parts.append(part)
        practitioner_role(ae, ref, ctx)
    return parts, orgs


def encounter(e: El, ctx: Ctx, *, header: bool = False) -> list[str]:
    if e.get("moodCode") in ("INT", "RQO", "PRP", "ARQ", "PRMS", "APT"):
        return planned(e, ctx)
    code = concept(e.find("code"), ctx)
    cls = None
    for c in (code or {}).get("coding", []):
        if c.get("system", "").endswith("v3-ActCode") and c.get("code") in ENCOUNTER_CLASSES:
            cls = c["code"]
    status = status_code(e)
    res: dict[str, Any] = {
        "resourceType": "Encounter",
        "status": {
            "active": "in-progress",
            "cancelled": "cancelled",
            "aborted": "cancelled",
            "nullified": "entered-in-error",
            "new": "planned",
        }.get(status, "finished"),
        "class": encounter_class(cls),
        "subject": {"reference": ctx.patient_ref},
    }
    if code:
        res["type"] = [code]
    per = period(e.find("effectiveTime"), ctx)
    if per:
        res["period"] = per
    parts, orgs = _encounter_participants(e, ctx, header=header)
    if parts:
        res["participant"] = parts
    provider = None
    hf = first(e, "location/healthCareFacility")
    spo = hf.find("serviceProviderOrganization") if hf is not None else None
    if spo is not None:
        provider = organization(spo, ctx)
    for org_ref, el in orgs:  # an organisation as responsible party or performer
        if provider is None:
            provider = org_ref
        elif org_ref != provider:
            ctx.warn(
                "encounter-organization-dropped",
                "the encounter already has a service provider; this organisation is not converted",
                el,
            )
    if provider:
        res["serviceProvider"] = {"reference": provider}
    locs = []
    for part in e.findall("participant"):
        if part.get("typeCode") == "LOC":
            pr = part.find("participantRole")
            if pr is not None:
                r = location(pr, ctx)
                if r:
                    locs.append({"location": {"reference": r}})
    if hf is not None:
        r = location(hf, ctx, managing_organization=provider if spo is not None else None)
        if r:
            locs.append({"location": {"reference": r}})
    if locs:
        res["location"] = locs
    reasons = []
    diag_refs: list[str] = []
    for er in e.findall("entryRelationship"):
        for child in er:
            if not isinstance(child.tag, str):
                continue
            tpl = templates(child)
            if f"{T}.4.80" in tpl:
                diag_refs += problem_concern(child, ctx, "encounter-diagnosis")
            elif er.get("typeCode") == "RSON" and child.tag == "observation":
                rc = concept(child.find("value"), ctx)
                if rc:
                    reasons.append(rc)
    if reasons:
        res["reasonCode"] = reasons
    if diag_refs:
        res["diagnosis"] = [{"condition": {"reference": r}} for r in diag_refs]
    dd = first(e, "dischargeDispositionCode", "sdtc_dischargeDispositionCode")
    if dd is not None:
        c = concept(dd, ctx)
        if c:
            res["hospitalization"] = {"dischargeDisposition": c}
    ref = add(ctx, e, res)
    return [ref, *diag_refs]
