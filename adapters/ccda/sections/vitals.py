"""Vital signs section: Vital Signs Organizer -> Observations (category ``vital-signs``)."""

from __future__ import annotations

from adapters.ccda.datatypes import Ctx, El, effective
from adapters.ccda.sections.observations import observation


def vitals_organizer(org: El, ctx: Ctx) -> list[str]:
    if org.tag == "observation":
        r = observation(org, ctx, "vital-signs")
        return [r] if r else []
    point, _ = effective(org.find("effectiveTime"), ctx)
    refs = []
    for comp in org.findall("component"):
        o = comp.find("observation")
        if o is not None:
            r = observation(o, ctx, "vital-signs", organizer_time=point)
            if r:
                refs.append(r)
    return refs
