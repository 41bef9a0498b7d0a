"""Plan of treatment section: planned acts, observations, procedures, encounters and supplies ->
ServiceRequest; planned medications -> MedicationRequest; goals -> Goal."""

from __future__ import annotations

from typing import Any

from adapters.ccda.datatypes import Ctx, El, concept, effective, first, ts
from adapters.ccda.sections.entry import T, add, add_note, entry_text, negated, status_code, templates
from adapters.ccda.sections.goals import goal
from adapters.ccda.sections.medications import medication


def planned(el: El, ctx: Ctx) -> list[str]:
    if el.tag == "substanceAdministration":
        return medication(el, ctx, planned=True)
    if f"{T}.4.121" in templates(el):
        return goal(el, ctx)
    code = concept(el.find("code"), ctx)
    if code is None:
        t = entry_text(el, ctx)
        code = {"text": t} if t else None
    if code is None:
        ctx.warn("plan-no-code", f"planned {el.tag} has no code; skipped", el)
        return []
    mood = el.get("moodCode") or "INT"
    res: dict[str, Any] = {
        "resourceType": "ServiceRequest",
        "status": {
            "active": "active",
            "completed": "completed",
            "cancelled": "revoked",
            "aborted": "revoked",
            "nullified": "entered-in-error",
            "new": "draft",
        }.get(status_code(el), "active"),
        "intent": {"RQO": "order", "PRP": "proposal", "ARQ": "order", "PRMS": "plan", "APT": "order"}.get(
            mood, "plan"
        ),
        "code": code,
        "subject": {"reference": ctx.patient_ref},
    }
    if negated(el):
        res["doNotPerform"] = True
    point, per = effective(el.find("effectiveTime"), ctx)
    if per:
        res["occurrencePeriod"] = per
    elif point:
        res["occurrenceDateTime"] = point
    authored = ts(first(el, "author/time"), ctx)
    if authored:
        res["authoredOn"] = authored
    add_note(res, el, ctx)
    return [add(ctx, el, res)]
