"""What the converters of every section share: template and code-system constants, the entry's
negation and status, and :func:`add`, which keys a resource by the entry's id."""

from __future__ import annotations

from typing import Any

from adapters.ccda.datatypes import Ctx, El, first, id_key, identifiers, text_of
from adapters.ccda.header import practitioner

T = "2.16.840.1.113883.10.20.22"
SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"
OBS_CAT = "http://terminology.hl7.org/CodeSystem/observation-category"
PARTICIPATION_TYPE = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"


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


def add_note(res: dict[str, Any], el: El, ctx: Ctx) -> None:
    t = entry_text(el, ctx)
    if t:
        res.setdefault("note", []).append({"text": t})


def performer_refs(el: El, ctx: Ctx) -> list[str]:
    refs = []
    for p in el.findall("performer") + el.findall("author"):
        ae = first(p, "assignedEntity", "assignedAuthor")
        if ae is not None:
            r = practitioner(ae, ctx)
            if r:
                refs.append(r)
    return refs
