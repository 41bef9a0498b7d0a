"""Which section an element is, and which converter an entry goes to: the one dispatch table.

Sections are recognised by templateId and, for vendor documents without one, by their LOINC code
(:data:`SECTIONS`). Entries are dispatched on their own templateId when present (the first known one
in document order), else on the section kind and the entry's element (``act``, ``observation``,
``substanceAdministration`` ...). Unknown entries are reported as warnings, never dropped silently."""

from __future__ import annotations

from collections.abc import Callable

from adapters.ccda.datatypes import Ctx, El
from adapters.ccda.sections.allergies import allergy_concern
from adapters.ccda.sections.eicr import PREGNANCY_OBSERVATION, TRAVEL_CODE, TRAVEL_HISTORY, travel_history
from adapters.ccda.sections.encounters import encounter
from adapters.ccda.sections.entry import T
from adapters.ccda.sections.equipment import device_use
from adapters.ccda.sections.family import family
from adapters.ccda.sections.goals import goal
from adapters.ccda.sections.immunizations import immunization
from adapters.ccda.sections.medications import medication
from adapters.ccda.sections.notes import note
from adapters.ccda.sections.observations import observation
from adapters.ccda.sections.payers import coverage
from adapters.ccda.sections.plan import planned
from adapters.ccda.sections.problems import problem_concern
from adapters.ccda.sections.procedures import procedure
from adapters.ccda.sections.results import result_organizer
from adapters.ccda.sections.social import social
from adapters.ccda.sections.vitals import vitals_organizer

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
