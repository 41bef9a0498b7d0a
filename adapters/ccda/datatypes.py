"""CDA R2 data types (II, CD, TS/IVL_TS, PQ, AD, PN, TEL, ED) to FHIR R4 data types.

Every function takes an lxml element (or ``None``) and a :class:`Ctx`, returns FHIR JSON (or
``None`` when there is nothing usable), records a warning on the context when it had to guess, and
never raises on odd input.
"""

from __future__ import annotations

import base64
import re
from datetime import date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

from lxml import etree

from adapters.base import SourceInfo
from adapters.bundle import BundleBuilder
from adapters.ccda.xmlsecure import XSI_TYPE
from adapters.common import ucum
from adapters.common.codes import OID_TO_URI, is_oid, is_uuid, system_uri
from adapters.common.dates import date_part, hl7_ts_to_fhir
from adapters.errors import Location

El = Any  # lxml element

NULL_FLAVOR_TO_DAR = {
    "UNK": "unknown",
    "ASKU": "asked-unknown",
    "NAV": "temp-unknown",
    "NASK": "not-asked",
    "MSK": "masked",
    "NA": "not-applicable",
    "NI": "unknown",
    "OTH": "unknown",
    "NINF": "negative-infinity",
    "PINF": "positive-infinity",
    "NP": "unknown",
    "TRC": "unknown",
}


class Ctx:
    """Per-document conversion state: the bundle builder, the narrative index, the patient reference."""

    def __init__(self, builder: BundleBuilder, source: SourceInfo, root: El, filename: str | None) -> None:
        self.b = builder
        self.source = source
        self.root = root
        self.tree = root.getroottree()
        self.filename = filename
        self.patient_ref: str | None = None
        self.encounter_ref: str | None = None
        self.author_ref: str | None = None
        self.doc_key: str = ""
        self._ids: dict[str, str] | None = None

    # -- locations and warnings -------------------------------------------------------------------
    def loc(self, el: El | None) -> Location:
        if el is None:
            return Location()
        return Location(line=el.sourceline, xpath=self.tree.getpath(el))

    def warn(self, code: str, message: str, el: El | None = None) -> None:
        self.b.warn(code, message, self.loc(el))

    def key(self, el: El) -> str:
        """A business key for an element without a usable id: the document key and its XPath."""
        return f"{self.doc_key}#{self.tree.getpath(el)}"

    # -- narrative references ----------------------------------------------------------------------
    def narrative(self, ref: str | None) -> str | None:
        """The text of the narrative element with ``ID`` = ``ref`` (``#`` optional), whitespace-normalised."""
        if not ref:
            return None
        if self._ids is None:
            self._ids = {}
            for el in self.root.iterfind(".//*[@ID]"):
                txt = " ".join("".join(el.itertext()).split())
                self._ids.setdefault(el.get("ID"), txt)
        return self._ids.get(ref.lstrip("#")) or None


def text_of(el: El | None, ctx: Ctx) -> str | None:
    """Text of an ED/ST element, following a ``<reference value="#id"/>`` into the narrative."""
    if el is None:
        return None
    ref = el.find("reference")
    if ref is not None and ref.get("value"):
        t = ctx.narrative(ref.get("value"))
        if t:
            return t
    t = " ".join("".join(x for x in el.itertext()).split())
    return t or None


def first(el: El | None, *paths: str) -> El | None:
    if el is None:
        return None
    for p in paths:
        x = el.find(p)
        if x is not None:
            return x
    return None


# -- identifiers ----------------------------------------------------------------------------------
def identifier(ii: El | None, ctx: Ctx) -> dict[str, Any] | None:
    """CDA II -> Identifier. ``root`` alone becomes ``urn:oid:`` / ``urn:uuid:`` under urn:ietf:rfc:3986."""
    if ii is None or (ii.get("nullFlavor") and not ii.get("root")):
        return None
    root = (ii.get("root") or "").strip()
    ext = (ii.get("extension") or "").strip()
    if not root and not ext:
        return None
    if ext:
        system = ctx.source.system_for(root) if root else ctx.source.system_for(None, "id")
        if root and is_uuid(root):
            system = f"urn:uuid:{root.lower()}"
        elif root and not is_oid(root):
            system = ctx.source.system_for(root)
        if root in OID_TO_URI:
            system = OID_TO_URI[root]
        return {"system": system, "value": ext}
    if is_oid(root):
        return {"system": "urn:ietf:rfc:3986", "value": f"urn:oid:{root}"}
    if is_uuid(root):
        return {"system": "urn:ietf:rfc:3986", "value": f"urn:uuid:{root.lower()}"}
    return {"system": ctx.source.system_for(None, "id"), "value": root}


def identifiers(parent: El | None, ctx: Ctx, tag: str = "id") -> list[dict[str, Any]]:
    if parent is None:
        return []
    out = []
    for ii in parent.findall(tag):
        i = identifier(ii, ctx)
        if i and i not in out:
            out.append(i)
    return out


def id_key(parent: El | None) -> str | None:
    """A stable key from the first non-null ``id`` child (``root|extension``)."""
    if parent is None:
        return None
    for ii in parent.findall("id"):
        root, ext = ii.get("root"), ii.get("extension")
        if (root or ext) and not ii.get("nullFlavor"):
            return f"{root or ''}|{ext or ''}"
    return None


# -- codes ------------------------------------------------------------------------------------------
#: ISO 3166 country and subdivision codes (eICR travel and residence locations): FHIR names them by URN.
_ISO_3166 = {
    "1.0.3166.1": "urn:iso:std:iso:3166",
    "1.0.3166.1.2.2": "urn:iso:std:iso:3166",
    "1.0.3166.1.2.3": "urn:iso:std:iso:3166",
    "1.0.3166.2": "urn:iso:std:iso:3166:-2",
}


def coding(cd: El, ctx: Ctx) -> dict[str, Any] | None:
    code = (cd.get("code") or "").strip()
    if not code or cd.get("nullFlavor"):
        return None
    iso = _ISO_3166.get((cd.get("codeSystem") or "").strip())
    system, trusted = (iso, True) if iso else system_uri(cd.get("codeSystem"), cd.get("codeSystemName"))
    c: dict[str, Any] = {}
    if system:
        c["system"] = system
        if not trusted:
            ctx.warn(
                "code-system-guessed",
                f"code system {cd.get('codeSystem')!r} is not an OID; used {system} from codeSystemName",
                cd,
            )
    else:
        ctx.warn("unknown-code-system", f"code {code!r} has no usable code system", cd)
    if " " in code:
        code = "_".join(code.split())
    c["code"] = code
    disp = cd.get("displayName")
    if disp and disp.strip():
        c["display"] = " ".join(disp.split())
    return c


def concept(cd: El | None, ctx: Ctx, *, narrative_fallback: bool = True) -> dict[str, Any] | None:
    """CD/CE/CV -> CodeableConcept: the code, its translations, and originalText as text."""
    if cd is None:
        return None
    codings: list[dict[str, Any]] = []
    c = coding(cd, ctx)
    if c:
        codings.append(c)
    for tr in cd.findall("translation"):
        t = coding(tr, ctx)
        if t and t not in codings:
            codings.append(t)
    out: dict[str, Any] = {}
    if codings:
        out["coding"] = codings
    ot = cd.find("originalText")
    text = text_of(ot, ctx) if (ot is not None and narrative_fallback) else None
    if text:
        out["text"] = text
    elif not codings and cd.get("displayName"):
        out["text"] = cd.get("displayName")
    return out or None


def value_concept(el: El | None, ctx: Ctx) -> dict[str, Any] | None:
    return concept(el, ctx)


# -- time -------------------------------------------------------------------------------------------
def ts(el: El | None, ctx: Ctx) -> str | None:
    if el is None:
        return None
    v = el.get("value")
    if not v:
        return None
    out = hl7_ts_to_fhir(v, ctx.source.timezone)
    if out is None:
        ctx.warn("bad-timestamp", f"timestamp {v!r} is not a valid HL7 TS", el)
    return out


def period(el: El | None, ctx: Ctx) -> dict[str, Any] | None:
    """IVL_TS -> Period: ``low`` (else ``@value``) is the start, ``high`` the end; ``width`` gives the
    missing bound."""
    if el is None:
        return None
    p: dict[str, Any] = {}
    # Senders put the start in @value next to a high (value="20200301" + high); the start is kept.
    lo = ts(el.find("low"), ctx) or ts(el, ctx)
    hi = ts(el.find("high"), ctx)
    if lo:
        p["start"] = lo
    if hi:
        p["end"] = hi
    width = el.find("width")
    if width is not None and len(p) == 1:
        bound = "end" if lo else "start"
        shifted = _shift(p["start" if lo else "end"], width, 1 if lo else -1)
        if shifted:
            p[bound] = shifted
        else:
            ctx.warn(
                "period-width-ignored",
                f"effectiveTime width {width.get('value')!r} {width.get('unit')!r} cannot be applied to the "
                f"{'low' if lo else 'high'} bound's precision; the {bound} is left open",
                width,
            )
    if "start" in p and "end" in p and _sortable(p["end"]) < _sortable(p["start"]):
        ctx.warn("period-reversed", "effectiveTime high is before low; high dropped", el)
        del p["end"]
    return p or None


def _sortable(v: str) -> str:
    return v[:19]


_WIDTH_UNITS = {
    "s": "seconds",
    "min": "minutes",
    "h": "hours",
    "d": "days",
    "day": "days",
    "days": "days",
    "wk": "weeks",
    "week": "weeks",
    "weeks": "weeks",
}


def _shift(bound: str, width: El, sign: int) -> str | None:
    """``bound`` (a FHIR date or dateTime) moved by the IVL_TS ``width``, at the bound's precision; None
    when the width is not a whole number of a fixed-length unit, or finer than the bound (a day width on a
    year, an hour width on a date)."""
    unit = _WIDTH_UNITS.get((width.get("unit") or "").strip())
    value = decimal(width.get("value"))
    if unit is None or not isinstance(value, int):
        return None
    delta = timedelta(**{unit: value * sign})
    if len(bound) == 10:  # a date: day and week widths only
        if unit not in ("days", "weeks"):
            return None
        try:
            return (date.fromisoformat(bound) + delta).isoformat()
        except (ValueError, OverflowError):
            return None
    if "T" not in bound:  # a year or a month
        return None
    try:
        moved = datetime.fromisoformat(bound) + delta
    except (ValueError, OverflowError):
        return None
    if moved.year < 1:
        return None
    out = moved.isoformat()
    return out[:-6] + "Z" if bound.endswith("Z") and out.endswith("+00:00") else out


def effective(el: El | None, ctx: Ctx) -> tuple[str | None, dict[str, Any] | None]:
    """effectiveTime as (point, period): a point when it has ``@value`` only, else a period."""
    if el is None:
        return None, None
    if el.get("value") and el.find("low") is None and el.find("high") is None:
        return ts(el, ctx), None
    p = period(el, ctx)
    if p and list(p) == ["start"] and el.find("high") is None and el.find("low") is None:
        return p["start"], None
    return None, p


def effective_times(parent: El, ctx: Ctx) -> tuple[str | None, dict[str, Any] | None]:
    """The first IVL_TS/TS ``effectiveTime`` of ``parent`` (skipping PIVL_TS frequencies)."""
    for et in parent.findall("effectiveTime"):
        xt = et.get(XSI_TYPE) or ""
        if "PIVL" in xt or "EIVL" in xt:
            continue
        return effective(et, ctx)
    return None, None


def onset(parent: El, ctx: Ctx) -> tuple[str | None, str | None]:
    """(start, end) dateTimes from ``effectiveTime`` low/high or value."""
    et = parent.find("effectiveTime")
    if et is None:
        return None, None
    point, per = effective(et, ctx)
    if point:
        return point, None
    if per:
        return per.get("start"), per.get("end")
    return None, None


# -- quantities -------------------------------------------------------------------------------------
_DEC = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")


def decimal(v: str | None) -> float | int | None:
    if v is None:
        return None
    v = v.strip()
    if not _DEC.match(v):
        return None
    try:
        d = Decimal(v)
    except InvalidOperation:
        return None
    if d == d.to_integral_value() and "." not in v and "e" not in v.lower():
        return int(d)
    return float(d)


def quantity(pq: El | None, ctx: Ctx) -> dict[str, Any] | None:
    if pq is None:
        return None
    val = decimal(pq.get("value"))
    if val is None:
        if pq.get("value"):
            ctx.warn("bad-quantity", f"quantity value {pq.get('value')!r} is not a number", pq)
        return None
    q: dict[str, Any] = {"value": val}
    unit = " ".join((pq.get("unit") or "").split()) or None
    if unit:
        # PQ/@unit is UCUM by the CDA spec, but documents carry "mEq/L", "mcg" or "mmHg": only a unit
        # the UCUM grammar accepts (as written or as a known spelling) becomes a UCUM code
        q["unit"] = unit
        code = ucum.to_ucum(unit)
        if code:
            q.update(system=ucum.SYSTEM, code=code)
        else:
            ctx.warn(
                "unknown-unit",
                f"unit {unit!r} is not UCUM and not a known spelling of a UCUM unit; kept as text",
                pq,
            )
    return q


def value_x(val: El, ctx: Ctx, prefix: str = "value") -> dict[str, Any]:
    """An observation ``value`` element -> ``{valueX: ...}`` for Observation (empty when unusable)."""
    xt = (val.get(XSI_TYPE) or "").split(":")[-1]
    if val.get("nullFlavor") and not val.get("value") and not val.get("code") and xt not in ("IVL_PQ",):
        return _null_value(val, xt, ctx, prefix)
    if xt == "PQ":
        q = quantity(val, ctx)
        return {f"{prefix}Quantity": q} if q else {}
    if xt in ("IVL_PQ",):
        lo, hi = quantity(val.find("low"), ctx), quantity(val.find("high"), ctx)
        if lo and hi:
            return {f"{prefix}Range": {"low": lo, "high": hi}}
        if hi:
            return {
                f"{prefix}Quantity": {
                    **hi,
                    "comparator": "<=" if val.find("high").get("inclusive") != "false" else "<",
                }
            }
        if lo:
            return {
                f"{prefix}Quantity": {
                    **lo,
                    "comparator": ">=" if val.find("low").get("inclusive") != "false" else ">",
                }
            }
        return {}
    if xt in ("CD", "CE", "CV", "CO", "CS"):
        c = concept(val, ctx)
        return {f"{prefix}CodeableConcept": c} if c else {}
    if xt == "INT":
        v = decimal(val.get("value"))
        return {f"{prefix}Integer": int(v)} if isinstance(v, int) else {}
    if xt in ("REAL", "MO"):
        v = decimal(val.get("value"))
        return {f"{prefix}Quantity": {"value": v}} if v is not None else {}
    if xt == "BL":
        v = val.get("value")
        return {f"{prefix}Boolean": v == "true"} if v in ("true", "false") else {}
    if xt in ("TS", "IVL_TS"):
        t = ts(val, ctx) or (ts(val.find("low"), ctx) if val.find("low") is not None else None)
        return {f"{prefix}DateTime": t} if t else {}
    if xt == "RTO_PQ_PQ" or xt == "RTO":
        n, d = quantity(val.find("numerator"), ctx), quantity(val.find("denominator"), ctx)
        return {f"{prefix}Ratio": {"numerator": n, "denominator": d}} if n and d else {}
    t = text_of(val, ctx)
    if t:
        return {f"{prefix}String": t}
    if val.get("code") or val.get("displayName"):
        c = concept(val, ctx)
        return {f"{prefix}CodeableConcept": c} if c else {}
    return {}


def _null_value(val: El, xt: str, ctx: Ctx, prefix: str) -> dict[str, Any]:
    """A null-flavoured value that still carries the fact: a coded value's originalText (or narrative
    reference), translations or displayName, as ``concept`` keeps them for codes; a quantity sent as a
    translation outside UCUM (nullFlavor OTH, ``translation/@value`` with the unit as originalText).
    Empty when nothing is carried: the caller then says why with dataAbsentReason."""
    if xt in ("PQ", "REAL", "INT"):
        for tr in val.findall("translation"):
            v = decimal(tr.get("value"))
            if v is None:
                continue
            q: dict[str, Any] = {"value": v}
            unit = text_of(tr.find("originalText"), ctx) or " ".join((tr.get("code") or "").split())
            if unit:
                q["unit"] = unit
            return {f"{prefix}Quantity": q}
        return {}
    if xt in ("CD", "CE", "CV", "CO", "CS", ""):
        c = concept(val, ctx)
        if c:
            return {f"{prefix}CodeableConcept": c}
        if xt:
            return {}
    if xt in ("ST", "ED", ""):
        t = text_of(val, ctx)
        return {f"{prefix}String": t} if t else {}
    return {}


# -- people and places ------------------------------------------------------------------------------
_NAME_USE = {
    "L": "official",
    "C": "official",
    "P": "nickname",
    "A": "anonymous",
    "ASGN": "usual",
    "OR": "official",
}
_ADDR_USE = {
    "H": "home",
    "HP": "home",
    "HV": "home",
    "WP": "work",
    "DIR": "work",
    "PUB": "work",
    "TMP": "temp",
    "OLD": "old",
    "BAD": "old",
    "PHYS": "home",
    "PST": "home",
}
_TEL_USE = {
    "H": "home",
    "HP": "home",
    "HV": "home",
    "WP": "work",
    "DIR": "work",
    "PUB": "work",
    "MC": "mobile",
    "TMP": "temp",
    "BAD": "old",
    "EC": "home",
}


def human_names(parent: El | None, ctx: Ctx, tag: str = "name") -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if parent is None:
        return out
    for n in parent.findall(tag):
        if n.get("nullFlavor") and len(n) == 0:
            continue
        hn: dict[str, Any] = {}
        given = [" ".join(g.text.split()) for g in n.findall("given") if g.text and g.text.strip()]
        family = [" ".join(f.text.split()) for f in n.findall("family") if f.text and f.text.strip()]
        prefix = [" ".join(p.text.split()) for p in n.findall("prefix") if p.text and p.text.strip()]
        suffix = [" ".join(p.text.split()) for p in n.findall("suffix") if p.text and p.text.strip()]
        if family:
            hn["family"] = " ".join(family)
        if given:
            hn["given"] = given
        if prefix:
            hn["prefix"] = prefix
        if suffix:
            hn["suffix"] = suffix
        if not hn:
            t = " ".join("".join(n.itertext()).split())
            if t:
                hn["text"] = t
        use = _NAME_USE.get((n.get("use") or "").split(" ")[0])
        if use and hn:
            hn["use"] = use
        if hn:
            out.append(hn)
    return out


def org_name(parent: El | None) -> str | None:
    if parent is None:
        return None
    n = parent.find("name")
    if n is None:
        return None
    t = " ".join("".join(n.itertext()).split())
    return t or None


def addresses(parent: El | None, ctx: Ctx) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if parent is None:
        return out
    for a in parent.findall("addr"):
        if a.get("nullFlavor") and len(a) == 0:
            continue
        ad: dict[str, Any] = {}
        lines = [
            " ".join(x.text.split()) for x in a.findall("streetAddressLine") if x.text and x.text.strip()
        ]
        if lines:
            ad["line"] = lines
        for tag, key in (
            ("city", "city"),
            ("state", "state"),
            ("postalCode", "postalCode"),
            ("country", "country"),
            ("county", "district"),
        ):
            x = a.find(tag)
            if x is not None and x.text and x.text.strip():
                ad[key] = " ".join(x.text.split())
        if not ad:
            t = " ".join("".join(a.itertext()).split())
            if t:
                ad["text"] = t
        use = _ADDR_USE.get((a.get("use") or "").split(" ")[0])
        if use and ad:
            ad["use"] = use
        if ad:
            out.append(ad)
    return out


def telecoms(parent: El | None, ctx: Ctx) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if parent is None:
        return out
    for t in parent.findall("telecom"):
        v = (t.get("value") or "").strip()
        if not v or (t.get("nullFlavor") and not v):
            continue
        scheme, _, rest = v.partition(":")
        scheme = scheme.lower()
        system = {"tel": "phone", "mailto": "email", "fax": "fax", "http": "url", "https": "url"}.get(scheme)
        if system is None:
            system, rest = ("phone", v) if re.match(r"^[\d+()\-. ]+$", v) else ("other", v)
        if system == "url":
            rest = v
        rest = rest.strip()
        if not rest:
            continue
        cp: dict[str, Any] = {"system": system, "value": rest}
        use = _TEL_USE.get((t.get("use") or "").split(" ")[0])
        if use:
            cp["use"] = use
        if cp not in out:
            out.append(cp)
    return out


def attachment_from_ed(ed: El, ctx: Ctx) -> dict[str, Any] | None:
    """ED (``text`` of a nonXMLBody or a note) -> Attachment (base64 ``data`` or ``url``)."""
    media = ed.get("mediaType") or "text/plain"
    ref = ed.find("reference")
    if ed.get("representation") == "B64":
        raw = "".join(ed.itertext())
        data = re.sub(r"\s+", "", raw)
        try:
            base64.b64decode(data, validate=True)
        except ValueError:
            ctx.warn("bad-base64", "embedded document is not valid base64", ed)
            return None
        return {"contentType": media, "data": data}
    if ref is not None and ref.get("value") and not ref.get("value", "").startswith("#"):
        return {"contentType": media, "url": ref.get("value")}
    txt = text_of(ed, ctx)
    if txt:
        return {"contentType": "text/plain", "data": base64.b64encode(txt.encode("utf-8")).decode("ascii")}
    return None


def birth_date(el: El | None, ctx: Ctx) -> str | None:
    t = ts(el, ctx)
    return date_part(t) if t else None


def xml_text(el: El) -> str:
    return str(etree.tostring(el, encoding="unicode", with_tail=False))
