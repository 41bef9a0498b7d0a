"""Goals section: Goal Observation -> Goal."""

from __future__ import annotations

from typing import Any

from adapters.ccda.datatypes import Ctx, El, concept, onset, value_x
from adapters.ccda.sections.entry import add, add_note, entry_text, status_code


def goal(o: El, ctx: Ctx) -> list[str]:
    desc = concept(o.find("code"), ctx) or concept(o.find("value"), ctx)
    if desc is None:
        t = entry_text(o, ctx)
        desc = {"text": t or "Goal"}
    res: dict[str, Any] = {
        "resourceType": "Goal",
        "lifecycleStatus": {
            "completed": "completed",
            "cancelled": "cancelled",
            "aborted": "cancelled",
            "suspended": "on-hold",
            "nullified": "entered-in-error",
        }.get(status_code(o), "active"),
        "description": desc,
        "subject": {"reference": ctx.patient_ref},
    }
    start, _ = onset(o, ctx)
    if start:
        res["startDate"] = start[:10]
    val = o.find("value")
    if val is not None and o.find("code") is not None:
        v = value_x(val, ctx, prefix="detail")
        target: dict[str, Any] = {}
        if "detailString" in v or "detailQuantity" in v or "detailCodeableConcept" in v or "detailRange" in v:
            target.update(v)
        if target:
            res["target"] = [target]
    add_note(res, o, ctx)
    return [add(ctx, o, res)]
