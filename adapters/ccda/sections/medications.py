"""Medications section: Medication Activity -> MedicationStatement or MedicationRequest; a Medication
Supply Order inside it -> MedicationRequest."""

from __future__ import annotations

from typing import Any

from adapters.ccda.datatypes import Ctx, El, concept, decimal, effective_times, first, quantity, ts
from adapters.ccda.sections.entry import T, add, entry_text, negated, performer_refs, status_code, templates
from adapters.ccda.xmlsecure import XSI_TYPE

_MED_STATUS = {
    "active": "active",
    "completed": "completed",
    "aborted": "stopped",
    "cancelled": "not-taken",
    "suspended": "on-hold",
    "held": "on-hold",
    "nullified": "entered-in-error",
    "new": "intended",
}
_RX_STATUS = {
    "active": "active",
    "completed": "completed",
    "aborted": "stopped",
    "cancelled": "cancelled",
    "suspended": "on-hold",
    "held": "on-hold",
    "nullified": "entered-in-error",
    "new": "draft",
}
_PERIOD_UNITS = {"s": "s", "min": "min", "h": "h", "d": "d", "wk": "wk", "mo": "mo", "a": "a"}


def medication_concept(sa: El, ctx: Ctx) -> dict[str, Any] | None:
    mm = first(sa, "consumable/manufacturedProduct/manufacturedMaterial")
    if mm is None:
        return None
    c = concept(mm.find("code"), ctx)
    if c is None:
        nm = mm.find("name")
        if nm is not None and nm.text and nm.text.strip():
            c = {"text": " ".join(nm.text.split())}
    return c


def _dosage(sa: El, ctx: Ctx) -> dict[str, Any] | None:
    d: dict[str, Any] = {}
    t = entry_text(sa, ctx)
    if t:
        d["text"] = t
    for et in sa.findall("effectiveTime"):
        xt = et.get(XSI_TYPE) or ""
        if "PIVL" in xt:
            p = et.find("period")
            if p is not None and p.get("value"):
                v = decimal(p.get("value"))
                unit = _PERIOD_UNITS.get(p.get("unit") or "")
                if v is not None and unit:
                    d["timing"] = {"repeat": {"frequency": 1, "period": v, "periodUnit": unit}}
        elif "EIVL" in xt:
            ev = et.find("event")
            if ev is not None and ev.get("code"):
                d["timing"] = {"repeat": {"when": [ev.get("code")]}}
    route = concept(sa.find("routeCode"), ctx)
    if route:
        d["route"] = route
    site = concept(sa.find("approachSiteCode"), ctx)
    if site:
        d["site"] = site
    dq = sa.find("doseQuantity")
    if dq is not None:
        q = quantity(dq, ctx)
        if q is None and dq.find("low") is not None:
            lo, hi = quantity(dq.find("low"), ctx), quantity(dq.find("high"), ctx)
            if lo and hi:
                d["doseAndRate"] = [{"doseRange": {"low": lo, "high": hi}}]
        elif q:
            d["doseAndRate"] = [{"doseQuantity": q}]
    mx = sa.find("maxDoseQuantity")
    if mx is not None:
        n, de = quantity(mx.find("numerator"), ctx), quantity(mx.find("denominator"), ctx)
        if n and de:
            d["maxDosePerPeriod"] = {"numerator": n, "denominator": de}
    return d or None


def medication(sa: El, ctx: Ctx, planned: bool = False) -> list[str]:
    mood = sa.get("moodCode") or "EVN"
    med = medication_concept(sa, ctx)
    if med is None:
        ctx.warn("medication-no-code", "medication activity has no medication code or name; skipped", sa)
        return []
    status = status_code(sa)
    _, per = effective_times(sa, ctx)
    point = None
    if per is None:
        point, _ = effective_times(sa, ctx)
    dosage = _dosage(sa, ctx)
    reasons = []
    for er in sa.findall("entryRelationship"):
        if er.get("typeCode") == "RSON":
            o = er.find("observation")
            if o is not None:
                rc = concept(o.find("value"), ctx)
                if rc:
                    reasons.append(rc)
    if mood in ("INT", "RQO", "PRMS", "PRP", "ARQ") or planned:
        res: dict[str, Any] = {
            "resourceType": "MedicationRequest",
            "status": _RX_STATUS.get(status, "active" if status != "completed" else "completed"),
            "intent": "order" if mood in ("RQO", "INT") and not planned else "plan",
            "subject": {"reference": ctx.patient_ref},
            "medicationCodeableConcept": med,
        }
        if negated(sa):
            res["doNotPerform"] = True
        if dosage:
            if per:
                dosage.setdefault("timing", {}).setdefault("repeat", {})["boundsPeriod"] = per
            res["dosageInstruction"] = [dosage]
        authored = ts(first(sa, "author/time"), ctx)
        if authored:
            res["authoredOn"] = authored
        if reasons:
            res["reasonCode"] = reasons
        disp = sa.find("repeatNumber")
        if disp is not None and disp.get("value", "").isdigit():
            res["dispenseRequest"] = {"numberOfRepeatsAllowed": max(0, int(disp.get("value")) - 1)}
        perf = performer_refs(sa, ctx)
        if perf:
            res["requester"] = {"reference": perf[0]}
    else:
        res = {
            "resourceType": "MedicationStatement",
            "status": "not-taken"
            if negated(sa)
            else _MED_STATUS.get(status, "active" if not status else "unknown"),
            "subject": {"reference": ctx.patient_ref},
            "medicationCodeableConcept": med,
        }
        if per:
            res["effectivePeriod"] = per
        elif point:
            res["effectiveDateTime"] = point
        if dosage:
            res["dosage"] = [dosage]
        if reasons:
            res["reasonCode"] = reasons
        asserted = ts(first(sa, "author/time"), ctx)
        if asserted:
            res["dateAsserted"] = asserted
    if ctx.encounter_ref and res["resourceType"] == "MedicationRequest":
        res["encounter"] = {"reference": ctx.encounter_ref}
    refs = [add(ctx, sa, res)]
    if res["resourceType"] == "MedicationStatement":
        refs += _supply_orders(sa, ctx, med, refs[0])
    return refs


def _supply_orders(sa: El, ctx: Ctx, med: dict[str, Any], statement_ref: str) -> list[str]:
    """Medication Supply Orders (4.17) inside a medication activity -> MedicationRequest (the order)."""
    out = []
    for er in sa.findall("entryRelationship"):
        sup = er.find("supply")
        if sup is None or sup.get("moodCode") != "INT":
            continue
        if f"{T}.4.17" not in templates(sup) and er.get("typeCode") != "REFR":
            continue
        product = medication_concept(sup, ctx) or med
        res: dict[str, Any] = {
            "resourceType": "MedicationRequest",
            "status": _RX_STATUS.get(
                status_code(sup), "active" if status_code(sup) != "completed" else "completed"
            ),
            "intent": "order",
            "subject": {"reference": ctx.patient_ref},
            "medicationCodeableConcept": product,
        }
        disp: dict[str, Any] = {}
        rep = sup.find("repeatNumber")
        if rep is not None and (rep.get("value") or "").isdigit():
            disp["numberOfRepeatsAllowed"] = max(0, int(rep.get("value")) - 1)
        qty = quantity(sup.find("quantity"), ctx)
        if qty:
            disp["quantity"] = {k: v for k, v in qty.items() if k != "comparator"}
        _, per = effective_times(sup, ctx)
        if per:
            disp["validityPeriod"] = per
        if disp:
            res["dispenseRequest"] = disp
        authored = ts(first(sup, "author/time"), ctx)
        if authored:
            res["authoredOn"] = authored
        perf = performer_refs(sup, ctx)
        if perf:
            res["requester"] = {"reference": perf[0]}
        res["note"] = [{"text": f"Order for the medication statement {statement_ref}"}]
        out.append(add(ctx, sup, res, "supply-order"))
    return out
