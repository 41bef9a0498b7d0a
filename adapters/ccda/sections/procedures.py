"""Procedures section: Procedure Activity (procedure, observation, act) -> Procedure, with its implanted
devices; a planned one -> ServiceRequest."""

from __future__ import annotations

from typing import Any

from adapters.ccda.datatypes import Ctx, El, concept, effective
from adapters.ccda.sections.entry import add, add_note, entry_text, negated, performer_refs, status_code
from adapters.ccda.sections.equipment import product_devices
from adapters.ccda.sections.plan import planned

_PROC_STATUS = {
    "completed": "completed",
    "active": "in-progress",
    "aborted": "stopped",
    "cancelled": "not-done",
    "new": "preparation",
    "held": "on-hold",
    "suspended": "on-hold",
    "nullified": "entered-in-error",
}


def procedure(p: El, ctx: Ctx) -> list[str]:
    if p.get("moodCode") in ("INT", "RQO", "PRP", "ARQ", "PRMS", "APT"):
        return planned(p, ctx)
    code = concept(p.find("code"), ctx)
    if code is None:
        t = entry_text(p, ctx)
        code = {"text": t} if t else None
    devices = [] if negated(p) else product_devices(p, ctx)  # a negated procedure implanted nothing
    if code is None and devices:  # an implant recorded without its procedure: keep the device use
        code = {"text": "Device implantation (procedure not recorded)"}
        ctx.warn("procedure-no-code", "procedure has no code; converted for its device(s)", p)
    if code is None:
        ctx.warn("procedure-no-code", "procedure has no code; skipped", p)
        return []
    res: dict[str, Any] = {
        "resourceType": "Procedure",
        "status": "not-done" if negated(p) else _PROC_STATUS.get(status_code(p), "completed"),
        "code": code,
        "subject": {"reference": ctx.patient_ref},
    }
    point, per = effective(p.find("effectiveTime"), ctx)
    if per:
        res["performedPeriod"] = per
    elif point:
        res["performedDateTime"] = point
    sites = [concept(s, ctx) for s in p.findall("targetSiteCode")]
    sites = [s for s in sites if s]
    if sites:
        res["bodySite"] = sites
    perf = performer_refs(p, ctx)
    if perf:
        res["performer"] = [{"actor": {"reference": r}} for r in perf]
    reasons = []
    for er in p.findall("entryRelationship"):
        if er.get("typeCode") == "RSON":
            o = er.find("observation")
            if o is not None:
                rc = concept(o.find("value"), ctx) or concept(o.find("code"), ctx)
                if rc:
                    reasons.append(rc)
    if reasons:
        res["reasonCode"] = reasons
    if ctx.encounter_ref:
        res["encounter"] = {"reference": ctx.encounter_ref}
    add_note(res, p, ctx)
    if devices:
        res["focalDevice"] = [{"manipulated": {"reference": d}} for d in devices]
    return [add(ctx, p, res), *devices]
