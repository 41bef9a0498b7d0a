"""Immunizations section: Immunization Activity -> Immunization; a planned one -> MedicationRequest."""

from __future__ import annotations

from typing import Any

from adapters.ccda.datatypes import Ctx, El, concept, effective_times, first, quantity
from adapters.ccda.header import organization
from adapters.ccda.sections.entry import T, add, add_note, cc, negated, performer_refs, status_code, templates
from adapters.ccda.sections.medications import medication, medication_concept


def immunization(sa: El, ctx: Ctx) -> list[str]:
    if sa.get("moodCode") in ("INT", "RQO", "PRP"):
        return medication(sa, ctx, planned=True)
    vaccine = medication_concept(sa, ctx)
    if vaccine is None:
        vaccine = cc("http://terminology.hl7.org/CodeSystem/data-absent-reason", "unknown", "Unknown")
        ctx.warn("immunization-no-vaccine", "immunization has no vaccine code", sa)
    res: dict[str, Any] = {
        "resourceType": "Immunization",
        "status": "not-done"
        if negated(sa)
        else ("entered-in-error" if status_code(sa) == "nullified" else "completed"),
        "vaccineCode": vaccine,
        "patient": {"reference": ctx.patient_ref},
    }
    point, per = effective_times(sa, ctx)
    occ = point or (per or {}).get("start")
    if occ:
        res["occurrenceDateTime"] = occ
    else:
        res["occurrenceString"] = "unknown"
        ctx.warn("immunization-no-date", "immunization has no date", sa)
    res["primarySource"] = True
    lot = first(sa, "consumable/manufacturedProduct/manufacturedMaterial/lotNumberText")
    if lot is not None and lot.text and lot.text.strip():
        res["lotNumber"] = lot.text.strip()
    mfr = first(sa, "consumable/manufacturedProduct/manufacturerOrganization")
    if mfr is not None:
        r = organization(mfr, ctx)
        if r:
            res["manufacturer"] = {"reference": r}
    route = concept(sa.find("routeCode"), ctx)
    if route:
        res["route"] = route
    site = concept(sa.find("approachSiteCode"), ctx)
    if site:
        res["site"] = site
    dq = quantity(sa.find("doseQuantity"), ctx)
    if dq:
        res["doseQuantity"] = dq
    if negated(sa):
        for er in sa.findall("entryRelationship"):
            o = er.find("observation")
            if o is not None and (er.get("typeCode") == "RSON" or f"{T}.4.53" in templates(o)):
                reason = concept(o.find("code"), ctx)
                if reason:
                    res["statusReason"] = reason
    perf = performer_refs(sa, ctx)
    if perf:
        res["performer"] = [{"actor": {"reference": r}} for r in perf]
    if ctx.encounter_ref:
        res["encounter"] = {"reference": ctx.encounter_ref}
    add_note(res, sa, ctx)
    return [add(ctx, sa, res)]
