"""A patient's merged history (the entries of ``Patient/{id}/$everything``) as the patient page shows
it: the banner, the sections in International Patient Summary order, each entry with its source and
the other sources that sent the same fact, and what the API said it withheld.

Pure: it reads bundles and returns values; nothing here does I/O or knows HTTP.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bridge.service.mpi import EXT_OTHER_PERSON, EXT_STATE
from bridge.stores.index.rules import CLINICAL_DATE_PATHS

PROVENANCE_EXT = "https://fhirbridge.dev/fhir/StructureDefinition/entry-provenance"
MRN_CODE = "MR"
SEVERE = frozenset({"severe"})


@dataclass(frozen=True, slots=True)
class SectionDef:
    key: str
    title: str
    types: tuple[str, ...]
    category: str | None = None  # Observations only: the category code this section holds


#: International Patient Summary order; Observations split by category (laboratory, vital-signs)
SECTIONS: tuple[SectionDef, ...] = (
    SectionDef("problems", "Problems", ("Condition",)),
    SectionDef("medications", "Medications", ("MedicationRequest", "MedicationStatement")),
    SectionDef("allergies", "Allergies and intolerances", ("AllergyIntolerance",)),
    SectionDef("results", "Results", ("Observation",), "laboratory"),
    SectionDef("vitals", "Vital signs", ("Observation",), "vital-signs"),
    SectionDef("immunizations", "Immunizations", ("Immunization",)),
    SectionDef("procedures", "Procedures", ("Procedure",)),
    SectionDef("encounters", "Encounters", ("Encounter",)),
    SectionDef("documents", "Documents", ("DocumentReference",)),
)
#: what no IPS section above holds (other Observation categories, reports, care plans, ...)
OTHER = SectionDef("other", "Other records", ())
SECTION_KEYS = frozenset(s.key for s in (*SECTIONS, OTHER))


@dataclass(frozen=True, slots=True)
class Entry:
    """One merged entry: what it is, when, its status, the source that sent it first and the others."""

    resource_type: str
    id: str
    title: str
    detail: str
    date: str
    status: str
    source: str
    also: tuple[str, ...]
    severe: bool = False


@dataclass(frozen=True, slots=True)
class LinkedRecord:
    """A hospital's record of the patient (a Patient the MPI links by MATCH): its id, the sending
    organisations and its medical record numbers."""

    id: str
    sources: tuple[str, ...]
    mrns: tuple[str, ...]
    first_received: str = ""


@dataclass(slots=True)
class Section:
    key: str
    title: str
    entries: list[Entry] = field(default_factory=list)


@dataclass(slots=True)
class PatientView:
    """Everything the patient page shows."""

    patient_id: str
    name: str = ""
    birth_date: str = ""
    sex: str = ""
    records: list[LinkedRecord] = field(default_factory=list)
    sections: list[Section] = field(default_factory=list)
    other: Section = field(default_factory=lambda: Section(OTHER.key, OTHER.title))
    withheld: bool = False
    notices: list[str] = field(default_factory=list)
    total: int = 0
    truncated: bool = False
    possible_matches: int = 0

    @property
    def hospitals(self) -> int:
        return len({s for r in self.records for s in r.sources})

    @property
    def allergies(self) -> list[Entry]:
        """The allergies, severe ones first (the banner's list)."""
        return next(s.entries for s in self.sections if s.key == "allergies")

    def section(self, key: str) -> Section:
        return self.other if key == OTHER.key else next(s for s in self.sections if s.key == key)


# -- reading the bundle ---------------------------------------------------------------------------
def build_view(patient_id: str, pages: Sequence[dict[str, Any]], *, truncated: bool = False) -> PatientView:
    """The view of ``pages`` (the ``$everything`` pages read, in order); ``truncated`` when pages were
    left unread."""
    view = PatientView(patient_id, sections=[Section(s.key, s.title) for s in SECTIONS], truncated=truncated)
    patients: list[tuple[dict[str, Any], tuple[str, ...], str]] = []
    for page in pages:
        if not view.total and isinstance(page.get("total"), int):
            view.total = page["total"]
        for item in page.get("entry") or []:
            resource = item.get("resource") or {}
            mode = (item.get("search") or {}).get("mode")
            if mode == "outcome" or resource.get("resourceType") == "OperationOutcome":
                _read_outcome(view, resource)
                continue
            sources = _sources(item)
            if resource.get("resourceType") == "Patient":
                patients.append((resource, sources, _first_received(item)))
                continue
            entry = to_entry(resource, sources)
            _section_of(view, resource).entries.append(entry)
    _banner(view, patients)
    for section in (*view.sections, view.other):
        section.entries.sort(key=lambda e: e.date, reverse=True)
        if section.key == "allergies":
            section.entries.sort(key=lambda e: not e.severe)  # stable: newest first within each group
    return view


def _read_outcome(view: PatientView, outcome: dict[str, Any]) -> None:
    for issue in outcome.get("issue") or []:
        if issue.get("code") == "suppressed":
            view.withheld = True
        elif issue.get("severity") in ("warning", "error", "fatal") and issue.get("diagnostics"):
            view.notices.append(str(issue["diagnostics"]))


def _deliveries(item: dict[str, Any]) -> list[tuple[str, str]]:
    """(received at, sending organisation) of each delivery of an entry, earliest first."""
    found: list[tuple[str, str]] = []
    for ext in item.get("extension") or []:
        if ext.get("url") != PROVENANCE_EXT:
            continue
        parts = {p.get("url"): p for p in ext.get("extension") or []}
        org = (parts.get("sourceOrg") or {}).get("valueString")
        received = (parts.get("receivedAt") or {}).get("valueInstant") or ""
        if isinstance(org, str) and org:
            found.append((str(received), org))
    return sorted(found)


def _sources(item: dict[str, Any]) -> tuple[str, ...]:
    """The sending organisations of an entry, earliest delivery first, each once."""
    return tuple(dict.fromkeys(org for _, org in _deliveries(item)))


def _first_received(item: dict[str, Any]) -> str:
    return next((received for received, _ in _deliveries(item)), "")


def possible_matches(person: dict[str, Any]) -> int:
    """How many other persons a Person resource (``GET /Person/{id}``) is linked to by POSSIBLE_MATCH:
    people the MPI found similar and no steward has decided on, whose data ``$everything`` does not
    merge. Counted by person (several records of one person are one possible match)."""
    others = set()
    for link in person.get("link") or []:
        exts = [e for e in link.get("extension") or [] if isinstance(e, dict)]
        if "POSSIBLE_MATCH" not in {e.get("valueCode") for e in exts if e.get("url") == EXT_STATE}:
            continue
        other = next((e.get("valueReference") for e in exts if e.get("url") == EXT_OTHER_PERSON), None)
        others.add(str((other or link.get("target") or {}).get("reference")))
    return len(others)


def _section_of(view: PatientView, resource: dict[str, Any]) -> Section:
    rtype = resource.get("resourceType")
    categories = {c for cc in resource.get("category") or [] for c in _codes(cc)}
    for defn, section in zip(SECTIONS, view.sections, strict=True):
        if rtype in defn.types and (defn.category is None or defn.category in categories):
            return section
    return view.other


def _banner(view: PatientView, patients: list[tuple[dict[str, Any], tuple[str, ...], str]]) -> None:
    own = next((p for p, _, _ in patients if p.get("id") == view.patient_id), None)
    if own is None and patients:
        own = patients[0][0]
    if own is not None:
        view.name = human_name(own.get("name"))
        view.birth_date = str(own.get("birthDate") or "")
        view.sex = str(own.get("gender") or "")
    for resource, sources, received in patients:
        view.records.append(LinkedRecord(str(resource.get("id") or ""), sources, _mrns(resource), received))


def _mrns(patient: dict[str, Any]) -> tuple[str, ...]:
    """The record's medical record numbers: identifiers typed MR, else every identifier's value."""
    identifiers = [i for i in patient.get("identifier") or [] if isinstance(i, dict) and i.get("value")]
    typed = [i for i in identifiers if MRN_CODE in _codes(i.get("type"))]
    return tuple(str(i["value"]) for i in (typed or identifiers))


# -- one entry ------------------------------------------------------------------------------------
def to_entry(resource: dict[str, Any], sources: Sequence[str]) -> Entry:
    """The row of ``resource`` delivered by ``sources`` (earliest first)."""
    rtype = str(resource.get("resourceType") or "")
    return Entry(
        resource_type=rtype,
        id=str(resource.get("id") or ""),
        title=_title(rtype, resource) or rtype,
        detail=_detail(rtype, resource),
        date=clinical_date(resource),
        status=_status(resource),
        source=sources[0] if sources else "",
        also=tuple(sources[1:]),
        severe=rtype == "AllergyIntolerance" and _severe(resource),
    )


def clinical_date(resource: dict[str, Any]) -> str:
    for path in CLINICAL_DATE_PATHS.get(str(resource.get("resourceType")), ()):
        value: Any = resource
        for part in path.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if isinstance(value, str) and value:
            return value
    return ""


def _title(rtype: str, r: dict[str, Any]) -> str:
    if rtype in ("MedicationRequest", "MedicationStatement"):
        return concept(r.get("medicationCodeableConcept")) or str(
            (r.get("medicationReference") or {}).get("display") or ""
        )
    if rtype == "Immunization":
        return concept(r.get("vaccineCode"))
    if rtype == "Encounter":
        types = r.get("type") or []
        cls = r.get("class") or {}
        return (concept(types[0]) if types else "") or str(cls.get("display") or cls.get("code") or "")
    if rtype == "DocumentReference":
        return concept(r.get("type")) or str(r.get("description") or "")
    return concept(r.get("code"))


def _detail(rtype: str, r: dict[str, Any]) -> str:
    if rtype == "Observation":
        value = observation_value(r)
        parts = [
            f"{concept(c.get('code'))}: {observation_value(c)}"
            for c in r.get("component") or []
            if isinstance(c, dict)
        ]
        return "; ".join(p for p in [value, *parts] if p)
    if rtype in ("MedicationRequest", "MedicationStatement"):
        return "; ".join(
            str(d.get("text")) for d in r.get("dosageInstruction") or r.get("dosage") or [] if d.get("text")
        )
    if rtype == "AllergyIntolerance":
        manifest = [concept(m) for rx in r.get("reaction") or [] for m in rx.get("manifestation") or []]
        crit = r.get("criticality")
        return "; ".join(p for p in [*manifest, f"criticality {crit}" if crit else ""] if p)
    if rtype == "Encounter":
        period = r.get("period") or {}
        return " to ".join(str(v) for v in (period.get("start"), period.get("end")) if v)
    if rtype == "DocumentReference":
        return str(r.get("description") or "")
    return ""


def _status(r: dict[str, Any]) -> str:
    for key in ("clinicalStatus", "verificationStatus"):
        text = concept(r.get(key))
        if text:
            return text
    return str(r.get("status") or "")


def _severe(r: dict[str, Any]) -> bool:
    return r.get("criticality") == "high" or any(
        rx.get("severity") in SEVERE for rx in r.get("reaction") or [] if isinstance(rx, dict)
    )


def observation_value(o: dict[str, Any]) -> str:
    q = o.get("valueQuantity")
    if isinstance(q, dict) and q.get("value") is not None:
        return f"{q.get('comparator', '')}{q['value']} {q.get('unit') or q.get('code') or ''}".strip()
    for key in ("valueString", "valueBoolean", "valueInteger", "valueDateTime", "valueTime"):
        if key in o:
            return str(o[key])
    if "valueCodeableConcept" in o:
        return concept(o["valueCodeableConcept"])
    absent = concept(o.get("dataAbsentReason"))
    return f"no value ({absent})" if absent else ""


def concept(cc: Any) -> str:
    """A CodeableConcept's text, else its first coding's display, else its first code."""
    if not isinstance(cc, dict):
        return ""
    if cc.get("text"):
        return str(cc["text"])
    for coding in cc.get("coding") or []:
        if isinstance(coding, dict) and coding.get("display"):
            return str(coding["display"])
    return next(iter(_codes(cc)), "")


def _codes(cc: Any) -> list[str]:
    if not isinstance(cc, dict):
        return []
    return [str(c["code"]) for c in cc.get("coding") or [] if isinstance(c, dict) and c.get("code")]


def human_name(names: Any) -> str:
    """The first usable HumanName as text (``text``, else given names and family)."""
    for name in names or []:
        if not isinstance(name, dict):
            continue
        if name.get("text"):
            return str(name["text"])
        parts = [*(str(g) for g in name.get("given") or []), str(name.get("family") or "")]
        text = " ".join(p for p in parts if p)
        if text:
            return text
    return ""


def identifiers(patient: dict[str, Any]) -> list[str]:
    return [
        str(i["value"]) for i in patient.get("identifier") or [] if isinstance(i, dict) and i.get("value")
    ]


def page_of(entries: Sequence[Entry], page: int, size: int) -> tuple[list[Entry], int]:
    """Page ``page`` (1-based, clamped) of ``entries`` and the number of pages (at least 1)."""
    pages = max(1, -(-len(entries) // size))
    page = min(max(1, page), pages)
    return list(entries[(page - 1) * size : page * size]), pages
