"""FHIR R4 search queries: parsed once, located errors for bad values, then matched against resources.

:func:`parse_search` reads a query (``[(name, value), ...]``, as given) for one resource type:

* search parameters from :mod:`bridge.service.fhir.searchparams`, with the R4 prefixes (``eq ne gt lt
  ge le sa eb ap``) on dates, numbers and quantities, token ``system|code`` forms, the modifiers
  ``:exact :contains`` (string), ``:not :text :of-type`` (token), ``:missing`` (all), ``:[Type]``
  (reference), comma-separated values (OR) and repeated parameters (AND);
* the result parameters ``_count _sort _total _summary _elements _include _revinclude`` and our
  ``_cursor`` (the paging position, docs/query.md);
* anything else (an unknown or chained parameter, ``_has``) is listed in :attr:`SearchQuery.unknown`;
  with ``strict`` it is a 400 instead (``Prefer: handling=strict``).

An unknown modifier, or a value that cannot be read, is always a 400 naming the parameter: a search
the server misunderstood must not return a silently wrong answer.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from bridge.service.fhir import searchparams as sp
from bridge.service.fhir.dates import DATE, interval, now_us
from bridge.service.fhir.searchparams import SearchParam
from bridge.service.http import JSON_FORMATS, FhirHTTPError
from bridge.stores.index.rules import PATIENT_REFERENCE_PATHS, patient_of

PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap")
MODIFIERS = {
    "token": {"not", "text", "of-type", "missing"},
    "string": {"exact", "contains", "missing"},
    "date": {"missing"},
    "number": {"missing"},
    "quantity": {"missing"},
    "uri": {"below", "missing"},
    "reference": {"missing"},  # and :[Type]
}
#: result parameters (and ``_format``/``_pretty``, which change nothing the server returns)
RESULT_PARAMS = {
    "_count",
    "_sort",
    "_total",
    "_summary",
    "_elements",
    "_include",
    "_revinclude",
    "_cursor",
    "_format",
    "_pretty",
}
DEFAULT_COUNT = 50
MAX_COUNT = 1000
_US_PER_DAY = 86_400_000_000


def _bad(name: str, why: str) -> FhirHTTPError:
    return FhirHTTPError(400, "invalid", f"parameter {name}: {why}")


def fold(text: str) -> str:
    """A string search's normal form: case-folded, accents removed (FHIR string search)."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()


@dataclass(frozen=True, slots=True)
class Criterion:
    """One parameter as given: its values are ORed; the criteria of a query are ANDed."""

    name: str  # as given, modifier included
    param: SearchParam
    modifier: str | None
    values: tuple[Any, ...]

    def matches(
        self, resource: dict[str, Any], source_org: str | None, linked: dict[str, frozenset[str]]
    ) -> bool:
        p, mod = self.param, self.modifier
        if p.column == "source_org":
            found: list[Any] = [source_org] if source_org else []
        elif p.type == "token":
            found = sp.token_values(resource, p)
        elif p.type == "string":
            found = sp.string_values(resource, p)
        elif p.type == "date":
            found = sp.date_values(resource, p)
        elif p.type in ("quantity", "number"):
            found = sp.quantity_values(resource, p)
        elif p.type == "reference":
            found = _reference_values(resource, p)
        else:
            found = [v for v in sp.raw_values(resource, p) if isinstance(v, str)]
        if mod == "missing":
            return bool((not found) == self.values[0])
        if p.type == "token":
            if mod == "not":
                return not any(_token_match(q, f) for q in self.values for f in found)
            if mod == "text":  # a prefix of a text or display, or of one of its words
                texts = [fold(t) for t in sp.token_texts(resource, p)]
                return any(t.startswith(q) or f" {q}" in t for q in self.values for t in texts)
            if mod == "of-type":
                typed = sp.identifier_types(resource, p)
                return any(q == t for q in self.values for t in typed)
            return any(_token_match(q, f) for q in self.values for f in found)
        if p.type == "string":
            if mod == "exact":
                return any(q == f for q in self.values for f in found)
            folded = [fold(f) for f in found]
            if mod == "contains":
                return any(q in f for q in self.values for f in folded)
            return any(f.startswith(q) for q in self.values for f in folded)
        if p.type == "date":
            return any(_date_match(q, f) for q in self.values for f in found)
        if p.type in ("quantity", "number"):
            return any(_quantity_match(q, f) for q in self.values for f in found)
        if p.type == "reference":
            return any(_reference_match(q, f, linked) for q in self.values for f in found)
        if mod == "below":
            return any(f.startswith(q) for q in self.values for f in found)
        return any(q == f for q in self.values for f in found)


def _reference_values(resource: dict[str, Any], p: SearchParam) -> list[str]:
    refs = sp.reference_values(resource, p)
    rtype = resource.get("resourceType")
    if p.targets == ("Patient",) or (
        p.name == "subject"
        and tuple(x.split(".")[0] for x in p.paths) == PATIENT_REFERENCE_PATHS.get(str(rtype))
    ):
        owner = patient_of(resource)  # resolves the logical (identifier) references too
        if owner is not None:
            refs = [*refs, f"Patient/{owner}"]
    return [_normal_ref(r) for r in refs]


def _normal_ref(ref: str) -> str:
    """``Type/id`` of a relative reference (``Type/id/_history/v`` too); an absolute URL (another
    server's resource) or another form stays as it is, compared literally."""
    if "://" in ref or ref.startswith("urn:"):
        return ref
    parts = ref.split("/")
    if "_history" in parts:
        parts = parts[: parts.index("_history")]
    if len(parts) == 2 and parts[0][:1].isupper():
        return f"{parts[0]}/{parts[1]}"
    return ref


def _token_match(q: tuple[str | None, str | None], f: sp.Token) -> bool:
    system, code = q
    if code is not None and f[1] != code:
        return False
    if system is None:
        return True
    if system == "":
        return f[0] is None
    return f[0] == system


def _date_match(q: tuple[str, int, int], f: tuple[int, int]) -> bool:
    prefix, s_lo, s_hi = q
    t_lo, t_hi = f
    contains = s_lo <= t_lo and t_hi <= s_hi
    if prefix == "eq":
        return contains
    if prefix == "ne":
        return not contains
    if prefix == "gt":
        return t_hi > s_hi
    if prefix == "lt":
        return t_lo < s_lo
    if prefix == "ge":
        return t_hi > s_hi or contains
    if prefix == "le":
        return t_lo < s_lo or contains
    if prefix == "sa":
        return t_lo >= s_hi
    if prefix == "eb":
        return t_hi <= s_lo
    # ap: the search range widened by 10% of its distance from now (at least a day), overlapping
    width = max(abs(now_us() - s_lo) // 10, _US_PER_DAY)
    return t_lo < s_hi + width and t_hi > s_lo - width


@dataclass(frozen=True, slots=True)
class NumberValue:
    prefix: str
    value: Decimal
    lo: Decimal  # the implicit range of the value's precision
    hi: Decimal
    system: str | None = None
    code: str | None = None


def _quantity_match(q: NumberValue, f: sp.Quantity) -> bool:
    value, system, code, unit = f
    if q.code is not None and q.code not in (code, unit):
        return False
    if q.system and system != q.system:
        return False
    if q.prefix == "eq":
        return q.lo <= value < q.hi
    if q.prefix == "ne":
        return not q.lo <= value < q.hi
    if q.prefix in ("gt", "sa"):
        return value > q.value
    if q.prefix in ("lt", "eb"):
        return value < q.value
    if q.prefix == "ge":
        return value >= q.value
    if q.prefix == "le":
        return value <= q.value
    margin = abs(q.value) / 10  # ap: within 10%
    return q.value - margin <= value <= q.value + margin


def _reference_match(q: str, f: str, linked: dict[str, frozenset[str]]) -> bool:
    if q == f:
        return True
    if q.startswith("Patient/") and f.startswith("Patient/"):
        return f[8:] in linked.get(q[8:], ())
    return "/" not in q and f.endswith(f"/{q}")


@dataclass(frozen=True, slots=True)
class Include:
    source_type: str
    param: SearchParam | None  # None: every reference parameter (``*``)
    target: str | None
    raw: str


@dataclass(frozen=True, slots=True)
class SortKey:
    param: SearchParam
    descending: bool


@dataclass
class SearchQuery:
    resource_type: str
    criteria: list[Criterion] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    count: int = DEFAULT_COUNT
    sort: list[SortKey] = field(default_factory=list)
    total: str | None = None  # none | estimate | accurate
    summary: str | None = None  # true | text | data | count | false
    elements: list[str] | None = None
    include: list[Include] = field(default_factory=list)
    revinclude: list[Include] = field(default_factory=list)
    cursor: str | None = None
    #: Patient ids named by ``patient``/``subject`` criteria, mapped to the records the MPI links to
    #: each (set by the service before matching; empty: each id stands for itself)
    linked: dict[str, frozenset[str]] = field(default_factory=dict)

    def matches(self, resource: dict[str, Any], *, source_org: str | None = None) -> bool:
        """Whether ``resource`` meets every criterion."""
        return all(c.matches(resource, source_org, self.linked) for c in self.criteria)

    def patient_ids(self) -> list[str] | None:
        """The Patient ids that all of a criterion's values name, when one criterion narrows the search
        to the data of given patients (``patient=``, ``subject=Patient/..``), else None."""
        narrowed: set[str] | None = None
        for c in self.criteria:
            if c.param.type != "reference" or c.modifier not in (None, "Patient"):
                continue
            if not is_patient_param(self.resource_type, c.param):
                continue
            ids = set()
            for v in c.values:
                if not v.startswith("Patient/"):
                    break
                ids.add(v[8:])
            else:
                narrowed = ids if narrowed is None else narrowed & ids
        return None if narrowed is None else sorted(narrowed)

    def token_values(self, name: str) -> list[str] | None:
        """The codes of an unmodified token criterion ``name`` (``_id``), for the index to narrow by."""
        for c in self.criteria:
            if c.name == name and all(v[1] is not None for v in c.values):
                return [v[1] for v in c.values]
        return None


def is_patient_param(rtype: str, p: SearchParam) -> bool:
    paths = PATIENT_REFERENCE_PATHS.get(rtype)
    if rtype == "Patient" or not paths:
        return False
    return p.paths == paths and (p.name in ("patient", "subject") or p.targets == ("Patient",))


def _split(value: str) -> list[str]:
    """Comma-separated values (``\\,`` an escaped comma), their escapes kept for :func:`_split_bar` and
    :func:`_unescape`, which read them."""
    out, cur, i = [], "", 0
    while i < len(value):
        c = value[i]
        if c == "\\" and i + 1 < len(value):
            cur += value[i : i + 2]
            i += 2
            continue
        if c == ",":
            out.append(cur)
            cur = ""
        else:
            cur += c
        i += 1
    out.append(cur)
    return out


def _unescape(value: str) -> str:
    """A value with FHIR's search escapes (``\\,`` ``\\$`` ``\\|`` ``\\\\``) read."""
    out, i = "", 0
    while i < len(value):
        if value[i] == "\\" and i + 1 < len(value) and value[i + 1] in ",$|\\":
            out += value[i + 1]
            i += 2
        else:
            out += value[i]
            i += 1
    return out


def _split_bar(value: str) -> list[str]:
    parts, cur, i = [], "", 0
    while i < len(value):
        if value[i] == "\\" and i + 1 < len(value):
            cur += value[i + 1]
            i += 2
            continue
        if value[i] == "|":
            parts.append(cur)
            cur = ""
        else:
            cur += value[i]
        i += 1
    parts.append(cur)
    return parts


def _prefix(raw: str) -> tuple[str, str]:
    if len(raw) > 2 and raw[:2] in PREFIXES and not raw[:2].isdigit():
        return raw[:2], raw[2:]
    return "eq", raw


def _number(name: str, raw: str) -> tuple[Decimal, Decimal, Decimal]:
    try:
        value = Decimal(raw)
    except InvalidOperation:
        raise _bad(name, f"{raw!r} is not a number") from None
    exponent = value.as_tuple().exponent
    if (
        not value.is_finite()
        or not isinstance(exponent, int)
        or abs(value.adjusted()) > 1000
        or abs(exponent) > 1000
    ):
        raise _bad(name, f"{raw[:40]!r} is not a finite number of a sensible size")
    try:
        half = Decimal(5).scaleb(exponent - 1)
        return value, value - half, value + half
    except ArithmeticError:
        raise _bad(name, f"{raw[:40]!r} is not a finite number of a sensible size") from None


def _parse_value(name: str, p: SearchParam, modifier: str | None, raw: str, base: str) -> Any:
    if p.type not in ("token", "quantity", "number") or modifier in ("missing", "text"):
        raw = _unescape(raw)  # tokens and quantities: their parts are split and read by _split_bar
    if modifier == "missing":
        if raw not in ("true", "false"):
            raise _bad(name, f"{raw!r}: :missing takes true or false")
        return raw == "true"
    if p.type == "token":
        if modifier == "text":
            return fold(raw)
        parts = _split_bar(raw)
        if modifier == "of-type":
            if len(parts) != 3 or not all(parts):
                raise _bad(name, f"{raw!r}: :of-type takes system|code|value")
            return (parts[0], parts[1], parts[2])
        if len(parts) == 1:
            if not parts[0]:
                raise _empty(name)
            return (None, parts[0])
        if len(parts) != 2:
            raise _bad(name, f"{raw!r} is not code, system|code, |code or system|")
        system, code = parts
        if not system and not code:
            raise _bad(name, "'|' names neither a system nor a code")
        return (system, code or None)
    if p.type == "string":
        if not raw:
            raise _empty(name)
        return raw if modifier == "exact" else fold(raw)
    if p.type == "date":
        prefix, value = _prefix(raw)
        if not DATE.fullmatch(value):
            raise _bad(name, f"{raw!r} is not a FHIR date or dateTime (with an optional prefix such as ge)")
        try:
            lo, hi = interval(value)
        except ValueError as exc:
            raise _bad(name, str(exc)) from None
        return (prefix, lo, hi)
    if p.type in ("number", "quantity"):
        prefix, value = _prefix(raw)
        parts = _split_bar(value)
        if (p.type == "number" and len(parts) != 1) or len(parts) not in (1, 3):
            raise _bad(name, f"{raw!r} is not [prefix]number or [prefix]number|system|code")
        number, nlo, nhi = _number(name, parts[0])
        qsystem, qcode = (parts[1] or None, parts[2] or None) if len(parts) == 3 else (None, None)
        return NumberValue(prefix, number, nlo, nhi, qsystem, qcode)
    if p.type == "reference":
        if not raw:
            raise _empty(name)
        if modifier is not None:  # :Type
            if "/" in raw:
                raise _bad(name, f"{raw!r}: with :{modifier} give the id only")
            return f"{modifier}/{raw}"
        if base and raw.startswith(f"{base}/"):
            raw = raw[len(base) + 1 :]  # this server's absolute URL; another server's stays literal
        if "/" not in raw and len(p.targets) == 1:
            return f"{p.targets[0]}/{raw}"
        return _normal_ref(raw) if "/" in raw else raw
    if not raw:
        raise _empty(name)
    return raw


def _empty(name: str) -> FhirHTTPError:
    return _bad(name, "the value is empty")


def _int(name: str, raw: str, lo: int, hi: int) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise _bad(name, f"{raw!r} is not an integer") from None
    if not lo <= value <= hi:
        raise _bad(name, f"must be between {lo} and {hi}")
    return value


def parse_include(resource_type: str, name: str, raw: str, *, reverse: bool) -> Include:
    if raw == "*" and not reverse:
        return Include(resource_type, None, None, raw)
    parts = raw.split(":")
    if len(parts) not in (2, 3):
        raise _bad(name, f"{raw!r} is not SourceType:parameter[:TargetType]")
    source, pname = parts[0], parts[1]
    if not reverse and source != resource_type:
        raise _bad(name, f"{raw!r}: an _include names the searched type ({resource_type}) first")
    params = sp.params_of(source)
    if not params:
        raise _bad(name, f"{raw!r}: {source} is not a type this server stores")
    if pname == "*":
        return Include(source, None, parts[2] if len(parts) == 3 else None, raw)
    p = params.get(pname)
    if p is None or p.type != "reference":
        raise _bad(name, f"{raw!r}: {pname!r} is not a reference parameter of {source}")
    if source == "Provenance" and pname != "target":
        raise _bad(name, f"{raw!r}: of Provenance, only target is supported")
    if reverse and source != "Provenance" and p.targets and resource_type not in p.targets:
        raise _bad(name, f"{raw!r}: {source}.{pname} never refers to a {resource_type}")
    return Include(source, p, parts[2] if len(parts) == 3 else None, raw)


def parse_search(
    resource_type: str,
    params: Sequence[tuple[str, str]],
    *,
    strict: bool = False,
    base: str = "",
) -> SearchQuery:
    """The query ``params`` (in the order given) on ``resource_type``; see the module docstring.

    Raises :class:`FhirHTTPError` (400, naming the parameter) for a bad value or modifier, and with
    ``strict`` for an unknown parameter; an unknown type is a 404."""
    known = sp.params_of(resource_type)
    if not known:
        raise FhirHTTPError(
            404, "not-supported", f"{resource_type} is not a resource type this server searches"
        )
    q = SearchQuery(resource_type)
    seen_result: set[str] = set()
    for name, raw in params:
        if "\x00" in raw or "\x00" in name:
            raise _bad(name.replace("\x00", "?"), "the value contains a NUL character")
        if name in RESULT_PARAMS:
            if name not in ("_include", "_revinclude") and name in seen_result:
                raise _bad(name, "given more than once; give it once")
            seen_result.add(name)
            _result_param(q, name, raw, known)
            continue
        pname, _, modifier = name.partition(":")
        p = known.get(pname)
        if p is None or "." in pname:
            q.unknown.append(name)
            continue
        mod: str | None = modifier or None
        type_modifier = p.type == "reference" and mod is not None and mod[:1].isupper() and mod.isalpha()
        if mod is not None and mod not in MODIFIERS[p.type] and not type_modifier:
            raise FhirHTTPError(
                400, "not-supported", f"parameter {name}: the modifier :{mod} is not supported"
            )
        if p.column is not None and mod not in (None, "missing") and p.column == "source_org":
            raise FhirHTTPError(
                400, "not-supported", f"parameter {name}: the modifier :{mod} is not supported"
            )
        values = _split(raw) if mod != "missing" else [raw]
        q.criteria.append(Criterion(name, p, mod, tuple(_parse_value(name, p, mod, v, base) for v in values)))
    if strict and q.unknown:
        raise FhirHTTPError(
            400,
            "not-supported",
            f"search parameter {q.unknown[0]!r} is not supported for {resource_type} (Prefer: handling=strict)",
        )
    return q


def _result_param(q: SearchQuery, name: str, raw: str, known: dict[str, SearchParam]) -> None:
    if name == "_count":
        q.count = _int(name, raw, 0, MAX_COUNT)
    elif name == "_sort":
        for part in raw.split(","):
            desc = part.startswith("-")
            pname = part[1:] if desc else part
            p = known.get(pname)
            if p is None:
                raise _bad(name, f"{pname!r} is not a search parameter of {q.resource_type}")
            if p.type == "reference" and pname not in ("patient", "subject"):
                raise _bad(name, f"sorting by the reference {pname!r} is not supported")
            q.sort.append(SortKey(p, desc))
    elif name == "_total":
        if raw not in ("none", "estimate", "accurate"):
            raise _bad(name, f"{raw!r} is not none, estimate or accurate")
        q.total = raw
    elif name == "_summary":
        if raw not in ("true", "text", "data", "count", "false"):
            raise _bad(name, f"{raw!r} is not true, text, data, count or false")
        q.summary = raw
    elif name == "_elements":
        names = [e.strip() for e in raw.split(",") if e.strip()]
        if not names or not all(n.replace("[x]", "").isalnum() for n in names):
            raise _bad(name, f"{raw!r} is not a comma-separated list of element names")
        q.elements = names
    elif name in ("_include", "_revinclude"):
        q_list = q.include if name == "_include" else q.revinclude
        q_list.append(parse_include(q.resource_type, name, raw, reverse=name == "_revinclude"))
    elif name == "_cursor":
        q.cursor = raw
    elif name == "_format" and raw.strip().lower().split(";")[0].strip() not in JSON_FORMATS:
        raise FhirHTTPError(
            400, "not-supported", f"_format {raw!r} is not supported: this server returns JSON only"
        )


def reference_targets(resource: dict[str, Any], inc: Include) -> list[tuple[str, str]]:
    """``(type, id)`` of the references an ``_include`` follows from ``resource``."""
    params: Iterable[SearchParam]
    if inc.param is None:
        params = [p for p in sp.params_of(inc.source_type).values() if p.type == "reference"]
    else:
        params = [inc.param]
    out = []
    for p in params:
        for ref in sp.reference_values(resource, p):
            normal = _normal_ref(ref)
            if "/" in normal and normal.count("/") == 1:
                rtype, rid = normal.split("/")
                if inc.target is None or rtype == inc.target:
                    out.append((rtype, rid))
    return out
