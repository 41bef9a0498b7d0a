"""Results section: Result Organizer -> DiagnosticReport and its Observations."""

from __future__ import annotations

from typing import Any

from adapters.ccda.datatypes import Ctx, El, concept, effective
from adapters.ccda.sections.entry import add, cc, entry_text, performer_refs, status_code
from adapters.ccda.sections.observations import observation


def result_organizer(org: El, ctx: Ctx) -> list[str]:
    if org.tag == "observation":
        r = observation(org, ctx, "laboratory")
        return [r] if r else []
    refs: list[str] = []
    point, per = effective(org.find("effectiveTime"), ctx)
    for comp in org.findall("component"):
        o = comp.find("observation")
        if o is None:
            continue
        r = observation(o, ctx, "laboratory", organizer_time=point)
        if r:
            refs.append(r)
    code = concept(org.find("code"), ctx)
    if code is None:
        code = {"text": entry_text(org, ctx) or "Result panel"}
        ctx.warn("organizer-no-code", "result organizer has no code", org)
    rep: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "status": {"completed": "final", "active": "preliminary", "aborted": "cancelled"}.get(
            status_code(org), "final"
        ),
        "category": [cc("http://terminology.hl7.org/CodeSystem/v2-0074", "LAB")],
        "code": code,
        "subject": {"reference": ctx.patient_ref},
    }
    if per:
        rep["effectivePeriod"] = per
    elif point:
        rep["effectiveDateTime"] = point
    if refs:
        rep["result"] = [{"reference": r} for r in refs]
    perf = performer_refs(org, ctx)
    if perf:
        rep["performer"] = [{"reference": r} for r in perf]
    if ctx.encounter_ref:
        rep["encounter"] = {"reference": ctx.encounter_ref}
    return [add(ctx, org, rep), *refs]
