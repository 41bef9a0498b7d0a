"""Allergies section: Allergy Concern Act -> AllergyIntolerance."""

from __future__ import annotations

from typing import Any

from adapters.ccda.datatypes import Ctx, El, concept, first, onset, ts
from adapters.ccda.sections.entry import SNOMED, T, add, add_note, cc, negated, status_code, templates

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
    add_note(res, o, ctx)
    return add(ctx, o, res)
