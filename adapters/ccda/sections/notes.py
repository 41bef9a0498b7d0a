"""Notes section: Note Activity -> DocumentReference."""

from __future__ import annotations

from typing import Any

from adapters.ccda.datatypes import Ctx, El, attachment_from_ed, concept, effective
from adapters.ccda.sections.entry import LOINC, add, cc, performer_refs


def note(act: El, ctx: Ctx) -> list[str]:
    att = attachment_from_ed(act.find("text"), ctx) if act.find("text") is not None else None
    if att is None:
        ctx.warn("note-no-content", "note activity has no text; skipped", act)
        return []
    res: dict[str, Any] = {
        "resourceType": "DocumentReference",
        "status": "current",
        "type": concept(act.find("code"), ctx) or cc(LOINC, "34109-9", "Note"),
        "subject": {"reference": ctx.patient_ref},
        "content": [{"attachment": att}],
    }
    point, _ = effective(act.find("effectiveTime"), ctx)
    if point and "T" in point:
        res["date"] = point
    authors = performer_refs(act, ctx)
    if authors:
        res["author"] = [{"reference": r} for r in authors]
    if ctx.encounter_ref:
        res["context"] = {"encounter": [{"reference": ctx.encounter_ref}]}
    return [add(ctx, act, res)]
