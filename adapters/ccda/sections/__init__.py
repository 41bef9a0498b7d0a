"""C-CDA R2.1 section entries -> FHIR R4 resources.

Sections are recognised by templateId and, for vendor documents without one, by their LOINC code
(:data:`SECTIONS`). Entries are then dispatched on their own templateId when present, else on the
section kind and the entry's element (``act``, ``observation``, ``substanceAdministration`` ...).
Every converter returns the references of the resources it added, so the Composition section can
list them. Unknown entries are reported as warnings, never dropped silently.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from adapters.ccda.datatypes import (
    NULL_FLAVOR_TO_DAR,
    Ctx,
    El,
    attachment_from_ed,
    concept,
    effective,
    effective_times,
    first,
    id_key,
    identifiers,
    onset,
    period,
    quantity,
    text_of,
    ts,
    value_x,
)
from adapters.ccda.xmlsecure import XSI_TYPE

T = "2.16.840.1.113883.10.20.22"
SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"
OBS_CAT = "http://terminology.hl7.org/CodeSystem/observation-category"

#: section kind -> (section templateId roots, LOINC codes)
SECTIONS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "allergies": ((f"{T}.2.6", f"{T}.2.6.1"), ("48765-2",)),
    "medications": (
        (f"{T}.2.1", f"{T}.2.1.1", f"{T}.2.38", f"{T}.2.11", f"{T}.2.11.1"),
        ("10160-0", "29549-3", "10183-2"),
    ),
    "problems": (
        (f"{T}.2.5", f"{T}.2.5.1", f"{T}.2.24", f"{T}.2.20", f"{T}.2.58", f"{T}.2.43"),
        ("11450-4", "11535-2", "11348-0", "75310-3", "46241-6"),
    ),
    "results": ((f"{T}.2.3", f"{T}.2.3.1"), ("30954-2",)),
    "vitals": ((f"{T}.2.4", f"{T}.2.4.1"), ("8716-3",)),
    "immunizations": ((f"{T}.2.2", f"{T}.2.2.1"), ("11369-6",)),
    "procedures": ((f"{T}.2.7", f"{T}.2.7.1"), ("47519-4",)),
    "encounters": ((f"{T}.2.22", f"{T}.2.22.1"), ("46240-8",)),
    "social": ((f"{T}.2.17",), ("29762-2",)),
    "family": ((f"{T}.2.15",), ("10157-6",)),
    "plan": ((f"{T}.2.10", "2.16.840.1.113883.10.20.21.2.3"), ("18776-5",)),
    "goals": ((f"{T}.2.60",), ("61146-7",)),
    "payers": ((f"{T}.2.18",), ("48768-6",)),
    "notes": ((f"{T}.2.65",), ("11488-4",)),
    "equipment": ((f"{T}.2.23",), ("46264-8",)),
}
_BY_TEMPLATE = {t: k for k, (ts_, _) in SECTIONS.items() for t in ts_}
_BY_CODE = {c: k for k, (_, cs) in SECTIONS.items() for c in cs}


def section_kind(section: El) -> str | None:
    """The kind of ``section`` (key of :data:`SECTIONS`), or ``None`` for narrative-only sections."""
    for t in section.findall("templateId"):
        k = _BY_TEMPLATE.get(t.get("root") or "")
        if k:
            return k
    code = section.find("code")
    if code is not None:
        return _BY_CODE.get(code.get("code") or "")
    return None


def templates(el: El) -> set[str]:
    return {t.get("root") or "" for t in el.findall("templateId")}


def negated(el: El) -> bool:
    return (el.get("negationInd") or "").lower() == "true"


def status_code(el: El) -> str:
    sc = el.find("statusCode")
    return (sc.get("code") or "").lower() if sc is not None else ""


def cc(system: str, code: str, display: str | None = None) -> dict[str, Any]:
    c: dict[str, Any] = {"system": system, "code": code}
    if display:
        c["display"] = display
    return {"coding": [c]}


def add(ctx: Ctx, el: El, res: dict[str, Any], *extra: object) -> str:
    """Add ``res`` with a key from the element's id (else document + XPath), plus identifiers."""
    ids = identifiers(el, ctx)
    if ids and "identifier" not in res and res["resourceType"] not in ("Patient",):
        res["identifier"] = ids
    k = id_key(el)
    key = ("cda", k, *extra) if k else ("xpath", ctx.key(el), *extra)
    ref = f"{res['resourceType']}/{ctx.b.id_for(res['resourceType'], *key)}"
    if ctx.b.has(ref):  # the same id reused inside the document: fall back to the position
        key = ("xpath", ctx.key(el), *extra)
    return ctx.b.add(res, *key)


def entry_text(el: El, ctx: Ctx) -> str | None:
    return text_of(el.find("text"), ctx)


def _note(res: dict[str, Any], el: El, ctx: Ctx) -> None:
    t = entry_text(el, ctx)
    if t:
        res.setdefault("note", []).append({"text": t})


def _performer_refs(el: El, ctx: Ctx) -> list[str]:
    from adapters.ccda.header import practitioner

    refs = []
    for p in el.findall("performer") + el.findall("author"):
        ae = first(p, "assignedEntity", "assignedAuthor")
        if ae is not None:
            r = practitioner(ae, ctx)
            if r:
                refs.append(r)
    return refs


# =====================================================================================================
# Allergies
# =====================================================================================================
_ALLERGY_TYPE = {
    "419199007": (None, None),  # allergy to substance (generic)
    "420134006": (None, None),  # propensity to adverse reactions
    "418038007": ("environment", None),
    "419511003": ("medication", None),
    "418471000": ("food", None),
    "416098002": ("medication", "allergy"),
    "414285001": ("food", "allergy"),
    "232347008": ("environment", "allergy"),
    "59037007": ("medication", "intolerance"),
    "235719002": ("food", "intolerance"),
    "418689008": (None, "allergy"),
    "782197009": (None, "intolerance"),
}
_SEVERITY = {
    "255604002": "mild",
    "6736007": "moderate",
    "24484000": "severe",
    "371923003": "moderate",
    "371924009": "severe",
    "399166001": "severe",
}
_CRIT = {"CRITL": "low", "CRITH": "high", "CRITU": "unable-to-assess"}


#: generic "any substance" codes: negated, they mean "no known allergy" rather than a refuted allergy.
_GENERIC_SUBSTANCES = {"105590001", "410942007", "255620007", "414916001"}
_NO_KNOWN = {
    "medication": ("409137002", "No known drug allergy"),
    "food": ("429625007", "No known food allergy"),
    "environment": ("428607008", "No known environmental allergy"),
}


def _codes_of(c: dict[str, Any]) -> set[str]:
    return {x.get("code", "") for x in c.get("coding", [])}


def allergy_concern(act: El, ctx: Ctx) -> list[str]:
    obs_list = [o for er in act.findall("entryRelationship") for o in er.findall("observation")]
    if act.tag == "observation":
        obs_list = [act]
    out = []
    concern_status = status_code(act)
    for o in obs_list:
        r = allergy(o, ctx, concern_status, act)
        if r:
            out.append(r)
    return out


def allergy(o: El, ctx: Ctx, concern_status: str, act: El) -> str | None:
    res: dict[str, Any] = {"resourceType": "AllergyIntolerance", "patient": {"reference": ctx.patient_ref}}
    pe = first(o, "participant/participantRole/playingEntity")
    code = concept(pe.find("code"), ctx) if pe is not None else None
    if code is None and pe is not None:
        nm = pe.find("name")
        if nm is not None and nm.text and nm.text.strip():
            code = {"text": " ".join(nm.text.split())}
    val = o.find("value")
    vcode = (val.get("code") or "") if val is not None else ""
    cat, typ = _ALLERGY_TYPE.get(vcode, (None, None))
    if cat:
        res["category"] = [cat]
    if typ:
        res["type"] = typ
    if negated(o):
        # A null-flavoured substance code is generic only when it carries no text either: a substance
        # named in originalText or playingEntity/name is a refuted allergy to that substance.
        if code is None or bool(_codes_of(code) & _GENERIC_SUBSTANCES):
            nka = _NO_KNOWN.get(cat or "", ("716186003", "No known allergy"))
            res["code"] = cc(SNOMED, *nka)
            res["verificationStatus"] = cc(
                "http://terminology.hl7.org/CodeSystem/allergyintolerance-verification", "confirmed"
            )
        else:
            res["code"] = code
            res["verificationStatus"] = cc(
                "http://terminology.hl7.org/CodeSystem/allergyintolerance-verification", "refuted", "Refuted"
            )
    else:
        if code is not None:
            res["code"] = code
        elif val is not None and concept(val, ctx):
            res["code"] = concept(val, ctx)
            ctx.warn("allergy-no-substance", "allergy has no substance code; used the observation value", o)
        res["verificationStatus"] = cc(
            "http://terminology.hl7.org/CodeSystem/allergyintolerance-verification", "confirmed", "Confirmed"
        )
    # clinical status: explicit Allergy Status Observation, else the concern status, else dates
    clin = None
    for er in o.findall("entryRelationship"):
        so = er.find("observation")
        if so is not None and f"{T}.4.28" in templates(so):
            sv = so.find("value")
            clin = {"55561003": "active", "73425007": "inactive", "413322009": "resolved"}.get(
                (sv.get("code") if sv is not None else "") or ""
            )
    start, end = onset(o, ctx)
    if clin is None:
        clin = {
            "active": "active",
            "completed": "resolved",
            "suspended": "inactive",
            "aborted": "inactive",
        }.get(concern_status) or ("resolved" if end else "active")
    if res["verificationStatus"]["coding"][0]["code"] != "entered-in-error":
        res["clinicalStatus"] = cc("http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical", clin)
    if start:
        res["onsetDateTime"] = start
    if end and clin == "resolved":
        res["lastOccurrence"] = end
    recorded = ts(first(act, "author/time"), ctx) or ts(first(act, "effectiveTime/low"), ctx)
    if recorded:
        res["recordedDate"] = recorded
    reactions = []
    for er in o.findall("entryRelationship"):
        ro = er.find("observation")
        if ro is None:
            continue
        tpl = templates(ro)
        rv = ro.find("value")
        if f"{T}.4.9" in tpl or (er.get("typeCode") == "MFST" and f"{T}.4.8" not in tpl):
            man = concept(rv, ctx)
            if not man:
                continue
            reaction: dict[str, Any] = {"manifestation": [man]}
            rs, _ = onset(ro, ctx)
            if rs:
                reaction["onset"] = rs
            for er2 in ro.findall("entryRelationship"):
                so = er2.find("observation")
                if so is not None and f"{T}.4.8" in templates(so):
                    sev = _SEVERITY.get(
                        (so.find("value").get("code") if so.find("value") is not None else "") or ""
                    )
                    if sev:
                        reaction["severity"] = sev
            reactions.append(reaction)
        elif f"{T}.4.145" in tpl and rv is not None:
            crit = _CRIT.get(rv.get("code") or "")
            if crit:
                res["criticality"] = crit
        elif f"{T}.4.8" in tpl and rv is not None:
            sev = _SEVERITY.get(rv.get("code") or "")
            if sev and reactions:
                reactions[-1].setdefault("severity", sev)
    if reactions:
        res["reaction"] = reactions
    _note(res, o, ctx)
    return add(ctx, o, res)


# =====================================================================================================
# Problems
# =====================================================================================================
_PROBLEM_STATUS = {
    "55561003": "active",
    "73425007": "inactive",
    "413322009": "resolved",
    "246455001": "recurrence",
    "277022003": "remission",
}


def problem_concern(act: El, ctx: Ctx, category: str = "problem-list-item") -> list[str]:
    obs_list = [o for er in act.findall("entryRelationship") for o in er.findall("observation")]
    if act.tag == "observation":
        obs_list = [act]
    out = []
    for o in obs_list:
        if f"{T}.4.6" in templates(o) or f"{T}.4.28" in templates(o):
            continue
        r = condition(o, ctx, category, status_code(act), act)
        if r:
            out.append(r)
    return out


def condition(o: El, ctx: Ctx, category: str, concern_status: str, act: El) -> str | None:
    res: dict[str, Any] = {"resourceType": "Condition", "subject": {"reference": ctx.patient_ref}}
    if category == "problem-list-item" and f"{T}.4.500" in templates(act):
        category = "health-concern"
    cat_system = (
        "http://hl7.org/fhir/us/core/CodeSystem/condition-category"
        if category == "health-concern"
        else "http://terminology.hl7.org/CodeSystem/condition-category"
    )
    res["category"] = [cc(cat_system, category)]
    val = o.find("value")
    code = concept(val, ctx) if val is not None else None
    if code is None:
        txt = entry_text(o, ctx)
        if txt:
            code = {"text": txt}
    if code is None and val is not None and val.get("nullFlavor"):
        ctx.warn("null-flavor", f"problem value is nullFlavor {val.get('nullFlavor')}", val)
    if code:
        res["code"] = code
    start, end = onset(o, ctx)
    clin = None
    for er in o.findall("entryRelationship"):
        so = er.find("observation")
        if so is not None and f"{T}.4.6" in templates(so):
            sv = so.find("value")
            clin = _PROBLEM_STATUS.get((sv.get("code") if sv is not None else "") or "")
    if clin is None:
        if end:
            clin = "resolved"
        else:
            clin = {"completed": "resolved", "suspended": "inactive", "aborted": "inactive"}.get(
                concern_status, "active"
            )
    if negated(o):
        res["verificationStatus"] = cc(
            "http://terminology.hl7.org/CodeSystem/condition-ver-status", "refuted"
        )
    else:
        res["verificationStatus"] = cc(
            "http://terminology.hl7.org/CodeSystem/condition-ver-status", "confirmed"
        )
    if clin in ("resolved", "inactive", "remission") or not end:
        res["clinicalStatus"] = cc("http://terminology.hl7.org/CodeSystem/condition-clinical", clin)
    else:
        res["clinicalStatus"] = cc("http://terminology.hl7.org/CodeSystem/condition-clinical", "resolved")
    if start:
        res["onsetDateTime"] = start
    if end:
        res["abatementDateTime"] = end
    elif (
        o.find("effectiveTime/high") is not None
        and o.find("effectiveTime/high").get("nullFlavor")
        and res["clinicalStatus"]["coding"][0]["code"] == "resolved"
    ):
        res["abatementString"] = "unknown"
    recorded = ts(first(o, "author/time"), ctx) or ts(first(act, "author/time"), ctx)
    if recorded:
        res["recordedDate"] = recorded
    site = [concept(s, ctx) for s in o.findall("targetSiteCode")]
    if any(site):
        res["bodySite"] = [s for s in site if s]
    if ctx.encounter_ref and category == "encounter-diagnosis":
        res["encounter"] = {"reference": ctx.encounter_ref}
    _note(res, o, ctx)
    return add(ctx, o, res)


# =====================================================================================================
# Medications
# =====================================================================================================
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


def _medication_concept(sa: El, ctx: Ctx) -> dict[str, Any] | None:
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
                from adapters.ccda.datatypes import decimal

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
    med = _medication_concept(sa, ctx)
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
        perf = _performer_refs(sa, ctx)
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
        product = _medication_concept(sup, ctx) or med
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
        perf = _performer_refs(sup, ctx)
        if perf:
            res["requester"] = {"reference": perf[0]}
        res["note"] = [{"text": f"Order for the medication statement {statement_ref}"}]
        out.append(add(ctx, sup, res, "supply-order"))
    return out


# =====================================================================================================
# Results and vital signs
# =====================================================================================================
_OBS_STATUS = {
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
        "status": _OBS_STATUS.get(status_code(o), "final"),
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
    perf = _performer_refs(o, ctx)
    if perf:
        res["performer"] = [{"reference": r} for r in perf]
    if ctx.encounter_ref:
        res["encounter"] = {"reference": ctx.encounter_ref}
    _note(res, o, ctx)
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
    perf = _performer_refs(org, ctx)
    if perf:
        rep["performer"] = [{"reference": r} for r in perf]
    if ctx.encounter_ref:
        rep["encounter"] = {"reference": ctx.encounter_ref}
    return [add(ctx, org, rep), *refs]


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


# =====================================================================================================
# Immunizations
# =====================================================================================================
def immunization(sa: El, ctx: Ctx) -> list[str]:
    if sa.get("moodCode") in ("INT", "RQO", "PRP"):
        return medication(sa, ctx, planned=True)
    vaccine = _medication_concept(sa, ctx)
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
    from adapters.ccda.header import organization

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
    perf = _performer_refs(sa, ctx)
    if perf:
        res["performer"] = [{"actor": {"reference": r}} for r in perf]
    if ctx.encounter_ref:
        res["encounter"] = {"reference": ctx.encounter_ref}
    _note(res, sa, ctx)
    return [add(ctx, sa, res)]


# =====================================================================================================
# Procedures
# =====================================================================================================
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
    perf = _performer_refs(p, ctx)
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
    _note(res, p, ctx)
    if devices:
        res["focalDevice"] = [{"manipulated": {"reference": d}} for d in devices]
    return [add(ctx, p, res), *devices]


# =====================================================================================================
# Encounters
# =====================================================================================================
_ENC_CLASS = {"AMB", "EMER", "FLD", "HH", "IMP", "ACUTE", "NONAC", "OBSENC", "PRENC", "SS", "VR"}


PARTICIPATION_TYPE = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
#: v3-ParticipationType codes of encounter participants (FHIR's encounter-participant-type value set
#: and the CDA performer type) -> display.
_PARTICIPATION_TYPES = {
    "ADM": "admitter",
    "ATND": "attender",
    "CALLBCK": "callback contact",
    "CON": "consultant",
    "DIS": "discharger",
    "ESC": "escort",
    "REF": "referrer",
    "PPRF": "primary performer",
    "SPRF": "secondary performer",
    "PRF": "performer",
    "PART": "Participation",
}
#: v3-ParticipationFunction (sdtc:functionCode of a performer) -> the participation type it means.
_FUNCTION_TO_TYPE = {"ATTPHYS": "ATND", "ADMPHYS": "ADM", "DISPHYS": "DIS"}
_PARTICIPATION_FUNCTION_OID = "2.16.840.1.113883.5.88"


def _participation(code: str) -> dict[str, Any]:
    return cc(PARTICIPATION_TYPE, code, _PARTICIPATION_TYPES[code])


def _encounter_participants(
    e: El, ctx: Ctx, *, header: bool
) -> tuple[list[dict[str, Any]], list[tuple[str, El]]]:
    """Encounter.participant entries (Practitioners with their v3-ParticipationType) and the
    organisations named where a person was expected, with their elements (for the service provider).

    The header's responsibleParty is the attender (the eCR IG's responsible provider, ATND);
    encounterParticipant keeps its typeCode (ADM, ATND, CON, DIS, REF) and time; an encounter activity's
    performer is typed by its sdtc:functionCode (ATTPHYS, ADMPHYS, DISPHYS), else by its typeCode (PRF,
    PPRF, SPRF). Authors are participants without a type: FHIR R4 Encounter has no recorder.
    """
    from adapters.ccda.header import practitioner, practitioner_role

    people: list[tuple[El, str | None, El | None, El | None]] = []  # (assignedEntity, type, function, time)
    if header:
        rp = first(e, "responsibleParty/assignedEntity")
        if rp is not None:
            people.append((rp, "ATND", None, None))
    for tag, default_type in (("encounterParticipant", ""), ("performer", "PRF")):
        for p in e.findall(tag):
            ae = p.find("assignedEntity")
            if ae is not None:
                tc = p.get("typeCode") or default_type
                fn = first(p, "sdtc_functionCode", "functionCode")
                people.append((ae, tc if tc in _PARTICIPATION_TYPES else None, fn, p.find("time")))
    for au in e.findall("author"):
        ae = au.find("assignedAuthor")
        if ae is not None:
            people.append((ae, None, None, None))
    parts: list[dict[str, Any]] = []
    orgs: list[tuple[str, El]] = []
    for ae, ptype, fn, time in people:
        ref = practitioner(ae, ctx)
        if ref is None:
            continue
        if not ref.startswith("Practitioner/"):
            if ref.startswith("Organization/"):
                orgs.append((ref, ae))
            else:  # an authoring device: not a participant of the encounter
                ctx.warn("encounter-participant-dropped", "a device cannot be an encounter participant", ae)
            continue
        types: list[dict[str, Any]] = []
        function = concept(fn, ctx) if fn is not None else None
        if (
            fn is not None
            and (fn.get("codeSystem") or _PARTICIPATION_FUNCTION_OID) == _PARTICIPATION_FUNCTION_OID
        ):
            ptype = _FUNCTION_TO_TYPE.get(fn.get("code") or "", ptype)
        if ptype:
            types.append(_participation(ptype))
        if function:
            types.append(function)
        part: dict[str, Any] = {}
        if types:
            part["type"] = types
        per = period(time, ctx)
        if per:
            part["period"] = per
        part["individual"] = {"reference": ref}
        if part not in parts:
            parts.append(part)
        practitioner_role(ae, ref, ctx)
    return parts, orgs


def encounter(e: El, ctx: Ctx, *, header: bool = False) -> list[str]:
    if e.get("moodCode") in ("INT", "RQO", "PRP", "ARQ", "PRMS", "APT"):
        return planned(e, ctx)
    code = concept(e.find("code"), ctx)
    cls = None
    for c in (code or {}).get("coding", []):
        if c.get("system", "").endswith("v3-ActCode") and c.get("code") in _ENC_CLASS:
            cls = {"system": c["system"], "code": c["code"]}
    if cls is None:  # class is required; say "unknown" rather than guess ambulatory
        cls = {
            "system": "http://terminology.hl7.org/CodeSystem/v3-NullFlavor",
            "code": "UNK",
            "display": "unknown",
        }
    status = status_code(e)
    res: dict[str, Any] = {
        "resourceType": "Encounter",
        "status": {
            "active": "in-progress",
            "cancelled": "cancelled",
            "aborted": "cancelled",
            "nullified": "entered-in-error",
            "new": "planned",
        }.get(status, "finished"),
        "class": cls,
        "subject": {"reference": ctx.patient_ref},
    }
    if code:
        res["type"] = [code]
    per = period(e.find("effectiveTime"), ctx)
    if per:
        res["period"] = per
    parts, orgs = _encounter_participants(e, ctx, header=header)
    if parts:
        res["participant"] = parts
    from adapters.ccda.header import location, organization

    provider = None
    hf = first(e, "location/healthCareFacility")
    spo = hf.find("serviceProviderOrganization") if hf is not None else None
    if spo is not None:
        provider = organization(spo, ctx)
    for org_ref, el in orgs:  # an organisation as responsible party or performer
        if provider is None:
            provider = org_ref
        elif org_ref != provider:
            ctx.warn(
                "encounter-organization-dropped",
                "the encounter already has a service provider; this organisation is not converted",
                el,
            )
    if provider:
        res["serviceProvider"] = {"reference": provider}
    locs = []
    for part in e.findall("participant"):
        if part.get("typeCode") == "LOC":
            pr = part.find("participantRole")
            if pr is not None:
                r = location(pr, ctx)
                if r:
                    locs.append({"location": {"reference": r}})
    if hf is not None:
        r = location(hf, ctx, managing_organization=provider if spo is not None else None)
        if r:
            locs.append({"location": {"reference": r}})
    if locs:
        res["location"] = locs
    reasons = []
    diag_refs: list[str] = []
    for er in e.findall("entryRelationship"):
        for child in er:
            if not isinstance(child.tag, str):
                continue
            tpl = templates(child)
            if f"{T}.4.80" in tpl:
                diag_refs += problem_concern(child, ctx, "encounter-diagnosis")
            elif er.get("typeCode") == "RSON" and child.tag == "observation":
                rc = concept(child.find("value"), ctx)
                if rc:
                    reasons.append(rc)
    if reasons:
        res["reasonCode"] = reasons
    if diag_refs:
        res["diagnosis"] = [{"condition": {"reference": r}} for r in diag_refs]
    dd = first(e, "dischargeDispositionCode", "sdtc_dischargeDispositionCode")
    if dd is not None:
        c = concept(dd, ctx)
        if c:
            res["hospitalization"] = {"dischargeDisposition": c}
    ref = add(ctx, e, res)
    return [ref, *diag_refs]


# =====================================================================================================
# Social history
# =====================================================================================================
def social(o: El, ctx: Ctx) -> list[str]:
    if o.tag != "observation":
        return generic(o, ctx, "social")
    if PREGNANCY_OBSERVATION in templates(o):
        return pregnancy(o, ctx)
    tpl = templates(o)
    if f"{T}.4.200" in tpl:  # birth sex: a Patient extension in US Core; also kept as an Observation
        val = o.find("value")
        if val is not None and val.get("code") in ("M", "F", "UNK") and ctx.patient_ref:
            pat = ctx.b.get(ctx.patient_ref)
            if pat is not None:
                exts = pat.setdefault("extension", [])
                url = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-birthsex"
                if not any(x.get("url") == url for x in exts):
                    exts.append({"url": url, "valueCode": val.get("code")})
    r = observation(o, ctx, "social-history")
    return [r] if r else []


# -- eICR (HL7 CDA eICR R2 STU 1.1-3.1) -> the US eCR FHIR IG -----------------------------------------
ECR_PROFILE = "http://hl7.org/fhir/us/ecr/StructureDefinition"
TRAVEL_HISTORY = "2.16.840.1.113883.10.20.15.2.3.1"
TRAVEL_PURPOSE = "2.16.840.1.113883.10.20.15.2.3.51"
TRAVEL_CODE = "420008001"
PREGNANCY_OBSERVATION = "2.16.840.1.113883.10.20.15.3.8"
PREGNANT = "77386006"
#: the US Public Health pregnancy status value set's answers for a negated or unknown Pregnancy Observation
_NOT_PREGNANT = ("60001007", "Not pregnant")
_PREGNANCY_UNKNOWN = ("261665006", "Unknown")


def travel_history(act: El, ctx: Ctx) -> list[str]:
    """eICR Travel History act -> Observation per the eCR IG's us-ph-travel-history profile.

    code SNOMED 420008001 "Travel"; effective from effectiveTime (``width`` included); one component
    (code v3-ParticipationType LOC) per ``participant typeCode="LOC"``, the coded place as its value and
    the address in the us-ph-address-extension; the act's text as a LOC component's text (where the IG
    puts free-text travel); each Purpose of Travel observation as a component (SNOMED 280147009). The
    profile is claimed only when its required date and location are there.
    """
    from adapters.ccda.datatypes import addresses, org_name

    res: dict[str, Any] = {
        "resourceType": "Observation",
        "status": _OBS_STATUS.get(status_code(act), "final"),
        "category": [cc(OBS_CAT, "social-history")],
        "code": {**cc(SNOMED, TRAVEL_CODE, "Travel"), "text": "Travel History"},
        "subject": {"reference": ctx.patient_ref},
    }
    point, per = effective(act.find("effectiveTime"), ctx)
    if per:
        res["effectivePeriod"] = per
    elif point:
        res["effectiveDateTime"] = point
    else:
        ctx.warn(
            "travel-history-no-date",
            "travel history has no usable effectiveTime; converted without the eCR travel history profile",
            act,
        )
    location = cc(PARTICIPATION_TYPE, "LOC", "Location")
    components: list[dict[str, Any]] = []
    addressed = True  # the address extension requires a country
    for part in act.findall("participant"):
        pr = part.find("participantRole") if part.get("typeCode") == "LOC" else None
        if pr is None:
            continue
        place = concept(pr.find("code"), ctx)
        name = org_name(pr.find("playingEntity"))
        if place is None and name:
            place = {"text": name}
        found = False
        addrs: list[dict[str, Any] | None] = [*addresses(pr, ctx)] or [None]
        for i, addr in enumerate(addrs):
            comp: dict[str, Any] = {"code": location}
            if addr is not None:
                comp["extension"] = [{"url": f"{ECR_PROFILE}/us-ph-address-extension", "valueAddress": addr}]
                addressed = addressed and "country" in addr
            if place and i == 0:
                comp["valueCodeableConcept"] = place
            if len(comp) > 1:
                components.append(comp)
                found = True
        if not found:
            ctx.warn("travel-location-empty", "travel history location has no code, name or address", pr)
    text = entry_text(act, ctx)
    if text:
        components.append({"code": location, "valueCodeableConcept": {"text": text}})
    located = bool(components)
    for er in act.findall("entryRelationship"):
        for child in er:
            if not isinstance(child.tag, str):
                continue
            ccode = child.find("code")
            if child.tag == "observation" and (
                TRAVEL_PURPOSE in templates(child) or (ccode is not None and ccode.get("code") == "280147009")
            ):
                purpose = concept(child.find("value"), ctx)
                if purpose:
                    components.append(
                        {"code": cc(SNOMED, "280147009", "Type of activity"), "valueCodeableConcept": purpose}
                    )
                else:
                    ctx.warn("travel-purpose-empty", "purpose of travel observation has no value", child)
            else:
                ctx.warn(
                    "unmapped-entry",
                    f"{child.tag} inside a travel history is not converted "
                    f"(templateId {', '.join(sorted(templates(child))) or 'none'})",
                    child,
                )
    if components:
        res["component"] = components
    if (per or point) and located and addressed:
        res["meta"] = {"profile": [f"{ECR_PROFILE}/us-ph-travel-history"]}
    perf = _performer_refs(act, ctx)
    if perf:
        res["performer"] = [{"reference": r} for r in perf]
    if ctx.encounter_ref:
        res["encounter"] = {"reference": ctx.encounter_ref}
    return [add(ctx, act, res)]


def pregnancy(o: El, ctx: Ctx) -> list[str]:
    """eICR Pregnancy Observation (code ASSERTION, value "Pregnant") -> Observation coded LOINC 82810-3
    "Pregnancy status", as the eCR IG's us-ph-pregnancy-status-observation.

    negationInd="true" on "Pregnant" means not pregnant, an observation nullFlavor means unknown: both
    become the value set's answers (60001007, 261665006) rather than a "Pregnant" value with a note.
    Nested observations (estimated date of delivery, gestational age) become components.
    """
    val = o.find("value")
    answer = None
    if o.get("nullFlavor"):
        answer = _PREGNANCY_UNKNOWN
    elif negated(o) and val is not None and val.get("code") == PREGNANT:
        answer = _NOT_PREGNANT
    ref = observation(o, ctx, "social-history", negation_expressed=answer is not None, members=False)
    if ref is None:
        return []
    res = ctx.b.get(ref) or {}
    res["code"] = cc(LOINC, "82810-3", "Pregnancy status")
    if answer:
        res.pop("dataAbsentReason", None)
        res["valueCodeableConcept"] = cc(SNOMED, *answer)
    components = []
    for er in o.findall("entryRelationship"):
        sub = er.find("observation")
        code = concept(sub.find("code"), ctx) if sub is not None else None
        if sub is None or code is None:
            continue
        comp: dict[str, Any] = {"code": code}
        sv = sub.find("value")
        v = value_x(sv, ctx) if sv is not None else {}
        if v:
            comp.update(v)
        elif sv is not None and sv.get("nullFlavor"):
            comp["dataAbsentReason"] = cc(
                "http://terminology.hl7.org/CodeSystem/data-absent-reason",
                NULL_FLAVOR_TO_DAR.get(sv.get("nullFlavor") or "", "unknown"),
            )
        else:
            ctx.warn(
                "pregnancy-component-empty", "observation inside a pregnancy observation has no value", sub
            )
            continue
        components.append(comp)
    if components:
        res["component"] = components
    if "effectiveDateTime" not in res:  # the profile takes a period only
        res["meta"] = {
            **res.get("meta", {}),
            "profile": [f"{ECR_PROFILE}/us-ph-pregnancy-status-observation"],
        }
    return [ref]


# =====================================================================================================
# Family history
# =====================================================================================================
def family(org: El, ctx: Ctx) -> list[str]:
    rs = first(org, "subject/relatedSubject")
    rel = concept(rs.find("code"), ctx) if rs is not None else None
    if rel is None:
        rel = cc("http://terminology.hl7.org/CodeSystem/v3-RoleCode", "FAMMEMB", "family member")
        ctx.warn("family-no-relationship", "family history organizer has no relationship code", org)
    res: dict[str, Any] = {
        "resourceType": "FamilyMemberHistory",
        "status": "completed",
        "patient": {"reference": ctx.patient_ref},
        "relationship": rel,
    }
    subj = first(rs, "subject") if rs is not None else None
    if subj is not None:
        g = subj.find("administrativeGenderCode")
        if g is not None and g.get("code"):
            sex = {"M": "male", "F": "female", "UN": "other"}.get(g.get("code") or "", "unknown")
            res["sex"] = cc("http://hl7.org/fhir/administrative-gender", sex)
        bt = ts(subj.find("birthTime"), ctx)
        if bt:
            res["bornDate"] = bt[:10]
        dec = subj.find("sdtc_deceasedInd")
        if dec is not None and dec.get("value") in ("true", "false"):
            res["deceasedBoolean"] = dec.get("value") == "true"
    conditions = []
    obs = [c.find("observation") for c in org.findall("component")]
    if org.tag == "observation":
        obs = [org]
    for o in obs:
        if o is None:
            continue
        code = concept(o.find("value"), ctx)
        if code is None:
            continue
        c: dict[str, Any] = {"code": code}
        for er in o.findall("entryRelationship"):
            ao = er.find("observation")
            if ao is None:
                continue
            atpl = templates(ao)
            av = ao.find("value")
            if f"{T}.4.31" in atpl and av is not None:
                q = quantity(av, ctx)
                if q:
                    unit = q.get("unit", "a")
                    c["onsetAge"] = {
                        "value": q["value"],
                        "unit": unit,
                        "system": "http://unitsofmeasure.org",
                        "code": unit,
                    }
            elif f"{T}.4.47" in atpl and "deceasedBoolean" not in res:
                res["deceasedBoolean"] = True
        if "onsetAge" not in c:
            st, _ = onset(o, ctx)
            if st:
                c["onsetString"] = st
        if negated(o):
            c["note"] = [{"text": "negated in source (negationInd=true): condition absent"}]
        conditions.append(c)
    if conditions:
        res["condition"] = conditions
    return [add(ctx, org, res)]


# =====================================================================================================
# Plan of treatment, goals
# =====================================================================================================
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
    _note(res, el, ctx)
    return [add(ctx, el, res)]


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
    _note(res, o, ctx)
    return [add(ctx, o, res)]


# =====================================================================================================
# Payers
# =====================================================================================================
def coverage(act: El, ctx: Ctx) -> list[str]:
    from adapters.ccda.header import organization

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


# =====================================================================================================
# Notes
# =====================================================================================================
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
    authors = _performer_refs(act, ctx)
    if authors:
        res["author"] = [{"reference": r} for r in authors]
    if ctx.encounter_ref:
        res["context"] = {"encounter": [{"reference": ctx.encounter_ref}]}
    return [add(ctx, act, res)]


# =====================================================================================================
# Medical equipment
# =====================================================================================================
def product_devices(el: El, ctx: Ctx) -> list[str]:
    """Device for each product instance (``participant/participantRole/playingDevice``) of ``el``."""
    out = []
    for part in el.findall("participant"):
        pr = part.find("participantRole")
        dev_el = pr.find("playingDevice") if pr is not None else None
        if dev_el is None:
            continue
        dtype = concept(dev_el.find("code"), ctx)
        udi = [i for i in identifiers(pr, ctx) if i["system"] != "urn:ietf:rfc:3986"]
        if dtype is None and not udi:
            continue
        device: dict[str, Any] = {"resourceType": "Device", "patient": {"reference": ctx.patient_ref}}
        if dtype:
            device["type"] = dtype
        if udi:
            device["udiCarrier"] = [{"deviceIdentifier": udi[0]["value"], "carrierHRF": udi[0]["value"]}]
            device["identifier"] = udi
        out.append(add(ctx, pr, device, "device"))
    return out


def device_use(el: El, ctx: Ctx) -> list[str]:
    """Non-Medicinal Supply Activity (4.50) or a procedure's product instance -> Device + DeviceUseStatement."""
    if el.tag == "organizer":  # e.g. the Implant UDI organizer: convert what it groups
        return [
            r
            for comp in el.findall("component")
            for child in comp
            if isinstance(child.tag, str)
            for r in convert_entry(child, ctx, "equipment")
        ]
    if el.get("moodCode") in ("INT", "RQO", "PRP", "ARQ"):
        return planned(el, ctx)
    pr = first(el, "participant/participantRole")
    dev_el = pr.find("playingDevice") if pr is not None else None
    dtype = concept(dev_el.find("code"), ctx) if dev_el is not None else None
    if dtype is None:
        t = entry_text(el, ctx)
        dtype = {"text": t} if t else None
    if dtype is None:
        ctx.warn("device-no-code", "supply has no device code or text; skipped", el)
        return []
    device: dict[str, Any] = {
        "resourceType": "Device",
        "type": dtype,
        "patient": {"reference": ctx.patient_ref},
    }
    udi = [i for i in identifiers(pr, ctx) if i["system"] != "urn:ietf:rfc:3986"] if pr is not None else []
    if udi:
        device["udiCarrier"] = [{"deviceIdentifier": udi[0]["value"], "carrierHRF": udi[0]["value"]}]
        device["identifier"] = udi
    dev_ref = add(ctx, el, device, "device")
    res: dict[str, Any] = {
        "resourceType": "DeviceUseStatement",
        "status": "stopped"
        if negated(el)
        else {
            "completed": "completed",
            "active": "active",
            "aborted": "stopped",
            "cancelled": "stopped",
            "nullified": "entered-in-error",
        }.get(status_code(el), "active"),
        "subject": {"reference": ctx.patient_ref},
        "device": {"reference": dev_ref},
    }
    point, per = effective(el.find("effectiveTime"), ctx)
    if per:
        res["timingPeriod"] = per
    elif point:
        res["timingDateTime"] = point
    _note(res, el, ctx)
    return [add(ctx, el, res), dev_ref]


# =====================================================================================================
# Dispatch
# =====================================================================================================
_ENTRY_TEMPLATES: dict[str, Callable[[El, Ctx], list[str]]] = {
    f"{T}.4.30": allergy_concern,
    f"{T}.4.7": allergy_concern,
    f"{T}.4.3": problem_concern,
    f"{T}.4.4": problem_concern,
    f"{T}.4.500": problem_concern,
    f"{T}.4.16": medication,
    f"{T}.4.1": result_organizer,
    f"{T}.4.2": result_organizer,
    f"{T}.4.26": vitals_organizer,
    f"{T}.4.27": vitals_organizer,
    f"{T}.4.52": immunization,
    f"{T}.4.14": procedure,
    f"{T}.4.13": procedure,
    f"{T}.4.12": procedure,
    f"{T}.4.49": encounter,
    f"{T}.4.40": planned,
    f"{T}.4.41": planned,
    f"{T}.4.39": planned,
    f"{T}.4.42": planned,
    f"{T}.4.44": planned,
    f"{T}.4.43": planned,
    f"{T}.4.45": family,
    f"{T}.4.121": goal,
    f"{T}.4.60": coverage,
    f"{T}.4.61": coverage,
    f"{T}.4.202": note,
    f"{T}.4.50": device_use,
    f"{T}.4.78": social,
    f"{T}.4.38": social,
    f"{T}.4.200": social,
    f"{T}.4.293": social,
    TRAVEL_HISTORY: travel_history,
    PREGNANCY_OBSERVATION: social,
}


def generic(el: El, ctx: Ctx, kind: str | None) -> list[str]:
    """Fallback by section kind and element name, for entries without a known templateId."""
    tag = el.tag
    mood = el.get("moodCode") or "EVN"
    if mood in ("INT", "RQO", "PRP", "ARQ", "PRMS", "APT", "GOL") and kind != "goals":
        return planned(el, ctx)
    by_kind: dict[str | None, Callable[[El, Ctx], list[str]]] = {
        "allergies": allergy_concern,
        "problems": problem_concern,
        "results": result_organizer,
        "vitals": vitals_organizer,
        "family": family,
        "goals": goal,
        "payers": coverage,
        "plan": planned,
        "notes": note,
        "equipment": device_use,
    }
    if tag == "substanceAdministration":
        return immunization(el, ctx) if kind == "immunizations" else medication(el, ctx)
    if tag == "encounter":
        return encounter(el, ctx)
    if tag == "procedure":
        return procedure(el, ctx)
    if kind == "social" and tag == "observation":
        r = observation(el, ctx, "social-history")
        return [r] if r else []
    code = el.find("code")
    if tag == "act" and kind == "social" and code is not None and code.get("code") == TRAVEL_CODE:
        return travel_history(el, ctx)
    fn = by_kind.get(kind)
    if fn is not None:
        return fn(el, ctx)
    if tag == "organizer":
        return result_organizer(el, ctx)
    if tag == "observation":
        cat = {"procedures": "procedure", "vitals": "vital-signs", "social": "social-history"}.get(
            kind or "", "exam"
        )
        r = observation(el, ctx, cat)
        return [r] if r else []
    if tag == "act" and kind == "procedures":
        return procedure(el, ctx)
    if tag == "act":
        for er in el.findall("entryRelationship"):
            for child in er:
                if isinstance(child.tag, str):
                    return convert_entry(child, ctx, kind)
    ctx.warn("unmapped-entry", f"{tag} entry in a {kind or 'narrative-only'} section is not converted", el)
    return []


def convert_entry(el: El, ctx: Ctx, kind: str | None) -> list[str]:
    """Convert one clinical statement; returns the references added. Never raises on odd content."""
    if kind == "immunizations" and el.tag == "substanceAdministration":
        return immunization(el, ctx)
    # the first known templateId in document order decides, the same in every run
    for t in dict.fromkeys(t.get("root") or "" for t in el.findall("templateId")):
        fn = _ENTRY_TEMPLATES.get(t)
        if fn is not None:
            if fn is result_organizer and kind == "vitals":
                fn = vitals_organizer
            return fn(el, ctx)
    return generic(el, ctx, kind)
