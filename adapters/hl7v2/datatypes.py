"""HL7 v2 data types to FHIR datatypes: TS/DTM, CX, XPN, XAD, XTN, CE/CWE, XCN, PL, NM/SN.

Every converter here takes a :class:`~adapters.hl7v2.er7.Field` plus a :class:`Context` (the source,
the warning sink and the segment location) and returns a FHIR JSON fragment, or ``None`` when the
value is empty or cannot be represented faithfully (then a warning is recorded; never an invalid
value in the output).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from adapters.base import SourceInfo
from adapters.common import ucum as ucum_units
from adapters.common.dates import BadTimestamp, parse_ts
from adapters.errors import Location
from adapters.hl7v2.er7 import Field, Segment

Warn = Callable[[str, str, Location], None]


class LazyLoc:
    """Where a value sits, resolved into a :class:`Location` only when a warning is recorded.

    Converters receive one for every value they read; building a frozen ``Location`` each time would
    cost more than the conversion itself.
    """

    __slots__ = ("comp", "field", "message_index", "rep", "seg")

    def __init__(
        self, message_index: int, seg: Segment, field: int | None, rep: int | None, comp: int | None
    ) -> None:
        self.message_index = message_index
        self.seg = seg
        self.field = field
        self.rep = rep
        self.comp = comp

    def resolve(self) -> Location:
        s = self.seg
        return Location(
            message_index=self.message_index,
            segment=s.name,
            segment_index=s.index,
            line=s.line,
            field=self.field,
            repetition=self.rep,
            component=self.comp,
        )


Loc = Location | LazyLoc


class Context:
    """What the data-type converters need: the source, a warning sink and the message index."""

    __slots__ = ("_once", "_sink", "message_index", "source")

    def __init__(self, source: SourceInfo, warn: Warn, message_index: int = 1) -> None:
        self.source = source
        self._sink = warn
        self.message_index = message_index
        self._once: set[tuple[object, ...]] = set()

    def loc(
        self, seg: Segment, field: int | None = None, rep: int | None = None, comp: int | None = None
    ) -> LazyLoc:
        return LazyLoc(self.message_index, seg, field, rep, comp)

    def warn(self, code: str, message: str, loc: Loc) -> None:
        """Record a warning, unless the same one was already recorded for the same place.

        One field often feeds several values (OBX-6 is the unit of the value and of both ends of the
        reference range; OBR-7 is the report's and the order's time): its problem is reported once.
        """
        where = (loc.seg.index, loc.field, loc.rep, loc.comp) if isinstance(loc, LazyLoc) else (loc,)
        key = (code, message, *where)
        if key in self._once:
            return
        self._once.add(key)
        self._sink(code, message, loc.resolve() if isinstance(loc, LazyLoc) else loc)


# --------------------------------------------------------------------------------------------------
# TS / DTM / DT / TM: read by adapters.common.dates.parse_ts, as in every adapter


def fhir_datetime(ctx: Context, value: str, loc: Loc) -> str | None:
    """A FHIR dateTime for an HL7 TS, or ``None`` (with a warning) when it is not a valid time."""
    if not value:
        return None
    try:
        return parse_ts(value, ctx.source.timezone)[1]
    except BadTimestamp as exc:
        ctx.warn("invalid-timestamp", f"{exc.described()}; value dropped", loc)
        return None


def fhir_date(ctx: Context, value: str, loc: Loc) -> str | None:
    """A FHIR date (``YYYY[-MM[-DD]]``) for an HL7 DT/TS; the time part, if any, is dropped."""
    if not value:
        return None
    try:
        prec, v = parse_ts(value, ctx.source.timezone)
    except BadTimestamp as exc:
        ctx.warn("invalid-date", f"{exc.described()}; value dropped", loc)
        return None
    return v[:10] if prec == "time" else v


def fhir_instant(ctx: Context, value: str, loc: Loc) -> str | None:
    """A FHIR instant (needs a time to the second): ``None`` (with a warning) for a partial date."""
    if not value:
        return None
    try:
        prec, v = parse_ts(value, ctx.source.timezone)
    except BadTimestamp as exc:
        ctx.warn("invalid-timestamp", f"{exc.described()}; value dropped", loc)
        return None
    if prec != "time":
        ctx.warn("imprecise-instant", f"{value!r} has no time of day; an instant needs one", loc)
        return None
    return v


_TM = re.compile(r"^(\d{2})(\d{2})?(\d{2})?(?:\.\d{1,4})?(?:[+-]\d{4})?$")


def fhir_time(value: str) -> str | None:
    m = _TM.match(value.strip())
    if not m:
        return None
    h, mi, s = int(m.group(1)), int(m.group(2) or 0), int(m.group(3) or 0)
    if h > 23 or mi > 59 or s > 59:
        return None
    return f"{h:02d}:{mi:02d}:{s:02d}"


def period(ctx: Context, start: str, end: str, loc: Loc) -> dict[str, str] | None:
    p = {}
    s = fhir_datetime(ctx, start, loc)
    e = fhir_datetime(ctx, end, loc)
    if s:
        p["start"] = s
    if e:
        p["end"] = e
    return p or None


# --------------------------------------------------------------------------------------------------
# code systems and units

CODE_SYSTEMS: dict[str, str] = {
    "LN": "http://loinc.org",
    "LOINC": "http://loinc.org",
    "SCT": "http://snomed.info/sct",
    "SNM": "http://snomed.info/sct",
    "SNOMED": "http://snomed.info/sct",
    "SNOMEDCT": "http://snomed.info/sct",
    "SNOMED-CT": "http://snomed.info/sct",
    "I10": "http://hl7.org/fhir/sid/icd-10",
    "ICD10": "http://hl7.org/fhir/sid/icd-10",
    "I10C": "http://hl7.org/fhir/sid/icd-10-cm",
    "ICD10CM": "http://hl7.org/fhir/sid/icd-10-cm",
    "I10P": "http://www.cms.gov/Medicare/Coding/ICD10",
    "I9": "http://hl7.org/fhir/sid/icd-9-cm",
    "I9C": "http://hl7.org/fhir/sid/icd-9-cm",
    "ICD9": "http://hl7.org/fhir/sid/icd-9-cm",
    "ICD9CM": "http://hl7.org/fhir/sid/icd-9-cm",
    "CVX": "http://hl7.org/fhir/sid/cvx",
    "MVX": "http://terminology.hl7.org/CodeSystem/MVX",
    "RXNORM": "http://www.nlm.nih.gov/research/umls/rxnorm",
    "RXN": "http://www.nlm.nih.gov/research/umls/rxnorm",
    "NDC": "http://hl7.org/fhir/sid/ndc",
    "C4": "http://www.ama-assn.org/go/cpt",
    "CPT": "http://www.ama-assn.org/go/cpt",
    "C5": "http://www.ama-assn.org/go/cpt",
    "HCPCS": "urn:oid:2.16.840.1.113883.6.285",
    "HPC": "urn:oid:2.16.840.1.113883.6.285",
    "UCUM": "http://unitsofmeasure.org",
    "UML": "http://unitsofmeasure.org",
    "ISO+": "urn:iso:std:iso:11073:10101",
    "ISO3166_1": "urn:iso:std:iso:3166",
    "ISO3166": "urn:iso:std:iso:3166",
    "ISO639": "urn:ietf:bcp:47",
    "CDCREC": "urn:oid:2.16.840.1.113883.6.238",
    "NUBC": "http://www.nubc.org/patient-discharge",
    "NCI": "http://ncimeta.nci.nih.gov",
    "NCIT": "http://ncithesaurus-stage.nci.nih.gov",
    "CDCPHINVS": "urn:oid:2.16.840.1.114222.4.5.274",
    "CDCGS1VIS": "urn:oid:2.16.840.1.114222.4.5.307",
    "I9M": "http://hl7.org/fhir/sid/icd-9-cm",
    "ICD9M": "http://hl7.org/fhir/sid/icd-9-cm",
    "SNOMED CT": "http://snomed.info/sct",
    "NPI": "http://hl7.org/fhir/sid/us-npi",
    "FDDC": "urn:oid:2.16.840.1.113883.6.208",
    "FDDX": "urn:oid:2.16.840.1.113883.6.63",
    "MEDR": "http://terminology.hl7.org/CodeSystem/mdr",
    "MDDX": "urn:oid:2.16.840.1.113883.6.205",
    "CPTM": "urn:oid:2.16.840.1.113883.6.12",
    "NCPDP": "urn:oid:2.16.840.1.113883.6.68",
    "PHINQUESTION": "urn:oid:2.16.840.1.114222.4.5.232",
    "PLR": "urn:oid:2.16.840.1.113883.6.18",
}

_HL7_TABLE = re.compile(r"^(?:HL7|HL7 ?)(\d{4})$", re.IGNORECASE)
_LOCAL = re.compile(r"^(?:L|99[A-Z0-9]+|LOCAL)$", re.IGNORECASE)
_OID = re.compile(r"^[0-2](?:\.\d+)+$")


def code_system(ctx: Context, name: str, loc: Loc) -> str | None:
    """The FHIR URI for an HL7 v2 coding-system name (CWE-3). Unknown names are kept as-is, warned."""
    if not name:
        return None
    uri = CODE_SYSTEMS.get(name.upper())
    if uri:
        return uri
    m = _HL7_TABLE.match(name)
    if m:
        return f"http://terminology.hl7.org/CodeSystem/v2-{m.group(1)}"
    if _OID.match(name):
        return f"urn:oid:{name}"
    if ":" in name and " " not in name:
        return name  # already a URI
    if _LOCAL.match(name):
        return f"urn:fhirbridge:{ctx.source.org_id}:codesystem:{name}"
    ctx.warn("unknown-code-system", f"unknown coding system {name!r} kept as-is", loc)
    return (
        name
        if not any(c.isspace() for c in name)
        else f"urn:fhirbridge:{ctx.source.org_id}:codesystem:{name.replace(' ', '_')}"
    )


#: OBX-6.3 names of unit systems whose codes, when not UCUM, are kept as text only: UCUM's own URI must
#: not carry a code the grammar rejects, and ISO 2955 (ISO+) and ANSI X3.50 (ANS+) have no FHIR URI.
UNIT_SYSTEM_NAMES = frozenset({"UCUM", "UML", "ISO+", "ISO", "ANSI", "ANS+"})


def ucum(unit_code: str, unit_text: str = "") -> str | None:
    """The UCUM code for a unit given as code and/or text (OBX-6.1 / OBX-6.2), or ``None``.

    The code is tried first, then the text; each as sent when it is UCUM, else through the common
    spellings of :mod:`adapters.common.ucum`. Whatever the sender's OBX-6.3 claims, only a string the
    UCUM grammar accepts is returned.
    """
    return (ucum_units.to_ucum(unit_code) if unit_code else None) or (
        ucum_units.to_ucum(unit_text) if unit_text and unit_text != unit_code else None
    )


# --------------------------------------------------------------------------------------------------
# CE / CWE / CNE / CF


def codeable(ctx: Context, f: Field, loc: Loc) -> dict[str, Any] | None:
    """CE/CWE/CNE -> CodeableConcept: the primary and alternate triplets as codings, plus text."""
    if not f:
        return None
    codings: list[dict[str, Any]] = []
    for base in (1, 4, 10):
        code, display, sysname = f.c(base), f.c(base + 1), f.c(base + 2)
        if base == 10:  # CWE-10..12 is not a triplet: CWE-9 is original text; skip
            break
        if not code and not display:
            continue
        coding: dict[str, Any] = {}
        system = code_system(ctx, sysname, loc)
        if system:
            coding["system"] = system
        if base == 1 and f.c(7):
            coding["version"] = f.c(7)
        elif base == 4 and f.c(8):
            coding["version"] = f.c(8)
        if code:
            coding["code"] = code.strip()
        if display:
            coding["display"] = display
        if "code" in coding or "display" in coding:
            codings.append(coding)
    cc: dict[str, Any] = {}
    if codings:
        cc["coding"] = codings
    text = f.c(9) or (f.c(2) if not f.c(1) else "")
    if text:
        cc["text"] = text
    if not cc and f.c(1) == "":
        t = f.text()
        if t:
            cc["text"] = t
    return cc or None


def first_code(cc: dict[str, Any] | None) -> str | None:
    if not cc:
        return None
    for c in cc.get("coding", []):
        if c.get("code"):
            return str(c["code"])
    return cc.get("text")


def simple_coding(system: str, code: str, display: str | None = None) -> dict[str, str]:
    d = {"system": system, "code": code}
    if display:
        d["display"] = display
    return d


# --------------------------------------------------------------------------------------------------
# CX identifiers

US_SSN = "http://hl7.org/fhir/sid/us-ssn"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
_ID_TYPES = {
    "MR": "Medical record number",
    "SS": "Social Security number",
    "DL": "Driver's license number",
    "PPN": "Passport number",
    "PI": "Patient internal identifier",
    "PT": "Patient external identifier",
    "AN": "Account number",
    "VN": "Visit number",
    "NPI": "National provider identifier",
    "PRN": "Provider number",
    "EI": "Employee number",
    "MA": "Patient Medicaid number",
    "MC": "Patient's Medicare number",
    "BC": "Bank Card Number",
    "NI": "National unique individual identifier",
    "PN": "Person number",
    "DN": "Doctor number",
    "RRI": "Regional registry ID",
    "SB": "Social Beneficiary Identifier",
    "TAX": "Tax ID number",
    "XX": "Organization identifier",
}


def authority(f: Field, comp: int) -> str:
    """An HD (assigning authority / facility): its universal id when present, else its namespace."""
    return f.c(comp, 2) or f.c(comp, 1)


def identifier_type(code: str) -> dict[str, Any] | None:
    if not code:
        return None
    coding: dict[str, Any] = {"system": V2_0203, "code": code}
    if code in _ID_TYPES:
        coding["display"] = _ID_TYPES[code]
    return {"coding": [coding]}


def cx_identifier(
    ctx: Context, f: Field, loc: Loc, *, default_system: str | None = None, kind: str = "id"
) -> dict[str, Any] | None:
    """CX -> Identifier: CX-1 value, CX-4 authority -> system, CX-5 type, CX-7/8 period."""
    value = f.c(1)
    if not value:
        return None
    ident: dict[str, Any] = {}
    auth = authority(f, 4)
    id_type = f.c(5)
    mapped = dict(ctx.source.assigning_authorities).get(auth) if auth else None
    if mapped:
        system = mapped
    elif id_type == "SS":
        system = US_SSN
    elif default_system:
        system = default_system
    else:
        system = ctx.source.system_for(
            auth or None, kind if not id_type else f"{kind}:{id_type}" if not auth else kind
        )
    t = identifier_type(id_type)
    if t:
        ident["type"] = t
    ident["system"] = system
    ident["value"] = value
    p = period(ctx, f.c(7), f.c(8), loc)
    if p:
        ident["period"] = p
    if auth and not mapped and f.c(4, 1) and f.c(4, 1) != auth:
        ident["assigner"] = {"display": f.c(4, 1)}
    return ident


# --------------------------------------------------------------------------------------------------
# XPN / XCN names

_NAME_USE = {
    "L": "official",
    "D": "usual",
    "A": "nickname",
    "N": "nickname",
    "M": "maiden",
    "B": "old",
    "BAD": "old",
    "C": "official",
    "P": "usual",
    "R": "official",
    "S": "anonymous",
    "T": "temp",
    "U": "usual",
    "NB": "old",
    "NAV": "temp",
    "TEMP": "temp",
    "MSK": "anonymous",
    "REL": "usual",
    "I": "official",
    "K": "usual",
}


def human_name(ctx: Context, f: Field, loc: Loc, offset: int = 0) -> dict[str, Any] | None:
    """XPN (offset 0) or the name part of XCN (offset 1) -> HumanName."""
    family = f.c(1 + offset, 1)
    given = (
        [g for g in (f.c(2 + offset), *f.c(3 + offset).split(" ")) if g]
        if f.c(3 + offset)
        else ([f.c(2 + offset)] if f.c(2 + offset) else [])
    )
    name: dict[str, Any] = {}
    use_code = f.c(7 + offset) if offset == 0 else f.c(10)
    if use_code:
        use = _NAME_USE.get(use_code.upper())
        if use:
            name["use"] = use
        else:
            ctx.warn("unknown-code", f"unknown name type {use_code!r}", loc)
    if family:
        name["family"] = family
    if given:
        name["given"] = given
    prefix = f.c(5 + offset) if offset == 0 else f.c(6)
    suffix = [s for s in ((f.c(4 + offset),) if offset == 0 else (f.c(5), f.c(7))) if s]
    if offset == 0:
        suffix += [x for x in (f.c(6), f.c(14)) if x]
    if prefix:
        name["prefix"] = [prefix]
    if suffix:
        name["suffix"] = suffix
    if offset == 0:
        p = period(ctx, f.c(10, 1) or f.c(12), f.c(10, 2) or f.c(13), loc)
        if p:
            name["period"] = p
    if "family" not in name and "given" not in name:
        return None
    return name


# --------------------------------------------------------------------------------------------------
# XAD addresses

_ADDRESS_USE = {
    "H": ("home", None),
    "HP": ("home", None),
    "B": ("work", None),
    "O": ("work", None),
    "C": ("temp", None),
    "BA": ("old", None),
    "BI": ("billing", None),
    "BDL": (None, "physical"),
    "BR": (None, "physical"),
    "M": (None, "postal"),
    "P": ("home", "physical"),
    "RH": ("home", None),
    "L": ("home", None),
    "SH": (None, "postal"),
    "TM": ("temp", None),
    "V": ("temp", None),
    "F": ("old", None),
    "N": (None, "physical"),
}


def address(ctx: Context, f: Field, loc: Loc) -> dict[str, Any] | None:
    """XAD -> Address: street lines, city, state, postal code, country, district, type, period."""
    lines = [x for x in (f.c(1, 1), f.c(2)) if x]
    a: dict[str, Any] = {}
    code = f.c(7)
    if code:
        use, typ = _ADDRESS_USE.get(code.upper(), (None, None))
        if use:
            a["use"] = use
        if typ:
            a["type"] = typ
        if not use and not typ:
            ctx.warn("unknown-code", f"unknown address type {code!r}", loc)
    if lines:
        a["line"] = lines
    for comp, key in ((3, "city"), (9, "district"), (4, "state"), (5, "postalCode"), (6, "country")):
        v = f.c(comp)
        if v:
            a[key] = v
    p = period(ctx, f.c(12, 1) or f.c(13), f.c(12, 2) or f.c(14), loc)
    if p:
        a["period"] = p
    if not any(k in a for k in ("line", "city", "state", "postalCode", "country", "district")):
        return None
    text = f.c(19) if len(f.comps) >= 19 else ""
    if text:
        a["text"] = text
    return a


# --------------------------------------------------------------------------------------------------
# XTN telecom

_TELECOM_USE = {
    "PRN": "home",
    "ORN": "home",
    "WPN": "work",
    "VHN": "home",
    "ASN": "temp",
    "EMR": "home",
    "NET": None,
    "BPN": "work",
    "PRS": "mobile",
}
_TELECOM_SYSTEM = {
    "PH": "phone",
    "FX": "fax",
    "MD": "other",
    "CP": "phone",
    "BP": "pager",
    "Internet": "email",
    "X.400": "email",
    "TDD": "other",
    "TTY": "other",
    "SAT": "phone",
}


def contact_point(ctx: Context, f: Field, loc: Loc) -> dict[str, Any] | None:
    """XTN -> ContactPoint: XTN-2 use, XTN-3 equipment, XTN-4 email, XTN-5..8 number parts, or XTN-1."""
    cp: dict[str, Any] = {}
    use_code, equip = f.c(2), f.c(3)
    system = _TELECOM_SYSTEM.get(equip) or _TELECOM_SYSTEM.get(equip.upper())
    if f.c(4) or equip.lower() == "internet" or use_code == "NET":
        value = f.c(4) or f.c(1)
        system = "email"
    else:
        parts = []
        if f.c(5):
            parts.append(f"+{f.c(5).lstrip('+')}")
        if f.c(6):
            parts.append(f"({f.c(6)})")
        if f.c(7):
            local = f.c(7)
            parts.append(f"{local[:3]}-{local[3:]}" if len(local) == 7 and local.isdigit() else local)
        value = " ".join(parts) if parts else (f.c(12) or f.c(1))
        if f.c(8) and value:
            value += f" ext. {f.c(8)}"
    if not value:
        return None
    cp["system"] = system or "phone"
    cp["value"] = value
    if equip == "CP" or use_code == "PRS":
        cp["use"] = "mobile"
    elif use_code:
        use = _TELECOM_USE.get(use_code)
        if use:
            cp["use"] = use
        elif use_code not in _TELECOM_USE:
            ctx.warn("unknown-code", f"unknown telecom use {use_code!r}", loc)
    p = period(ctx, f.c(13), f.c(14), loc)
    if p:
        cp["period"] = p
    if f.c(18) and f.c(18).isdigit() and int(f.c(18)) > 0:
        cp["rank"] = int(f.c(18))
    return cp


# --------------------------------------------------------------------------------------------------
# numbers

_NUMBER = re.compile(r"^[+-]?(?:\d+\.?\d*|\.\d+)$")


def number(value: str) -> int | float | None:
    """A FHIR decimal for an HL7 NM, or ``None`` if the text is not a plain decimal number."""
    v = value.strip()
    if not v or not _NUMBER.match(v):
        return None
    if "." not in v:
        i = int(v)
        return i if abs(i) < 2**53 else None
    f = float(v)
    return f


def quantity(ctx: Context, value: int | float, unit_field: Field, loc: Loc) -> dict[str, Any]:
    """A Quantity: the value, and the unit as UCUM system + code whenever it is (or maps to) UCUM.

    ``unit`` keeps what the sender wrote (OBX-6.2, else OBX-6.1). A unit that is not UCUM keeps its own
    coding system when it names one we know (a local code under a source-scoped URN), else it stays
    text only with one ``unknown-unit`` warning per field: a code without a system is not valid R4.
    """
    q: dict[str, Any] = {"value": value}
    code, sysname, text = unit_field.c(1), unit_field.c(3), unit_field.c(2)
    if not code and not text:
        return q
    q["unit"] = text or code
    ucum_code = ucum(code, text)
    if ucum_code:
        q["system"] = ucum_units.SYSTEM
        q["code"] = ucum_code
        return q
    if code and sysname and sysname.upper() not in UNIT_SYSTEM_NAMES:
        system = code_system(ctx, sysname, loc)
        if system and system != ucum_units.SYSTEM:
            q["system"] = system
            q["code"] = code
            return q
    ctx.warn(
        "unknown-unit",
        f"unit {code or text!r} is not UCUM and not a known spelling of a UCUM unit; kept as text",
        loc,
    )
    return q
