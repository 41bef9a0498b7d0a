"""Payers section: Coverage Activity -> Policy Activity -> Coverage."""

from __future__ import annotations

from typing import Any

from adapters.ccda.datatypes import Ctx, El, concept, identifiers, period
from adapters.ccda.header import organization
from adapters.ccda.sections.entry import T, add, status_code, templates


def coverage(act: El, ctx: Ctx) -> list[str]:
    refs: list[str] = []
    policies = [er.find("act") for er in act.findall("entryRelationship")]
    if f"{T}.4.61" in templates(act):
        policies = [act]
    for pol in policies:
        if pol is None:
            continue
        payor_refs = []
        for perf in pol.findall("performer"):
            ae = perf.find("assignedEntity")
            if ae is None:
                continue
            ro = ae.find("representedOrganization")
            r = organization(ro if ro is not None else ae, ctx, extra_ids_from=ae)
            if r:
                payor_refs.append(r)
        if not payor_refs:
            ctx.warn("coverage-no-payer", "policy activity names no payer organization; skipped", pol)
            continue
        res: dict[str, Any] = {
            "resourceType": "Coverage",
            "status": "active" if status_code(pol) in ("", "completed", "active") else "cancelled",
            "beneficiary": {"reference": ctx.patient_ref},
            "payor": [{"reference": payor_refs[0]}],
        }
        t = concept(pol.find("code"), ctx)
        if t:
            res["type"] = t
        for part in pol.findall("participant"):
            if part.get("typeCode") in ("COV", "HLD"):
                pr = part.find("participantRole")
                if pr is not None:
                    ident = identifiers(pr, ctx)
                    if ident and part.get("typeCode") == "COV":
                        res["subscriberId"] = ident[0]["value"]
                    rel = concept(pr.find("code"), ctx)
                    if rel and part.get("typeCode") == "COV":
                        res["relationship"] = rel
                    tm = period(part.find("time"), ctx)
                    if tm and part.get("typeCode") == "COV":
                        res["period"] = tm
        refs.append(add(ctx, pol, res))
    return refs
