"""Family history section: Family History Organizer -> FamilyMemberHistory."""

from __future__ import annotations

from typing import Any

from adapters.ccda.datatypes import Ctx, El, concept, first, onset, quantity, ts
from adapters.ccda.sections.entry import T, add, cc, negated, templates


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
