"""A patient's merged history (the entries of ``Patient/{id}/$everything``) as the patient page shows
it: the banner, the sections in International Patient Summary order, each entry with its source, the
other sources that sent the same fact and every delivery (the provenance drawer); the facts on which
sources disagree; the results grid and trends; the timeline; the filters; and what the API said it
withheld.

Pure: it reads bundles and returns values; nothing here does I/O or knows HTTP.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bridge.service.mpi import EXT_OTHER_PERSON, EXT_STATE
from bridge.stores.index.rules import CLINICAL_DATE_PATHS

PROVENANCE_EXT = "https://fhirbridge.dev/fhir/StructureDefinition/entry-provenance"
MRN_CODE = "MR"
SEVERE = frozenset({"severe"})
#: v3 ObservationInterpretation codes shown as the flag, as the lab sent them
FLAGS = frozenset({"H", "HH", "HU", "L", "LL", "LU", "A", "AA", "N"})
#: never "the same fact" when two are coded alike at one time: visits, identities, documents
NOT_DISPUTED = frozenset({"Patient", "Encounter", "DocumentReference"})
_DATE = re.compile(r"^\d{4}(-(0[1-9]|1[0-2])(-(0[1-9]|[12]\d|3[01]))?)?$")
_INSTANT = re.compile(r"^\d{4}(-\d{2}(-\d{2}(T\d{2}:\d{2}(:\d{2}(\.\d{1,9})?)?(Z|[+-]\d{2}:\d{2})?)?)?)?$")


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
class Delivery:
    """One delivery of an entry (its entry-provenance extension): the sending organisation, when it
    arrived, the SHA-256 of the bundle, the patient record it was filed under, its ledger leaf."""

    org: str
    received: str
    bundle_sha256: str = ""
    source_patient: str = ""
    ledger_index: str = ""


@dataclass(frozen=True, slots=True)
class Lab:
    """A result's number as the grid and the trend use it: value, unit, the lab's reference range and
    the flag (the lab's interpretation code, else H/L from the range; "" when neither says)."""

    value: float
    unit: str
    low: float | None
    high: float | None
    range_text: str
    flag: str


@dataclass(frozen=True, slots=True)
class Entry:
    """One merged entry: what it is, when, its status, the source that sent it first and the others,
    and every delivery (earliest first)."""

    resource_type: str
    id: str
    title: str
    detail: str
    date: str
    status: str
    source: str
    also: tuple[str, ...]
    severe: bool = False
    deliveries: tuple[Delivery, ...] = ()
    #: the first ``system|code`` in sorted order, as the index's dedupe rules compare codes
    code: str = ""
    lab: Lab | None = None
    #: first received after the page's ``since``
    new: bool = False
    section: str = ""

    @property
    def received(self) -> str:
        return self.deliveries[0].received if self.deliveries else ""


@dataclass(frozen=True, slots=True)
class Filters:
    """What the page shows of the history: clinical dates from ``start`` to ``end`` (``YYYY``,
    ``YYYY-MM`` or ``YYYY-MM-DD``, inclusive, each at its precision), one section (``type``), one
    sending organisation (``source``: the entry's first source or one that also reported it), and
    what arrived after ``since`` (highlighted, not filtered). Invalid values are dropped by
    :meth:`parse`, never guessed."""

    start: str = ""
    end: str = ""
    type: str = ""
    source: str = ""
    since: str = ""

    @classmethod
    def parse(cls, query: Any) -> Filters:
        """From a query mapping (``from``, ``to``, ``type``, ``source``, ``since``)."""

        def get(name: str) -> str:
            value = str(query.get(name, "") or "").strip()
            return value if len(value) <= 64 and value.isprintable() else ""

        start, end, since = get("from"), get("to"), get("since")
        kind = get("type")
        return cls(
            start=start if _DATE.match(start) else "",
            end=end if _DATE.match(end) else "",
            type=kind if kind in SECTION_KEYS else "",
            source=get("source"),
            since=since if _INSTANT.match(since) else "",
        )

    @property
    def active(self) -> bool:
        return bool(self.start or self.end or self.type or self.source)

    def query(self) -> list[tuple[str, str]]:
        """The filters as query parameters (to carry them on paging links)."""
        pairs = (("from", self.start), ("to", self.end), ("type", self.type), ("source", self.source))
        return [(k, v) for k, v in (*pairs, ("since", self.since)) if v]

    def admits(self, entry: Entry) -> bool:
        if self.type and entry.section != self.type:
            return False
        if self.source and self.source != entry.source and self.source not in entry.also:
            return False
        if self.start or self.end:
            if not entry.date:
                return False  # as the API's date filter: an undated entry matches no date range
            if self.start and entry.date[: len(self.start)] < self.start:
                return False
            if self.end and entry.date[: len(self.end)] > self.end:
                return False
        return True


@dataclass(frozen=True, slots=True)
class Dispute:
    """Entries of one fact (type, code, clinical time as stated) from different sources whose values
    differ: the index merges only identical facts, so these stay apart and are shown together."""

    title: str
    date: str
    entries: tuple[Entry, ...]


@dataclass(frozen=True, slots=True)
class LabPoint:
    date: str
    entry: Entry
    lab: Lab


@dataclass(slots=True)
class LabSeries:
    """One test in one unit (a unit is never mixed into another's axis), its points oldest first."""

    code: str
    title: str
    unit: str
    points: list[LabPoint] = field(default_factory=list)

    @property
    def key(self) -> str:
        return re.sub(r"[^A-Za-z0-9]+", "-", f"{self.code or self.title}-{self.unit}").strip("-").lower()

    @property
    def latest(self) -> LabPoint:
        return self.points[-1]

    def on(self, day: str) -> list[LabPoint]:
        return [p for p in self.points if p.date[:10] == day]


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
    filters: Filters = field(default_factory=Filters)
    #: every sending organisation of the history (the source filter's choices)
    sources: list[str] = field(default_factory=list)
    #: the banner's allergies, severe first: never filtered away
    banner_allergies: list[Entry] = field(default_factory=list)
    disputes: list[Dispute] = field(default_factory=list)
    labs: list[LabSeries] = field(default_factory=list)
    #: every entry the filters admit, newest first (undated last)
    timeline: list[Entry] = field(default_factory=list)
    shown: int = 0
    new: int = 0

    @property
    def hospitals(self) -> int:
        return len({s for r in self.records for s in r.sources})

    @property
    def allergies(self) -> list[Entry]:
        """The allergies, severe ones first (the banner's list, whatever the filters)."""
        return self.banner_allergies

    @property
    def disputed(self) -> frozenset[tuple[str, str]]:
        return frozenset((e.resource_type, e.id) for d in self.disputes for e in d.entries)

    def mrns_of(self, delivery: Delivery) -> tuple[str, ...]:
        """The MRNs of the linked record a delivery was filed under: the record whose id is its source
        patient, else those the same organisation sent (its source patient is the sender's own id)."""
        own = [r.mrns for r in self.records if r.id == delivery.source_patient]
        same = own or [r.mrns for r in self.records if delivery.org in r.sources]
        return tuple(dict.fromkeys(m for mrns in same for m in mrns))

    @property
    def lab_days(self) -> list[str]:
        """The days with a result in the grid, newest first."""
        return sorted({p.date[:10] for s in self.labs for p in s.points}, reverse=True)

    def section(self, key: str) -> Section:
        return self.other if key == OTHER.key else next(s for s in self.sections if s.key == key)


# -- reading the bundle ---------------------------------------------------------------------------
def build_view(
    patient_id: str,
    pages: Sequence[dict[str, Any]],
    *,
    truncated: bool = False,
    filters: Filters | None = None,
) -> PatientView:
    """The view of ``pages`` (the ``$everything`` pages read, in order); ``truncated`` when pages were
    left unread. The sections, the results grid and the timeline hold what ``filters`` admit; the
    banner and the disagreements always hold everything (a dispute is never filtered out of sight)."""
    filters = filters or Filters()
    view = PatientView(
        patient_id, sections=[Section(s.key, s.title) for s in SECTIONS], truncated=truncated, filters=filters
    )
    patients: list[tuple[dict[str, Any], tuple[str, ...], str]] = []
    everything: list[Entry] = []
    for page in pages:
        if not view.total and isinstance(page.get("total"), int):
            view.total = page["total"]
        for item in page.get("entry") or []:
            resource = item.get("resource") or {}
            mode = (item.get("search") or {}).get("mode")
            if mode == "outcome" or resource.get("resourceType") == "OperationOutcome":
                _read_outcome(view, resource)
                continue
            deliveries = _deliveries(item)
            sources = tuple(dict.fromkeys(d.org for d in deliveries))
            if resource.get("resourceType") == "Patient":
                patients.append((resource, sources, deliveries[0].received if deliveries else ""))
                continue
            section = _section_of(view, resource)
            entry = to_entry(resource, sources, deliveries, since=filters.since, section=section.key)
            everything.append(entry)
            if filters.admits(entry):
                section.entries.append(entry)
    _banner(view, patients)
    view.sources = sorted(
        {o for e in everything for o in (e.source, *e.also) if o}
        | {o for r in view.records for o in r.sources}
    )
    newest_first = sorted(everything, key=lambda e: e.date, reverse=True)
    view.banner_allergies = sorted(
        (e for e in newest_first if e.section == "allergies"), key=lambda e: not e.severe
    )
    view.disputes = disputes(newest_first)
    for section in (*view.sections, view.other):
        section.entries.sort(key=lambda e: e.date, reverse=True)
        if section.key == "allergies":
            section.entries.sort(key=lambda e: not e.severe)  # stable: newest first within each group
    view.labs = lab_series(view.section("results").entries)
    view.timeline = [e for e in newest_first if e.date and filters.admits(e)]
    view.timeline += [e for e in newest_first if not e.date and filters.admits(e)]
    view.shown = len(view.timeline)
    view.new = sum(1 for e in view.timeline if e.new)
    return view


def disputes(entries: Sequence[Entry]) -> list[Dispute]:
    """The facts on which sources disagree: entries of one type, code and clinical time (as stated)
    whose values differ, sent by more than one source. Identical facts were merged by the API
    already; what is left here differs in value, so both are kept and shown together."""
    groups: dict[tuple[str, str, str], list[Entry]] = {}
    for e in entries:
        if e.code and e.date and e.resource_type not in NOT_DISPUTED:
            groups.setdefault((e.resource_type, e.code, e.date), []).append(e)
    found = []
    for (_, _, date), group in groups.items():
        if len({e.detail for e in group}) > 1 and len({o for e in group for o in (e.source, *e.also)}) > 1:
            found.append(Dispute(group[0].title, date, tuple(sorted(group, key=lambda e: e.received))))
    return sorted(found, key=lambda d: d.date, reverse=True)


def lab_series(results: Sequence[Entry]) -> list[LabSeries]:
    """The numeric results by test and unit (one series each: never two units on one axis), points
    oldest first; series in the order of their titles."""
    series: dict[tuple[str, str], LabSeries] = {}
    for e in results:
        if e.lab is None or not e.date:
            continue
        key = (e.code or e.title, e.lab.unit)
        found = series.setdefault(key, LabSeries(e.code, e.title, e.lab.unit))
        found.points.append(LabPoint(e.date, e, e.lab))
    for s in series.values():
        s.points.sort(key=lambda p: p.date)
    return sorted(series.values(), key=lambda s: (s.title.lower(), s.unit))


def _read_outcome(view: PatientView, outcome: dict[str, Any]) -> None:
    for issue in outcome.get("issue") or []:
        if issue.get("code") == "suppressed":
            view.withheld = True
        elif issue.get("severity") in ("warning", "error", "fatal") and issue.get("diagnostics"):
            view.notices.append(str(issue["diagnostics"]))


def _deliveries(item: dict[str, Any]) -> tuple[Delivery, ...]:
    """Each delivery of an entry (its entry-provenance extensions), earliest received first."""
    found: list[Delivery] = []
    for ext in item.get("extension") or []:
        if not isinstance(ext, dict) or ext.get("url") != PROVENANCE_EXT:
            continue
        parts = {p.get("url"): p for p in ext.get("extension") or [] if isinstance(p, dict)}

        def text(name: str, *, parts: dict[Any, Any] = parts) -> str:
            part = parts.get(name) or {}
            value = next((v for k, v in part.items() if k.startswith("value")), "")
            if isinstance(value, dict):  # a Reference
                value = value.get("reference") or ""
            return str(value) if value is not None else ""

        org = text("sourceOrg")
        if org:
            found.append(
                Delivery(
                    org, text("receivedAt"), text("bundleSha256"), text("sourcePatient"), text("ledgerIndex")
                )
            )
    return tuple(sorted(found, key=lambda d: (d.received, d.org)))


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
def to_entry(
    resource: dict[str, Any],
    sources: Sequence[str],
    deliveries: Sequence[Delivery] = (),
    *,
    since: str = "",
    section: str = "",
) -> Entry:
    """The row of ``resource`` delivered by ``sources`` (earliest first), with its ``deliveries``;
    ``new`` when its first delivery arrived after ``since``."""
    rtype = str(resource.get("resourceType") or "")
    first = deliveries[0].received if deliveries else ""
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
        deliveries=tuple(deliveries),
        code=_first_code(resource),
        lab=lab_of(resource) if rtype == "Observation" else None,
        new=bool(since and first and first > since),
        section=section,
    )


def _first_code(r: dict[str, Any]) -> str:
    key = {
        "MedicationRequest": "medicationCodeableConcept",
        "MedicationStatement": "medicationCodeableConcept",
        "Immunization": "vaccineCode",
    }.get(str(r.get("resourceType")), "code")
    cc = r.get(key)
    codings = [
        f"{c.get('system') or ''}|{c['code']}"
        for c in (cc.get("coding") or [] if isinstance(cc, dict) else [])
        if isinstance(c, dict) and c.get("code")
    ]
    return min(codings) if codings else ""


def _number(q: Any) -> float | None:
    value = q.get("value") if isinstance(q, dict) else None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def lab_of(o: dict[str, Any]) -> Lab | None:
    """The number of an Observation with a plain ``valueQuantity`` (a comparator such as ``<5`` is not a
    point on a line), its unit, its first reference range and its flag; None otherwise."""
    q = o.get("valueQuantity")
    value = _number(q)
    if value is None or not isinstance(q, dict) or q.get("comparator"):
        return None
    unit = str(q.get("unit") or q.get("code") or "")
    ranges = [r for r in o.get("referenceRange") or [] if isinstance(r, dict)]
    rng = ranges[0] if ranges else {}
    low, high = _number(rng.get("low")), _number(rng.get("high"))
    range_text = str(rng.get("text") or "")
    if not range_text and (low is not None or high is not None):
        bounds = f"{_fmt(low) if low is not None else ''}–{_fmt(high) if high is not None else ''}"
        range_text = f"{bounds} {unit}".strip()
    flags = [c for cc in o.get("interpretation") or [] for c in _codes(cc) if c in FLAGS]
    flag = flags[0] if flags else ""
    if not flag and high is not None and value > high:
        flag = "H"
    elif not flag and low is not None and value < low:
        flag = "L"
    return Lab(value, unit, low, high, range_text, flag)


def _fmt(x: float) -> str:
    return f"{x:g}"


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
