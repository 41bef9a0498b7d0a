"""FHIR R4 Consent evaluation: whether a person's privacy Consents permit a requester to read a resource,
and which Consent and which provision decided. Pure: no I/O; the service reads the Consents and wires it in.

Use: build one :class:`ConsentPolicy` per request from the Consents of the person (every record the MPI
links by MATCH, so a patient's Consent covers that patient's data from every source) and the base policy
(``FHIRBRIDGE_CONSENT_DEFAULT``); :meth:`ConsentPolicy.bind` it to the request's :class:`Requester` and
time once, then ask :meth:`BoundPolicy.decide` for each resource (``$everything``: up to ~1,000), or
:meth:`ConsentPolicy.explain` for a decision without a resource (``$consent-decision``).

The rules (docs/consent.md, "The rules", says why for each):

* A Consent counts when ``status`` is ``active``, its ``scope`` is ``patient-privacy`` (a Consent without a
  scope counts), its ``dateTime`` is not after now and its root ``provision`` applies.
* A provision applies when every element it states matches (several values in one element: any of them).
  Nested provisions are exceptions to their parent: in each branch the deepest provision that applies
  decides with its ``type``; among siblings that apply, deny wins.
* A provision without a ``type`` takes the opposite of its parent's; a root without one takes the
  ``policyRule``'s (OPTIN, OPTINR: permit; OPTOUT, OPTOUTE: deny), else deny. A ``type`` that is neither
  ``permit`` nor ``deny`` reads as deny.
* Several Consents that decide: deny wins (the stricter). None decides: the base policy.
* What cannot be read (a malformed date; a custodian actor when the resource's source is not given)
  is "unknown": the provision is taken to apply when its type is deny and not to apply when it is permit.
"""

from __future__ import annotations

import calendar
import functools
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from bridge.stores.index.rules import CLINICAL_DATE_PATHS

Effect = Literal["permit", "deny"]
#: a resource's clinical date (a FHIR date or dateTime), the date ``dataPeriod`` is compared with
ClinicalDate = Callable[[dict[str, Any]], str | None]

CONSENT_SCOPE = "http://terminology.hl7.org/CodeSystem/consentscope"
ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
RESOURCE_TYPES = "http://hl7.org/fhir/resource-types"
CONFIDENTIALITY = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"
PARTICIPATION_TYPE = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
CONSENT_ACTION = "http://terminology.hl7.org/CodeSystem/consentaction"

#: older names of the same code systems (FHIR STU3 URLs, the OID of v3-ActReason): read as the R4 ones
SYSTEM_ALIASES: Mapping[str, str] = {
    "http://hl7.org/fhir/consentscope": CONSENT_SCOPE,
    "http://hl7.org/fhir/v3/ActReason": ACT_REASON,
    "urn:oid:2.16.840.1.113883.5.8": ACT_REASON,
    "http://hl7.org/fhir/v3/ActCode": ACT_CODE,
    "http://hl7.org/fhir/v3/Confidentiality": CONFIDENTIALITY,
    "http://hl7.org/fhir/v3/ParticipationType": PARTICIPATION_TYPE,
    "http://hl7.org/fhir/consentaction": CONSENT_ACTION,
}

#: v3-ActReason PurposeOfUse, child -> parent (HL7 Terminology, "subsumedBy"). A provision's purpose
#: covers its descendants: a deny for HRESCH covers a CLINTRCH request, a permit for TREAT an ETREAT one.
PURPOSE_PARENT: Mapping[str, str] = {
    **dict.fromkeys(("CLINTRL", "COC", "ETREAT", "POPHLTH", "TREATDS"), "TREAT"),
    **dict.fromkeys(("BTG", "ERTREAT"), "ETREAT"),
    **dict.fromkeys(
        [
            "CAREMGT",
            "DONAT",
            "FRAUD",
            "GOV",
            "HACCRED",
            "HCOMPL",
            "HDECD",
            "HDIRECT",
            "HDM",
            "HLEGAL",
            "HOUTCOMS",
            "HPRGRP",
            "HQUALIMP",
            "HSYSADMIN",
            "MEMADMIN",
            "MILCDM",
            "MLTRAINING",
            "PATADMIN",
            "PATSFTY",
            "PERFMSR",
            "RECORDMGT",
            "SYSDEV",
            "TRAIN",
        ],
        "HOPERAT",
    ),
    **dict.fromkeys(("LABELING", "METAMGT"), "HSYSADMIN"),
    "HTEST": "SYSDEV",
    **dict.fromkeys(("CLMATTCH", "COVAUTH", "COVERAGE", "PMTDS", "REMITADV"), "HPAYMT"),
    **dict.fromkeys(("ELIGDTRM", "ELIGVER", "ENROLLM", "MILDCRG"), "COVERAGE"),
    **dict.fromkeys(("BIORCH", "CLINTRCH", "DSRCH", "POARCH", "TRANSRCH"), "HRESCH"),
    **dict.fromkeys(("CLINTRCHNPC", "CLINTRCHPC", "PRECLINTRCH"), "CLINTRCH"),
    **dict.fromkeys(("FAMRQT", "PWATRNY", "SUPNWK"), "PATRQT"),
    **dict.fromkeys(("DISASTER", "THREAT"), "PUBHLTH"),
}

#: the elements whose codes ``provision.code`` is looked for in, by resource type (CodeableConcepts or
#: Codings; a dotted path goes into lists); other types: ``code``, ``category``, ``type``
CODE_ELEMENTS: Mapping[str, tuple[str, ...]] = {
    "AllergyIntolerance": ("code",),
    "CarePlan": ("category",),
    "CareTeam": ("category",),
    "Claim": ("type",),
    "Composition": ("type", "category"),
    "Condition": ("code", "category"),
    "Coverage": ("type",),
    "Device": ("type",),
    "DiagnosticReport": ("code", "category"),
    "DocumentReference": ("type", "category"),
    "Encounter": ("class", "type", "serviceType", "reasonCode"),
    "ExplanationOfBenefit": ("type",),
    "FamilyMemberHistory": ("relationship", "condition.code"),
    "Goal": ("category", "description"),
    "ImagingStudy": ("modality", "procedureCode"),
    "Immunization": ("vaccineCode",),
    "MedicationAdministration": ("medicationCodeableConcept", "category"),
    "MedicationRequest": ("medicationCodeableConcept", "category"),
    "MedicationStatement": ("medicationCodeableConcept", "category"),
    "Observation": ("code", "category", "component.code"),
    "Procedure": ("code", "category"),
    "ServiceRequest": ("code", "category"),
    "Specimen": ("type",),
}
DEFAULT_CODE_ELEMENTS: tuple[str, ...] = ("code", "category", "type")
_CODE_PATHS = {rtype: tuple(tuple(p.split(".")) for p in paths) for rtype, paths in CODE_ELEMENTS.items()}
_DEFAULT_CODE_PATHS = tuple(tuple(p.split(".")) for p in DEFAULT_CODE_ELEMENTS)

#: v3-Confidentiality, lowest to highest: a provision's label "R" covers resources labelled R or lower
#: (the R4 definition of Consent.provision.securityLabel: "a high water mark")
CONFIDENTIALITY_RANK: Mapping[str, int] = {"U": 0, "L": 1, "M": 2, "N": 3, "R": 4, "V": 5}

#: actor roles (v3-ParticipationType) that name where the data comes from, not who asks: custodian, author
DATA_SIDE_ROLES: frozenset[str] = frozenset({"CST", "AUT"})
#: consentaction codes that a read by the service is: a provision stating only others (collect, correct)
#: is not about reads
READ_ACTIONS: frozenset[str] = frozenset({"access", "use", "disclose"})
#: the elements whose references name a resource's authors (``data.meaning = authoredby``)
AUTHOR_ELEMENTS: tuple[str, ...] = (
    "author",
    "asserter",
    "informationSource",
    "performer",
    "recorder",
    "requester",
)

_OPT_IN = frozenset({"OPTIN", "OPTINR"})
_OPT_OUT = frozenset({"OPTOUT", "OPTOUTE"})
_STRUCTURE_DEFINITION = "http://hl7.org/fhir/StructureDefinition/"
_DATE = re.compile(
    r"(\d{4})(?:-(\d{2})(?:-(\d{2})(?:T(\d{2}):(\d{2})(?::(\d{2})(\.\d+)?)?(Z|[+-]\d{2}:\d{2})?)?)?)?",
    re.ASCII,
)


@dataclass(frozen=True, slots=True)
class Requester:
    """Who asks, and why. ``organization`` is the source organisation id the token speaks for (``st-mary``;
    from the issuer's configuration); ``organization_refs`` the ``Organization/<id>`` references we hold
    that denote it, when known; ``practitioner`` the token's ``fhirUser`` when it is a ``Practitioner/…``
    or ``PractitionerRole/…`` (relative); ``purpose`` a v3-ActReason PurposeOfUse code (``TREAT``)."""

    organization: str | None
    purpose: str
    organization_refs: frozenset[str] = frozenset()
    practitioner: str | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    """Whether the access is permitted, and why: the Consent (its ``id``, or ``#<index>`` in the list the
    policy was built from when it has none) and the provision (``provision.provision[1]``) that decided,
    or neither when the base policy decided."""

    permit: bool
    consent_id: str | None
    provision_path: str | None
    reason: str


@dataclass(frozen=True, slots=True)
class Dependency:
    """A provision that may apply to the requester depending on the resource: which elements it states
    that look at the resource (``class``, ``code``, ``securityLabel``, ``dataPeriod``, ``data``, and
    ``actor`` for a custodian or author actor, which looks at the resource's source)."""

    consent_id: str
    provision_path: str
    effect: Effect
    elements: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Explanation:
    """The answer for a requester without a resource. ``outcome`` ``permit`` or ``deny`` holds for every
    resource; ``depends`` means resources may be decided differently (``depends_on`` lists the provisions
    that look at the resource). ``decision`` is the decision when no provision looks at the resource."""

    outcome: Literal["permit", "deny", "depends"]
    decision: Decision | None
    depends_on: tuple[Dependency, ...]
    reason: str


# -- dates ---------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=8192)
def _interval(text: str) -> tuple[float, float] | None:
    """[lo, hi) in POSIX seconds of a FHIR date, dateTime or instant, as wide as its precision ("2020" is
    the whole year; a time without seconds the whole minute); without a zone, UTC. None when malformed."""
    m = _DATE.fullmatch(text)
    if m is None:
        return None
    year, month, day, hour, minute, second, fraction, zone = m.groups()
    y = int(year)
    if month is None:
        return float(calendar.timegm((y, 1, 1, 0, 0, 0))), float(calendar.timegm((y + 1, 1, 1, 0, 0, 0)))
    mo = int(month)
    if not 1 <= mo <= 12:
        return None
    if day is None:
        nxt = (y + 1, 1) if mo == 12 else (y, mo + 1)
        return float(calendar.timegm((y, mo, 1, 0, 0, 0))), float(calendar.timegm((*nxt, 1, 0, 0, 0)))
    d = int(day)
    if not 1 <= d <= calendar.monthrange(y, mo)[1]:
        return None
    if hour is None:
        lo = calendar.timegm((y, mo, d, 0, 0, 0))
        return float(lo), float(lo + 86400)
    h, mi, s = int(hour), int(minute), int(second or 0)
    if h > 23 or mi > 59 or s > 60:  # 60: a leap second, as FHIR's time allows
        return None
    offset = 0
    if zone and zone != "Z":
        zh, zm = int(zone[1:3]), int(zone[4:6])
        if zh > 14 or zm > 59:
            return None
        offset = (zh * 3600 + zm * 60) * (-1 if zone[0] == "-" else 1)
    lo_f = calendar.timegm((y, mo, d, h, mi, s, 0, 0, 0)) - offset + (float(fraction) if fraction else 0.0)
    step = 60.0 if second is None else (10.0 ** -(len(fraction) - 1) if fraction else 1.0)
    return lo_f, lo_f + step


def fhir_interval(value: object) -> tuple[float, float] | None:
    """[lo, hi) in POSIX seconds of a FHIR date/dateTime/instant by its precision, None when malformed."""
    return _interval(value) if isinstance(value, str) else None


def _period(value: object) -> tuple[float, float] | None:
    """[lo, hi) of a Period: from the start of ``start`` to the end of ``end`` (a missing one is open);
    None when it cannot be read."""
    if not isinstance(value, Mapping):
        return None
    lo, hi = -math.inf, math.inf
    if value.get("start") is not None:
        start = fhir_interval(value["start"])
        if start is None:
            return None
        lo = start[0]
    if value.get("end") is not None:
        end = fhir_interval(value["end"])
        if end is None:
            return None
        hi = end[1]
    return lo, hi


# -- codings and references ----------------------------------------------------------------------------
Pair = tuple[str | None, str]


def _items(value: object) -> list[Any]:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def _pair(coding: object) -> Pair | None:
    if not isinstance(coding, Mapping):
        return None
    code, system = coding.get("code"), coding.get("system")
    if not isinstance(code, str) or not code or not (system is None or isinstance(system, str)):
        return None
    return (SYSTEM_ALIASES.get(system, system) if system else None), code


def _codings(value: object) -> Iterator[Pair]:
    """The (system, code) of Codings and CodeableConcepts, one or a list."""
    for item in _items(value):
        if isinstance(item, Mapping) and isinstance(item.get("coding"), list):
            for coding in item["coding"]:
                pair = _pair(coding)
                if pair is not None:
                    yield pair
        else:
            pair = _pair(item)
            if pair is not None:
                yield pair


def _local_ref(value: object, base_url: str | None) -> str | None:
    """``Type/id`` of a literal reference to this server (relative, or absolute under ``base_url``;
    a version suffix dropped), None for anything else."""
    if not isinstance(value, str) or not value:
        return None
    if base_url and value.startswith(base_url + "/"):
        value = value[len(base_url) + 1 :]
    elif "://" in value or value.startswith(("urn:", "#")):
        return None
    head = value.partition("/_history/")[0]
    rtype, sep, rid = head.partition("/")
    return head if sep and rtype and rid and "/" not in rid else None


def _path_values(resource: dict[str, Any], path: tuple[str, ...]) -> list[Any]:
    nodes: list[Any] = [resource]
    for part in path:
        found: list[Any] = []
        for node in nodes:
            if isinstance(node, dict):
                found.extend(_items(node.get(part)))
        nodes = found
    return nodes


def _collect_refs(value: object, base_url: str | None, out: set[str]) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "reference" and isinstance(item, str):
                ref = _local_ref(item, base_url)
                if ref:
                    out.add(ref)
            elif isinstance(item, dict | list):
                _collect_refs(item, base_url, out)
    elif isinstance(value, list):
        for item in value:
            _collect_refs(item, base_url, out)


_DATE_PATHS = {
    rtype: tuple(tuple(p.split(".")) for p in paths) for rtype, paths in CLINICAL_DATE_PATHS.items()
}


def index_clinical_date(resource: dict[str, Any]) -> str | None:
    """The index's clinical date (:func:`bridge.stores.index.rules.clinical_date`: the first non-empty
    text among the type's ``CLINICAL_DATE_PATHS``), with the paths split once rather than per call."""
    rtype = resource.get("resourceType")
    for path in _DATE_PATHS.get(rtype, ()) if isinstance(rtype, str) else ():
        node: Any = resource
        for part in path:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, str) and node:
            return node
    return None


@functools.lru_cache(maxsize=512)
def purposes_covered(code: str) -> frozenset[str]:
    """``code`` and every PurposeOfUse code it subsumes (:data:`PURPOSE_PARENT`)."""
    out = {code}
    for child, parent in PURPOSE_PARENT.items():
        if parent == code:
            out |= purposes_covered(child)
    return frozenset(out)


# -- compiled Consents (independent of the request) ----------------------------------------------------
@dataclass(frozen=True, slots=True)
class _Node:
    """One provision, its elements read once."""

    path: str
    effect: Effect
    note: str  # how the effect was found when the provision states none ("" when it does)
    period: tuple[float, float] | None
    period_bad: bool
    actor: bool  # actors stated
    org_ids: frozenset[str]  # requester side: logical references' identifier values
    org_refs: frozenset[str]  # requester side: Organization/<id>
    practitioners: frozenset[str]
    source_ids: frozenset[str]  # custodian/author side
    source_refs: frozenset[str]
    purposes: frozenset[str] | None  # the request purposes covered
    classes: frozenset[str] | None
    profiles: frozenset[str]
    codes: frozenset[Pair] | None
    code_any: frozenset[str]  # codes stated without a system: any system matches
    labels: frozenset[Pair] | None
    label_any: frozenset[str]
    ceiling: int  # highest confidentiality rank stated in labels, -1 for none
    data_period: tuple[float, float] | None
    data_period_bad: bool
    data: tuple[tuple[str, str | None, str | None], ...] | None  # (meaning, Type/id, organisation id)
    children: tuple[_Node, ...]

    def data_elements(self, source_actor: bool) -> tuple[str, ...]:
        named = (
            ("actor", source_actor),
            ("class", self.classes is not None),
            ("code", self.codes is not None),
            ("securityLabel", self.labels is not None),
            ("dataPeriod", self.data_period is not None),
            ("data", self.data is not None),
        )
        return tuple(name for name, stated in named if stated)


@dataclass(frozen=True, slots=True)
class _Consent:
    id: str
    root: _Node | None  # None: its actions are not reads
    issued: tuple[float, float] | None
    issued_bad: bool


def _effect(raw: object, parent: Effect | None, policy_rule: Effect | None) -> tuple[Effect, str]:
    if raw == "permit" or raw == "deny":
        return raw, ""
    if raw is not None:
        return "deny", "its type is neither permit nor deny: read as deny"
    if parent is not None:
        return ("deny" if parent == "permit" else "permit"), "no type: the opposite of its parent's"
    if policy_rule is not None:
        return policy_rule, "no type: the policyRule's"
    return "deny", "no type and no OPTIN/OPTOUT policyRule: read as deny"


def _policy_rule(consent: Mapping[str, Any]) -> Effect | None:
    for system, code in _codings(consent.get("policyRule")):
        if system in (ACT_CODE, None) and code in _OPT_IN:
            return "permit"
        if system in (ACT_CODE, None) and code in _OPT_OUT:
            return "deny"
    return None


def _is_privacy(consent: Mapping[str, Any]) -> bool:
    scope = consent.get("scope")
    pairs = list(_codings(scope))
    if scope is None or not pairs:
        return True  # lenient: a Consent without a (coded) scope is taken as a privacy Consent
    return any(code == "patient-privacy" and system in (CONSENT_SCOPE, None) for system, code in pairs)


def _ref_type(value: object) -> str | None:
    if not isinstance(value, str):
        return None
    return value.removeprefix(_STRUCTURE_DEFINITION)


def _compile_node(
    raw: Mapping[str, Any], path: str, parent: Effect | None, policy_rule: Effect | None, base_url: str | None
) -> _Node | None:
    actions = list(_codings(raw.get("action")))
    if actions and not any(s in (CONSENT_ACTION, None) and c in READ_ACTIONS for s, c in actions):
        return None
    effect, note = _effect(raw.get("type"), parent, policy_rule)
    period = _period(raw["period"]) if raw.get("period") is not None else None

    org_ids: set[str] = set()
    org_refs: set[str] = set()
    practitioners: set[str] = set()
    source_ids: set[str] = set()
    source_refs: set[str] = set()
    actors = _items(raw.get("actor"))
    for actor in actors:
        if not isinstance(actor, Mapping) or not isinstance(actor.get("reference"), Mapping):
            continue
        data_side = any(
            s in (PARTICIPATION_TYPE, None) and c in DATA_SIDE_ROLES for s, c in _codings(actor.get("role"))
        )
        ref = actor["reference"]
        literal = _local_ref(ref.get("reference"), base_url)
        literal_type = literal.partition("/")[0] if literal else None
        if literal is not None and literal_type == "Organization":
            (source_refs if data_side else org_refs).add(literal)
        elif literal is not None and literal_type in ("Practitioner", "PractitionerRole") and not data_side:
            practitioners.add(literal)
        ident = ref.get("identifier")
        value = ident.get("value") if isinstance(ident, Mapping) else None
        if (
            isinstance(value, str)
            and value
            and _ref_type(ref.get("type")) in (None, "Organization")
            and literal_type in (None, "Organization")
        ):
            (source_ids if data_side else org_ids).add(value)

    purposes: frozenset[str] | None = None
    if _items(raw.get("purpose")):
        purposes = frozenset().union(
            *(purposes_covered(c) for s, c in _codings(raw.get("purpose")) if s in (ACT_REASON, None))
        )

    classes: frozenset[str] | None = None
    profiles: set[str] = set()
    if _items(raw.get("class")):
        types = set()
        for system, code in _codings(raw.get("class")):
            if "/" in code:
                profiles.add(code.partition("|")[0])
            elif system in (RESOURCE_TYPES, None):
                types.add(code)
        classes = frozenset(types)

    codes = (
        frozenset(_codings(raw.get("code"))) if _items(raw.get("code")) else None
    )  # several CodeableConcepts: any coding of any of them
    labels: frozenset[Pair] | None = None
    ceiling = -1
    if _items(raw.get("securityLabel")):
        labels = frozenset(_codings(raw.get("securityLabel")))
        ranks = [
            CONFIDENTIALITY_RANK[c]
            for s, c in labels
            if s in (CONFIDENTIALITY, None) and c in CONFIDENTIALITY_RANK
        ]
        ceiling = max(ranks, default=-1)

    data_period = _period(raw["dataPeriod"]) if raw.get("dataPeriod") is not None else None
    data: tuple[tuple[str, str | None, str | None], ...] | None = None
    if _items(raw.get("data")):
        entries = []
        for item in _items(raw.get("data")):
            if not isinstance(item, Mapping) or not isinstance(item.get("reference"), Mapping):
                continue
            meaning = item.get("meaning")
            ref = item["reference"]
            literal = _local_ref(ref.get("reference"), base_url)
            ident = ref.get("identifier")
            value = ident.get("value") if isinstance(ident, Mapping) else None
            org = (
                value
                if isinstance(value, str) and value and _ref_type(ref.get("type")) in (None, "Organization")
                else None
            )
            entries.append((meaning if meaning in ("dependents", "authoredby") else "instance", literal, org))
        data = tuple(entries)

    children = []
    for index, child in enumerate(_items(raw.get("provision"))):
        if isinstance(child, Mapping):
            node = _compile_node(child, f"{path}.provision[{index}]", effect, None, base_url)
            if node is not None:
                children.append(node)
    return _Node(
        path=path,
        effect=effect,
        note=note,
        period=period,
        period_bad=raw.get("period") is not None and period is None,
        actor=bool(actors),
        org_ids=frozenset(org_ids),
        org_refs=frozenset(org_refs),
        practitioners=frozenset(practitioners),
        source_ids=frozenset(source_ids),
        source_refs=frozenset(source_refs),
        purposes=purposes,
        classes=classes,
        profiles=frozenset(profiles),
        codes=codes,
        code_any=frozenset(c for sys_, c in codes or () if sys_ is None),
        labels=labels,
        label_any=frozenset(c for sys_, c in labels or () if sys_ is None),
        ceiling=ceiling,
        data_period=data_period,
        data_period_bad=raw.get("dataPeriod") is not None and data_period is None,
        data=data,
        children=tuple(children),
    )


# -- one request ---------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _Bound:
    """A provision whose requester-side elements (actor, purpose, period, the Consent's dateTime) do not
    rule it out for this request; what is left looks at the resource."""

    node: _Node
    unknown: bool  # a requester-side element could not be read
    source_actor: bool  # the actor element is left to the resource's source (custodian, author)
    data: bool  # some element looks at the resource
    children: tuple[_Bound, ...]
    decision: Decision
    deny: bool  # its effect is deny


class _Resource:
    """A resource and its source; what the provisions look at is read on first use."""

    __slots__ = (
        "_authors",
        "_codings",
        "_date",
        "_dated",
        "_labels",
        "_profiles",
        "_refs",
        "base_url",
        "clinical_date",
        "raw",
        "source",
        "source_refs",
    )

    def __init__(
        self,
        raw: dict[str, Any],
        source: str | None,
        source_refs: frozenset[str],
        clinical_date: ClinicalDate,
        base_url: str | None,
    ) -> None:
        self.raw = raw
        self.source = source
        self.source_refs = source_refs
        self.clinical_date = clinical_date
        self.base_url = base_url
        self._codings: list[dict[str, Any]] | None = None
        self._labels: list[dict[str, Any]] | None = None
        self._profiles: frozenset[str] | None = None
        self._date: tuple[float, float] | None = None
        self._dated = False
        self._refs: frozenset[str] | None = None
        self._authors: frozenset[str] | None = None

    def own_ref(self) -> str | None:
        rtype, rid = self.raw.get("resourceType"), self.raw.get("id")
        return f"{rtype}/{rid}" if isinstance(rtype, str) and rtype and isinstance(rid, str) and rid else None

    def profiles(self) -> frozenset[str]:
        if self._profiles is None:
            meta = self.raw.get("meta")
            values = _items(meta.get("profile")) if isinstance(meta, dict) else []
            self._profiles = frozenset(p.partition("|")[0] for p in values if isinstance(p, str))
        return self._profiles

    def codings(self) -> list[dict[str, Any]]:
        """The Coding objects of the elements :data:`CODE_ELEMENTS` names for the resource's type."""
        if self._codings is None:
            rtype = self.raw.get("resourceType")
            paths = (
                _CODE_PATHS.get(rtype, _DEFAULT_CODE_PATHS) if isinstance(rtype, str) else _DEFAULT_CODE_PATHS
            )
            found: list[dict[str, Any]] = []
            for path in paths:
                value = self.raw.get(path[0])
                if value is None:
                    continue
                values = _items(value) if len(path) == 1 else _path_values(self.raw, path)
                for item in values:
                    if isinstance(item, dict):
                        coding = item.get("coding")
                        if isinstance(coding, list):
                            found.extend(c for c in coding if isinstance(c, dict))
                        else:
                            found.append(item)
            self._codings = found
        return self._codings

    def labels(self) -> list[dict[str, Any]]:
        """The Codings of ``meta.security``."""
        if self._labels is None:
            meta = self.raw.get("meta")
            security = meta.get("security") if isinstance(meta, dict) else None
            self._labels = [c for c in _items(security) if isinstance(c, dict)]
        return self._labels

    def date(self) -> tuple[float, float] | None:
        if not self._dated:
            self._date, self._dated = fhir_interval(self.clinical_date(self.raw)), True
        return self._date

    def refs(self) -> frozenset[str]:
        if self._refs is None:
            out: set[str] = set()
            _collect_refs(self.raw, self.base_url, out)
            self._refs = frozenset(out)
        return self._refs

    def authors(self) -> frozenset[str]:
        if self._authors is None:
            out: set[str] = set()
            for key in AUTHOR_ELEMENTS:
                _collect_refs(self.raw.get(key), self.base_url, out)
            self._authors = frozenset(out)
        return self._authors

    def from_source(self, ids: frozenset[str], refs: frozenset[str]) -> bool | None:
        """Whether the resource's source is one of these organisations; None when its source is not known."""
        if self.source is None and not self.source_refs:
            return None
        return self.source in ids or not refs.isdisjoint(self.source_refs)


def _coding_in(codings: list[dict[str, Any]], pairs: frozenset[Pair], any_system: frozenset[str]) -> bool:
    """Whether one of ``codings`` is a stated (system, code), or has a code stated without a system."""
    for coding in codings:
        code, system = coding.get("code"), coding.get("system")
        if not isinstance(code, str) or not code:
            continue
        if not system:
            if code in any_system:
                return True
        elif isinstance(system, str) and (
            code in any_system or (SYSTEM_ALIASES.get(system, system), code) in pairs
        ):
            return True
    return False


def _below_ceiling(labels: list[dict[str, Any]], ceiling: int) -> bool:
    """Whether a confidentiality label of the resource is at most ``ceiling`` (a rank)."""
    for label in labels:
        code = label.get("code")
        rank = CONFIDENTIALITY_RANK.get(code) if isinstance(code, str) else None
        if rank is not None and rank <= ceiling:
            system = label.get("system")
            if not system or (
                isinstance(system, str) and SYSTEM_ALIASES.get(system, system) == CONFIDENTIALITY
            ):
                return True
    return False


def _data_match(entries: tuple[tuple[str, str | None, str | None], ...], r: _Resource) -> bool | None:
    state: bool | None = False
    for meaning, ref, org in entries:
        if meaning != "authoredby" and ref is not None and ref == r.own_ref():
            return True
        if meaning == "dependents" and ref is not None and ref in r.refs():
            return True
        if meaning == "authoredby":
            if ref is not None and ref in r.authors():
                return True
            org_ref = ref if ref is not None and ref.startswith("Organization/") else None
            if org is not None or org_ref is not None:
                found = r.from_source(
                    frozenset([org]) if org else frozenset(), frozenset([org_ref]) if org_ref else frozenset()
                )
                if found:
                    return True
                if found is None:
                    state = None
    return state


def _applies(b: _Bound, r: _Resource) -> bool:
    """Whether a bound provision applies to the resource. An element that rules it out answers False;
    when none does but one cannot be told (an unreadable date, an unknown source), it applies if it
    denies. The cheapest elements are looked at first: any False rules the provision out whatever the
    others say, so the order does not change the answer."""
    if not b.data:
        return b.deny or not b.unknown
    unknown = b.unknown
    n = b.node
    if (
        n.classes is not None
        and r.raw.get("resourceType") not in n.classes
        and (not n.profiles or n.profiles.isdisjoint(r.profiles()))
    ):
        return False
    if b.source_actor:
        found = r.from_source(n.source_ids, n.source_refs)
        if found is False:
            return False
        if found is None:
            unknown = True
    if n.labels is not None:
        labels = r.labels()
        if not _coding_in(labels, n.labels, n.label_any) and (
            n.ceiling < 0 or not _below_ceiling(labels, n.ceiling)
        ):
            return False
    if n.data_period is not None:
        date = r.date()
        if date is None or date[0] < n.data_period[0] or date[1] > n.data_period[1]:
            return False
    if n.codes is not None and not _coding_in(r.codings(), n.codes, n.code_any):
        return False
    if n.data is not None:
        found = _data_match(n.data, r)
        if found is False:
            return False
        if found is None:
            unknown = True
    return b.deny or not unknown


def _decide_node(b: _Bound, r: _Resource) -> _Bound:
    """The provision that decides in ``b``'s subtree (``b`` applies): the deepest that applies in each
    branch; among siblings, the first deny, else the first permit; none: ``b`` itself."""
    chosen: _Bound | None = None
    for child in b.children:
        if _applies(child, r):
            found = _decide_node(child, r)
            if found.deny:
                return found
            if chosen is None:
                chosen = found
    return chosen or b


def _possible(b: _Bound) -> frozenset[Effect]:
    """The effects ``b``'s subtree can decide (``b`` applies) over all resources, each child that looks at
    the resource taken as free to apply or not."""
    sure = [c for c in b.children if not c.data]
    maybe = [c for c in b.children if c.data]
    found = {c.node.path: _possible(c) for c in b.children}
    out: set[Effect] = set()
    if any("deny" in found[c.node.path] for c in b.children) or (not sure and b.node.effect == "deny"):
        out.add("deny")
    if all("permit" in found[c.node.path] for c in sure) and (
        bool(sure) or b.node.effect == "permit" or any("permit" in found[c.node.path] for c in maybe)
    ):
        out.add("permit")
    return frozenset(out)


def _walk(b: _Bound) -> Iterator[_Bound]:
    yield b
    for child in b.children:
        yield from _walk(child)


class BoundPolicy:
    """A :class:`ConsentPolicy` for one requester at one time: provisions that cannot apply to the
    requester are gone, and a decision that does not depend on the resource is made once
    (:attr:`constant`). Cheap to ask for each resource of an ``$everything``."""

    #: decisions remembered per (resource type, source) when nothing else is looked at
    MEMO_SIZE = 4096

    def __init__(
        self,
        roots: tuple[tuple[str, _Bound], ...],
        default: Decision,
        clinical_date: ClinicalDate,
        base_url: str | None,
    ) -> None:
        self._roots = roots
        self._default = default
        self._clinical_date = clinical_date
        self._base_url = base_url
        nodes = [b for _, root in roots for b in _walk(root)]
        by_type_only = all(
            b.node.codes is None
            and b.node.labels is None
            and b.node.data_period is None
            and b.node.data is None
            and not b.node.profiles
            for b in nodes
        )
        self._memo: dict[tuple[str | None, str | None, frozenset[str]], Decision] | None = (
            {} if by_type_only else None
        )
        #: the decision for every resource, when no remaining provision looks at the resource
        self.constant: Decision | None = None
        if not any(b.data for b in nodes):
            self.constant = self._evaluate(_Resource({}, None, frozenset(), clinical_date, base_url))

    def decide(
        self,
        resource: dict[str, Any],
        *,
        source: str | None = None,
        source_refs: frozenset[str] = frozenset(),
    ) -> Decision:
        """The decision for reading ``resource`` (R4 JSON). ``source`` is the id of the organisation the
        resource came from and ``source_refs`` the ``Organization/<id>`` references denoting it: a
        custodian or author actor (and ``data`` ``authoredby`` an organisation) is matched against them;
        when both are missing, such a provision cannot be told (see the module's rules)."""
        if self.constant is not None:
            return self.constant
        memo = self._memo
        if memo is not None:
            rtype = resource.get("resourceType")
            key = (rtype if isinstance(rtype, str) else None, source, source_refs)
            hit = memo.get(key)
            if hit is None:
                hit = self._evaluate(
                    _Resource(resource, source, source_refs, self._clinical_date, self._base_url)
                )
                if len(memo) < self.MEMO_SIZE:
                    memo[key] = hit
            return hit
        return self._evaluate(_Resource(resource, source, source_refs, self._clinical_date, self._base_url))

    def _evaluate(self, r: _Resource) -> Decision:
        permit: Decision | None = None
        for _, root in self._roots:
            if _applies(root, r):
                found = _decide_node(root, r)
                if found.deny:
                    return found.decision
                if permit is None:
                    permit = found.decision
        return permit or self._default

    def explain(self) -> Explanation:
        """Whether every resource gets the same answer, and which provisions look at the resource."""
        per_consent: list[frozenset[Effect | None]] = []
        for _, root in self._roots:
            possible: frozenset[Effect | None] = frozenset(_possible(root))
            per_consent.append(possible | {None} if root.data else possible)
        default: Effect = "permit" if self._default.permit else "deny"
        all_may_abstain = all(None in p for p in per_consent)
        outcomes: set[Effect] = set()
        if any("deny" in p for p in per_consent) or (all_may_abstain and default == "deny"):
            outcomes.add("deny")
        if all(("permit" in p or None in p) for p in per_consent) and (
            any("permit" in p for p in per_consent) or (all_may_abstain and default == "permit")
        ):
            outcomes.add("permit")
        depends_on = tuple(
            Dependency(cid, b.node.path, b.node.effect, b.node.data_elements(b.source_actor))
            for cid, root in self._roots
            for b in _walk(root)
            if b.data
        )
        if len(outcomes) == 1:
            (outcome,) = outcomes
            if self.constant is not None:
                reason = self.constant.reason
            else:
                reason = f"{outcome} whatever the resource, though {len(depends_on)} provision(s) look at it"
            return Explanation(outcome, self.constant, depends_on, reason)
        return Explanation(
            "depends", None, depends_on, f"depends on the resource: {len(depends_on)} provision(s) look at it"
        )


class ConsentPolicy:
    """The privacy Consents of one person and the deployment's base policy.

    ``consents`` are R4 Consent resources (JSON); those that do not count (not ``active``, another scope)
    are listed in :attr:`ignored` with the reason. ``default`` is ``permit`` (opt-out deployments) or
    ``deny`` (opt-in); ValueError otherwise. ``clinical_date`` gives the date a ``dataPeriod`` is compared
    with (the index's rule by default); ``base_url`` is the service's FHIR base, so that absolute
    references to this server read as relative ones.
    """

    def __init__(
        self,
        consents: Iterable[Mapping[str, Any]],
        default: str,
        *,
        clinical_date: ClinicalDate | None = None,
        base_url: str | None = None,
    ) -> None:
        if default not in ("permit", "deny"):
            raise ValueError("the base policy is 'permit' or 'deny'")
        self.default: Effect = "permit" if default == "permit" else "deny"
        self.base_url = base_url.rstrip("/") if base_url else None
        self.clinical_date = clinical_date or index_clinical_date
        #: (consent id, why it does not count)
        self.ignored: list[tuple[str, str]] = []
        compiled: list[_Consent] = []
        for index, consent in enumerate(consents):
            cid = consent.get("id") if isinstance(consent, Mapping) else None
            label = cid if isinstance(cid, str) and cid else f"#{index}"
            if not isinstance(consent, Mapping) or consent.get("resourceType", "Consent") != "Consent":
                self.ignored.append((label, "not a Consent"))
            elif consent.get("status") != "active":
                self.ignored.append((label, f"status {consent.get('status')!r}, not active"))
            elif not _is_privacy(consent):
                self.ignored.append((label, "scope is not patient-privacy"))
            else:
                compiled.append(self._compile(label, consent))
        self._consents = tuple(compiled)
        self._last: tuple[Requester, datetime, BoundPolicy] | None = None

    def _compile(self, label: str, consent: Mapping[str, Any]) -> _Consent:
        raw_root = consent.get("provision")
        root_dict: Mapping[str, Any] = raw_root if isinstance(raw_root, Mapping) else {}
        root = _compile_node(root_dict, "provision", None, _policy_rule(consent), self.base_url)
        issued = fhir_interval(consent["dateTime"]) if consent.get("dateTime") is not None else None
        return _Consent(label, root, issued, consent.get("dateTime") is not None and issued is None)

    def bind(self, requester: Requester, *, now: datetime) -> BoundPolicy:
        """This policy for ``requester`` at ``now`` (timezone-aware; ValueError otherwise)."""
        if now.tzinfo is None or now.utcoffset() is None:
            raise ValueError("now must be timezone-aware")
        last = self._last
        if last is not None and last[0] == requester and last[1] == now:
            return last[2]
        ts = now.timestamp()
        roots: list[tuple[str, _Bound]] = []
        for consent in self._consents:
            if consent.root is None or (consent.issued is not None and consent.issued[0] > ts):
                continue
            bound = self._bind(consent.id, consent.root, requester, ts, consent.issued_bad)
            if bound is not None:
                roots.append((consent.id, bound))
        default = Decision(
            self.default == "permit", None, None, f"no Consent applies: the base policy ({self.default})"
        )
        policy = BoundPolicy(tuple(roots), default, self.clinical_date, self.base_url)
        self._last = (requester, now, policy)
        return policy

    def _bind(self, cid: str, n: _Node, req: Requester, now: float, unknown: bool) -> _Bound | None:
        if n.period_bad or n.data_period_bad:
            unknown = True
        if n.period is not None and not n.period[0] <= now < n.period[1]:
            return None
        if n.purposes is not None and req.purpose not in n.purposes:
            return None
        source_actor = False
        if n.actor and not (
            (req.organization is not None and req.organization in n.org_ids)
            or not req.organization_refs.isdisjoint(n.org_refs)
            or (req.practitioner is not None and req.practitioner in n.practitioners)
        ):
            if not (n.source_ids or n.source_refs):
                return None
            source_actor = True
        if unknown and n.effect == "permit":
            return None  # an unknown permit never applies
        data = source_actor or any(
            v is not None for v in (n.classes, n.codes, n.labels, n.data_period, n.data)
        )
        children = tuple(
            b for b in (self._bind(cid, child, req, now, False) for child in n.children) if b is not None
        )
        how = f"; {n.note}" if n.note else ""
        if unknown:
            how += "; an element could not be read, so this deny is taken to apply"
        decision = Decision(n.effect == "permit", cid, n.path, f"Consent {cid}, {n.path}: {n.effect}{how}")
        return _Bound(n, unknown, source_actor, data, children, decision, n.effect == "deny")

    def decide(
        self,
        requester: Requester,
        resource: dict[str, Any],
        *,
        now: datetime,
        source: str | None = None,
        source_refs: frozenset[str] = frozenset(),
    ) -> Decision:
        """The decision for ``requester`` reading ``resource`` at ``now``: :meth:`bind` (remembered for the
        last requester and time) then :meth:`BoundPolicy.decide`."""
        return self.bind(requester, now=now).decide(resource, source=source, source_refs=source_refs)

    def explain(self, requester: Requester, *, now: datetime) -> Explanation:
        """The answer for ``requester`` at ``now`` without a resource (``$consent-decision``): ``permit`` or
        ``deny`` when every resource gets it, else ``depends`` with the provisions that look at the
        resource (class, code, securityLabel, dataPeriod, data, custodian/author actors)."""
        return self.bind(requester, now=now).explain()
