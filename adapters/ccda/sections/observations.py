"""One C-CDA observation -> Observation: the converter behind results, vital signs, social history and
the eICR entries."""

from __future__ import annotations

from typing import Any

from adapters.ccda.datatypes import (
    NULL_FLAVOR_TO_DAR,
    Ctx,
    El,
    concept,
    effective,
    quantity,
    text_of,
    value_x,
)
from adapters.ccda.sections.entry import (
    OBS_CAT,
    add,
    add_note,
    cc,
    entry_text,
    negated,
    performer_refs,
    status_code,
)

OBS_STATUS = {
    "completed": "final",
    "active": "preliminary",
    "aborted": "cancelled",
    "cancelled": "cancelled",
    "nullified": "entered-in-error",
    "held": "registered",
    "new": "registered",
    "suspended": "preliminary",
}


def observation(
    o: El,
    ctx: Ctx,
    category: str,
    *,
    organizer_time: str | None = None,
    negation_expressed: bool = False,
    members: bool = True,
) -> str | None:
    res: dict[str, Any] = {
        "resourceType": "Observation",
        "status": OBS_STATUS.get(status_code(o), "final"),
        "category": [cc(OBS_CAT, category)],
        "subject": {"reference": ctx.patient_ref},
    }
    code = concept(o.find("code"), ctx)
    if code is None:
        t = entry_text(o, ctx)
        code = {"text": t} if t else None
    if code is None:
        ctx.warn("observation-no-code", "observation has no code; skipped", o)
        return None
    res["code"] = code
    point, per = effective(o.find("effectiveTime"), ctx)
    if per:
        res["effectivePeriod"] = per
    elif point or organizer_time:
        res["effectiveDateTime"] = point or organizer_time
    val = o.find("value")
    if val is not None:
        v = value_x(val, ctx)
        if v:
            res.update(v)
        elif val.get("nullFlavor"):
            res["dataAbsentReason"] = cc(
                "http://terminology.hl7.org/CodeSystem/data-absent-reason",
                NULL_FLAVOR_TO_DAR.get(val.get("nullFlavor") or "", "unknown"),
            )
    if negated(o) and not negation_expressed:
        ctx.warn(
            "negated-observation",
            "observation has negationInd=true, which a FHIR Observation cannot express; kept with a note",
            o,
        )
        res.setdefault("note", []).append(
            {"text": "Source observation negated (negationInd=true): not observed"}
        )
    interp = [concept(i, ctx) for i in o.findall("interpretationCode")]
    interp = [i for i in interp if i]
    if interp:
        res["interpretation"] = interp
    ranges = []
    for rr in o.findall("referenceRange/observationRange"):
        r: dict[str, Any] = {}
        rv = rr.find("value")
        if rv is not None:
            lo, hi = quantity(rv.find("low"), ctx), quantity(rv.find("high"), ctx)
            if lo:
                r["low"] = {k: v for k, v in lo.items() if k != "comparator"}
            if hi:
                r["high"] = {k: v for k, v in hi.items() if k != "comparator"}
        t = text_of(rr.find("text"), ctx)
        if t:
            r["text"] = t
        if r:
            ranges.append(r)
    if ranges:
        res["referenceRange"] = ranges
    method = concept(o.find("methodCode"), ctx)
    if method:
        res["method"] = method
    site = concept(o.find("targetSiteCode"), ctx)
    if site:
        res["bodySite"] = site
    perf = performer_refs(o, ctx)
    if perf:
        res["performer"] = [{"reference": r} for r in perf]
    if ctx.encounter_ref:
        res["encounter"] = {"reference": ctx.encounter_ref}
    add_note(res, o, ctx)
    if members:
        # observations inside an observation (a nutrition assessment in a nutritional status, an
        # assessment scale's items) are facts of their own: converted alike and listed as hasMember
        nested = [
            r
            for er in o.findall("entryRelationship")
            for sub in er.findall("observation")
            if sub.find("code") is not None
            for r in [observation(sub, ctx, category)]
            if r
        ]
        if nested:
            res["hasMember"] = [{"reference": r} for r in nested]
    return add(ctx, o, res)
