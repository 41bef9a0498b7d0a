"""Problems section (and health concerns, encounter diagnoses): Problem Concern Act -> Condition."""

from __future__ import annotations

from typing import Any

from adapters.ccda.datatypes import Ctx, El, concept, first, onset, ts
from adapters.ccda.sections.entry import T, add, add_note, cc, entry_text, negated, status_code, templates

_PROBLEM_STATUS = {
    "55561003": "active",
    "73425007": "inactive",
    "413322009": "resolved",
    "246455001": "recurrence",
    "277022003": "remission",
}


def problem_concern(act: El, ctx: Ctx, category: str = "problem-list-item") -> list[str]:
    obs_list = [o for er in act.findall("entryRelationship") for o in er.findall("observation")]
    if act.tag == "observation":
        obs_list = [act]
    out = []
    for o in obs_list:
        if f"{T}.4.6" in templates(o) or f"{T}.4.28" in templates(o):
            continue
        r = condition(o, ctx, category, status_code(act), act)
        if r:
            out.append(r)
    return out


def condition(o: El, ctx: Ctx, category: str, concern_status: str, act: El) -> str | None:
    res: dict[str, Any] = {"resourceType": "Condition", "subject": {"reference": ctx.patient_ref}}
    if category == "problem-list-item" and f"{T}.4.500" in templates(act):
        category = "health-concern"
    cat_system = (
        "http://hl7.org/fhir/us/core/CodeSystem/condition-category"
        if category == "health-concern"
        else "http://terminology.hl7.org/CodeSystem/condition-category"
    )
    res["category"] = [cc(cat_system, category)]
    val = o.find("value")
    code = concept(val, ctx) if val is not None else None
    if code is None:
        txt = entry_text(o, ctx)
        if txt:
            code = {"text": txt}
    if code is None and val is not None and val.get("nullFlavor"):
        ctx.warn("null-flavor", f"problem value is nullFlavor {val.get('nullFlavor')}", val)
    if code:
        res["code"] = code
    start, end = onset(o, ctx)
    clin = None
    for er in o.findall("entryRelationship"):
        so = er.find("observation")
        if so is not None and f"{T}.4.6" in templates(so):
            sv = so.find("value")
            clin = _PROBLEM_STATUS.get((sv.get("code") if sv is not None else "") or "")
    if clin is None:
        if end:
            clin = "resolved"
        else:
            clin = {"completed": "resolved", "suspended": "inactive", "aborted": "inactive"}.get(
                concern_status, "active"
            )
    if negated(o):
        res["verificationStatus"] = cc(
            "http://terminology.hl7.org/CodeSystem/condition-ver-status", "refuted"
        )
    else:
        res["verificationStatus"] = cc(
            "http://terminology.hl7.org/CodeSystem/condition-ver-status", "confirmed"
        )
    if clin in ("resolved", "inactive", "remission") or not end:
        res["clinicalStatus"] = cc("http://terminology.hl7.org/CodeSystem/condition-clinical", clin)
    else:
        res["clinicalStatus"] = cc("http://terminology.hl7.org/CodeSystem/condition-clinical", "resolved")
    if start:
        res["onsetDateTime"] = start
    if end:
        res["abatementDateTime"] = end
    elif (
        o.find("effectiveTime/high") is not None
        and o.find("effectiveTime/high").get("nullFlavor")
        and res["clinicalStatus"]["coding"][0]["code"] == "resolved"
    ):
        res["abatementString"] = "unknown"
    recorded = ts(first(o, "author/time"), ctx) or ts(first(act, "author/time"), ctx)
    if recorded:
        res["recordedDate"] = recorded
    site = [concept(s, ctx) for s in o.findall("targetSiteCode")]
    if any(site):
        res["bodySite"] = [s for s in site if s]
    if ctx.encounter_ref and category == "encounter-diagnosis":
        res["encounter"] = {"reference": ctx.encounter_ref}
    add_note(res, o, ctx)
    return add(ctx, o, res)
