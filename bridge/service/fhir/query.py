"""FHIR read/search routes and the merged ``Patient/$everything``.

``$everything`` (docs/query.md):

* gathers every Patient linked to ``{id}`` (MPI MATCH links; possible matches are never merged into
  the view), then every resource in their compartments;
* honours ``start``/``end`` (the clinical date, per type in :mod:`bridge.stores.index.rules`), ``_since``
  (``meta.lastUpdated``), ``_type``, ``_count`` with searchset paging; any other parameter yields an
  OperationOutcome warning entry: never silently ignored;
* merges resources stating the same clinical fact (:func:`bridge.stores.index.rules.dedupe_key`) into one
  entry that lists every source;
* gives each entry its provenance (source org, source patient, bundle SHA-256, ledger leaf index);
  ``_proof=true`` adds an RFC 9162 inclusion proof per source against the latest signed checkpoint,
  which travels in ``Bundle.meta``.
"""

from __future__ import annotations

import base64
import calendar
import functools
import operator
import re
import uuid
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

import orjson
from aiohttp import web

from bridge.service.http import FhirHTTPError, fhir_response, operation_outcome
from bridge.stores.index.rules import CLINICAL_DATE_PATHS, PATIENT_REFERENCE_PATHS
from bridge.stores.index.store import IndexStore, StoredResource

PROVENANCE_EXT = "https://fhirbridge.dev/fhir/StructureDefinition/entry-provenance"
CHECKPOINT_EXT = "https://fhirbridge.dev/fhir/StructureDefinition/ledger-checkpoint"
EVERYTHING_PARAMS = {"start", "end", "_since", "_type", "_count", "_offset", "_proof", "_format"}
#: the resource types a patient's compartment can hold in the index (Provenance is never returned)
EVERYTHING_TYPES = {"Patient", "Appointment", *PATIENT_REFERENCE_PATHS, *CLINICAL_DATE_PATHS}
DEFAULT_COUNT = 100
MAX_COUNT = 1000
#: a FHIR date/dateTime search value at any precision (ASCII digits only; matched whole)
_DATE = re.compile(
    r"(\d{4})(?:-(\d{2})(?:-(\d{2})(?:T(\d{2}):(\d{2})(?::(\d{2})(?:\.(\d+))?)?(Z|[+-]\d{2}:\d{2})?)?)?)?",
    re.ASCII,
)


@dataclass(frozen=True, slots=True)
class EverythingParams:
    start: str | None
    end: str | None
    since: str | None
    types: list[str] | None
    count: int
    offset: int
    proof: bool
    base: str


@dataclass
class MergedEntry:
    resource: StoredResource
    duplicates: list[StoredResource] = field(default_factory=list)

    @property
    def keys(self) -> list[tuple[str, str]]:
        return [(r.resource_type, r.id) for r in (self.resource, *self.duplicates)]


#: ``_format`` values meaning JSON (the only format served)
JSON_FORMATS = {"json", "application/json", "application/fhir+json"}


def check_query(request: web.Request, known: set[str]) -> None:
    """400 for a known parameter given twice (which copy would apply is not obvious, and the paging
    links must repeat the query exactly) and for a ``_format`` other than JSON."""
    for name in known:
        values = request.query.getall(name, [])
        if len(values) > 1:
            raise FhirHTTPError(
                400, "invalid", f"parameter {name} is given {len(values)} times; give it once"
            )
    fmt = request.query.get("_format")
    if fmt is not None and fmt.strip().lower().split(";")[0].strip() not in JSON_FORMATS:
        raise FhirHTTPError(
            400, "not-supported", f"_format {fmt!r} is not supported: this server returns JSON only"
        )


def check_no_nul(request: web.Request, names: set[str]) -> None:
    """400 naming the parameter for a value of one of ``names`` holding a NUL character: no FHIR value
    holds one, and PostgreSQL text cannot (the store would fail with a 500 there, not on SQLite)."""
    for name in sorted(names):
        if any("\x00" in v for v in request.query.getall(name, [])):
            raise FhirHTTPError(400, "invalid", f"parameter {name}: the value contains a NUL character")


def utc_millis(value: str) -> str:
    """A FHIR date/dateTime parameter as the index's stored instant form (UTC, milliseconds, ``Z``): the
    first instant it denotes, rounded up to the millisecond (the stored ``meta.lastUpdated`` values are
    whole milliseconds), so that string comparison with them is exact. Clamped to years 0001-9999."""
    lo = -(-_interval(value)[0] // 1000) * 1000
    return _as_datetime(lo).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _date_param(request: web.Request, name: str) -> str | None:
    value = request.query.get(name)
    if value is None:
        return None
    if not _DATE.fullmatch(value):
        raise FhirHTTPError(400, "invalid", f"parameter {name}: {value!r} is not a FHIR date or dateTime")
    try:
        _interval(value)
    except ValueError:
        raise FhirHTTPError(400, "invalid", f"parameter {name}: {value!r} is not a valid date") from None
    return value


def _int_param(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise FhirHTTPError(400, "invalid", f"parameter {name}: {raw!r} is not an integer") from None
    if not lo <= value <= hi:
        raise FhirHTTPError(400, "invalid", f"parameter {name} must be between {lo} and {hi}")
    return value


_US_PER_DAY = 86_400_000_000
#: the first and last microsecond a datetime can hold, as microseconds since day 0 of the proleptic calendar
_MIN_US = date.min.toordinal() * _US_PER_DAY
_MAX_US = (date.max.toordinal() + 1) * _US_PER_DAY - 1


@functools.lru_cache(
    maxsize=4096
)  # in_range asks for the same bounds (and most stored dates) once per resource
def _interval(value: str) -> tuple[int, int]:
    """The half-open UTC interval a FHIR date/dateTime denotes, in microseconds since day 0 of the
    proleptic Gregorian calendar (integers: an interval at the ends of years 0001-9999, or moved there
    by an offset, never overflows).

    The precision given sets the width (FHIR search): a year, a month, a day, a minute
    (``T08:00Z``: 08:00:00 to 08:00:59.999999), a second, or the fraction of a second written (``.5``:
    a tenth; below a microsecond, the microsecond it falls in). Values without an offset are taken as
    UTC. Raises ValueError for a malformed value.
    """
    m = _DATE.fullmatch(value)
    if m is None:
        raise ValueError(f"not a FHIR date or dateTime: {value!r}")
    year_s, month_s, day_s, hour_s, minute_s, second_s, frac, tz = m.groups()
    year, month = int(year_s), int(month_s or 1)
    first = date(year, month, int(day_s or 1))  # ValueError for year 0, month 13, day 30 of February
    day0 = first.toordinal()
    if month_s is None:
        return day0 * _US_PER_DAY, (day0 + (366 if calendar.isleap(year) else 365)) * _US_PER_DAY
    if day_s is None:
        return day0 * _US_PER_DAY, (day0 + calendar.monthrange(year, month)[1]) * _US_PER_DAY
    if hour_s is None:
        return day0 * _US_PER_DAY, (day0 + 1) * _US_PER_DAY
    hour, minute, second = int(hour_s), int(minute_s), int(second_s or 0)
    if hour > 23 or minute > 59 or second > 59:
        raise ValueError(f"not a valid time: {value!r}")
    offset = 0
    if tz and tz != "Z":
        oh, om = int(tz[1:3]), int(tz[4:6])
        if oh > 23 or om > 59:
            raise ValueError(f"not a valid offset: {value!r}")
        offset = (1 if tz[0] == "+" else -1) * (oh * 60 + om) * 60_000_000
    if second_s is None:
        width = 60_000_000
    elif frac is None:
        width = 1_000_000
    else:
        width = 10 ** max(0, 6 - len(frac))
    lo = (
        day0 * _US_PER_DAY
        + ((hour * 60 + minute) * 60 + second) * 1_000_000
        + int(frac[:6].ljust(6, "0") if frac else 0)
    )
    return lo - offset, lo - offset + width


def _as_datetime(us: int) -> datetime:
    """Microseconds from :func:`_interval` as an aware UTC datetime, clamped to datetime.min/max."""
    return datetime.min.replace(tzinfo=UTC) + timedelta(microseconds=min(max(us, _MIN_US), _MAX_US) - _MIN_US)


def date_range(value: str) -> tuple[datetime, datetime]:
    """The half-open UTC interval a FHIR date/dateTime denotes, at the precision given (see
    :func:`_interval`), clamped to datetime.min/max in UTC (``9999-12-31`` ends at datetime.max).

    Values without an offset are taken as UTC. Raises ValueError for a malformed value.
    """
    lo, hi = _interval(value)
    return _as_datetime(lo), _as_datetime(hi)


def _stored_interval(value: str) -> tuple[int, int]:
    """:func:`_interval` of a stored clinical date; one Python's ISO parser reads but FHIR's grammar
    does not (``2026-01-10 08:00:00+0100``) is taken as the second it names, as before."""
    try:
        return _interval(value)
    except ValueError:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))  # ValueError: no date at all
    offset = dt.utcoffset() or timedelta(0)
    naive = dt.replace(tzinfo=None)
    lo = (
        naive.toordinal() * _US_PER_DAY
        + ((naive.hour * 60 + naive.minute) * 60 + naive.second) * 1_000_000
        + naive.microsecond
        - offset // timedelta(microseconds=1)
    )
    return lo, lo + 1_000_000


def in_range(clinical: str | None, start: str | None, end: str | None) -> bool:
    """Whether a clinical date overlaps [start, end], each taken at its own precision (FHIR search semantics).

    A resource without a clinical date never matches a date filter. Dates at the ends of the calendar
    (``9999-12-31``, ``0001-01-01T00:00:00+01:00``) compare like any other: nothing overflows.
    """
    if start is None and end is None:
        return True
    if not clinical:
        return False
    try:
        lo, hi = _stored_interval(clinical)
    except ValueError:
        return False
    if start is not None and hi <= _interval(start)[0]:
        return False
    return not (end is not None and lo >= _interval(end)[1])


#: the order in which copies of a fact compete to lead its entry (the earliest received first)
_RECEIVED_ORDER = operator.attrgetter("last_updated", "resource_type", "id")


def merge_duplicates(resources: list[StoredResource]) -> list[MergedEntry]:
    """One entry per clinical fact; the earliest-received copy leads (stable for a given index)."""
    merged: list[MergedEntry] = []
    by_key: dict[str, MergedEntry] = {}
    for r in sorted(resources, key=_RECEIVED_ORDER):
        if r.dedupe_key is not None:
            existing = by_key.get(r.dedupe_key)
            if existing is not None:
                existing.duplicates.append(r)
                continue
        entry = MergedEntry(r)
        merged.append(entry)
        if r.dedupe_key is not None:
            by_key[r.dedupe_key] = entry
    merged.sort(
        key=lambda m: (
            m.resource.resource_type != "Patient",
            m.resource.clinical_date or "",
            m.resource.resource_type,
            m.resource.id,
        )
    )
    return merged


def everything(backend: Any, patient_id: str, params: EverythingParams) -> dict[str, Any]:
    """Compute a page of ``$everything`` (runs in the DB thread pool)."""
    index = backend.index()
    if index.get("Patient", patient_id) is None:
        raise FhirHTTPError(404, "not-found", f"Patient/{patient_id} is not known")
    mpi = backend.mpi()
    linked = mpi.linked_patient_ids(patient_id) if mpi is not None else index.identifier_linked(patient_id)
    if patient_id not in linked:
        linked = [patient_id, *linked]
    # ``types == []``: ``_type`` held only empty values (``_type=,``), which match nothing (with a warning)
    resources = (
        []
        if params.types == []
        else index.resources_for_patients(linked, types=params.types, since=params.since)
    )
    start, end = params.start, params.end
    if start or end:
        resources = [
            r for r in resources if r.resource_type == "Patient" or in_range(r.clinical_date, start, end)
        ]
    resources = [r for r in resources if r.resource_type != "Provenance"]
    merged = merge_duplicates(resources)
    total = len(merged)
    page = merged[params.offset : params.offset + params.count]
    # the page's own resources, whoever the delivering bundles named as their subject
    sources = index.sources_for_page(linked, [r for m in page for r in (m.resource, *m.duplicates)])
    ledger = backend.ledger()
    checkpoint = _checkpoint(ledger) if (ledger is not None and params.proof) else None
    leaf_cache: dict[tuple[str, str], int | None] = {}
    if ledger is not None:  # every source bundle of the page looked up at once, not one query each
        # (``sources`` holds the page's resources and their duplicates only)
        idents = {(s["bundle_sha256"], s["source_org"]) for found_for in sources.values() for s in found_for}
        found = ledger.find_many(sorted(idents))
        leaf_cache.update({ident: found.get(ident) for ident in idents})
    ext_cache: dict[
        tuple[str, str, str | None], dict[str, Any]
    ] = {}  # one extension object per source bundle
    entries = []
    # with _proof=true and a checkpoint: the page's entries with a source that gets no inclusion proof,
    # because its bundle was logged after the checkpoint ("pending") or is not in the ledger ("unlogged")
    unproven = {"pending": 0, "unlogged": 0}
    for m in page:
        reasons: set[str] = set()
        body = orjson.Fragment(m.resource.body)  # stored JSON is spliced in as is: no parse, no re-serialise
        exts = []
        seen: set[tuple[str, str]] = set()
        for key in m.keys:
            for src in sources.get(key, []):
                ident = (src["bundle_sha256"], src["source_org"])
                if ident in seen:
                    continue
                seen.add(ident)
                ckey = (src["bundle_sha256"], src["source_org"], src.get("source_patient"))
                ext = ext_cache.get(ckey)
                if ext is None:
                    ext = ext_cache[ckey] = _provenance_ext(src, ledger, leaf_cache, checkpoint)
                exts.append(ext)
                if checkpoint is not None:
                    leaf = leaf_cache.get(ident)
                    if leaf is None:
                        reasons.add("unlogged")
                    elif leaf >= checkpoint["size"]:
                        reasons.add("pending")
        for reason in reasons:
            unproven[reason] += 1
        entry: dict[str, Any] = {
            "fullUrl": f"{params.base}/{m.resource.resource_type}/{m.resource.id}",
            "resource": body,
            "search": {"mode": "match"},
        }
        if exts:
            entry["extension"] = exts
        entries.append(entry)
    return {
        "entries": entries,
        "total": total,
        "linked": linked,
        "checkpoint": checkpoint,
        "unproven": unproven,
    }


def _checkpoint(ledger: Any) -> dict[str, Any] | None:
    note = ledger.latest_checkpoint()
    if not note:
        return None
    lines = note.split("\n")
    return {"note": note, "size": int(lines[1])}


def _provenance_ext(
    src: dict[str, Any],
    ledger: Any,
    cache: dict[tuple[str, str], int | None],
    checkpoint: dict[str, Any] | None,
) -> dict[str, Any]:
    sub: list[dict[str, Any]] = [
        {"url": "sourceOrg", "valueString": src["source_org"]},
        {"url": "bundleSha256", "valueString": src["bundle_sha256"]},
        {"url": "receivedAt", "valueInstant": src["received_at"]},
    ]
    if src.get("source_patient"):
        sub.insert(1, {"url": "sourcePatient", "valueString": src["source_patient"]})
    if ledger is not None:
        key = (src["bundle_sha256"], src["source_org"])
        if key not in cache:
            cache[key] = ledger.find(*key)
        index = cache[key]
        if index is not None:
            sub.append({"url": "ledgerIndex", "valueInteger": index})
            if checkpoint is not None and index < checkpoint["size"]:
                from ledger.merkle import leaf_hash

                leaf = ledger.entry(index).canonical()
                proof = ledger.inclusion_proof(index, checkpoint["size"])
                sub += [
                    {"url": "ledgerEntry", "valueBase64Binary": base64.b64encode(leaf).decode()},
                    {"url": "leafHash", "valueBase64Binary": base64.b64encode(leaf_hash(leaf)).decode()},
                    {"url": "treeSize", "valueInteger": checkpoint["size"]},
                    *({"url": "proofHash", "valueBase64Binary": base64.b64encode(h).decode()} for h in proof),
                ]
    return {"url": PROVENANCE_EXT, "extension": sub}


async def patient_everything(request: web.Request) -> web.Response:
    from bridge.service.app import backend_of, base_url

    pid = request.match_info["id"]
    if "\x00" in pid:  # never a known id (answered here: PostgreSQL cannot even compare it)
        raise FhirHTTPError(
            404, "not-found", f"Patient/{pid!r} is not known: an id never contains a NUL character"
        )
    check_query(request, EVERYTHING_PARAMS)
    check_no_nul(request, EVERYTHING_PARAMS)
    warnings = [
        operation_outcome(
            "warning", "not-supported", f"parameter {name!r} is not supported by $everything and was ignored"
        )
        for name in dict.fromkeys(request.query)
        if name not in EVERYTHING_PARAMS
    ]
    types_raw = request.query.get("_type")
    types = (
        list(dict.fromkeys(t.strip() for t in types_raw.split(",") if t.strip()))
        if types_raw is not None
        else None
    )
    if types == []:  # ``_type=`` or ``_type=,``: like an unknown type, it matches nothing, and is said so
        warnings.append(
            operation_outcome(
                "warning", "not-supported", f"_type {types_raw!r} names no resource type: it matches nothing"
            )
        )
    for t in types or ():
        if t not in EVERYTHING_TYPES:
            warnings.append(
                operation_outcome(
                    "warning",
                    "not-supported",
                    f"_type {t!r} is not a resource type $everything returns: it matches nothing",
                )
            )
    proof_raw = request.query.get("_proof", "false").strip().lower()
    if proof_raw not in ("true", "false"):
        raise FhirHTTPError(
            400, "invalid", f"parameter _proof: {request.query['_proof']!r} is not true or false"
        )
    since = _date_param(request, "_since")
    params = EverythingParams(
        start=_date_param(request, "start"),
        end=_date_param(request, "end"),
        since=utc_millis(since) if since else None,
        types=types,
        count=_int_param(request, "_count", DEFAULT_COUNT, 1, MAX_COUNT),
        offset=_int_param(request, "_offset", 0, 0, 10**9),
        proof=proof_raw == "true",
        base=base_url(request),
    )
    backend = backend_of(request)
    result = await backend.run(everything, backend, pid, params)
    if params.proof and result["checkpoint"] is None:
        why = (
            "no ledger is configured" if not backend.has_ledger else "the ledger has no signed checkpoint yet"
        )
        warnings.append(
            operation_outcome("warning", "incomplete", f"_proof=true: {why}, so no proofs are included")
        )
    elif params.proof:
        size = result["checkpoint"]["size"]
        for reason, why in (
            (
                "pending",
                f"a source bundle logged after the latest checkpoint (tree size {size}): retry after the next checkpoint",
            ),
            ("unlogged", "a source bundle that is not in the ledger"),
        ):
            n = result["unproven"][reason]
            if n:
                warnings.append(
                    operation_outcome(
                        "warning",
                        "incomplete",
                        f"_proof=true: {n} {'entry' if n == 1 else 'entries'} on this page carr{'ies' if n == 1 else 'y'} "
                        f"no inclusion proof for {why}",
                    )
                )
    self_url = f"{params.base}/Patient/{pid}/$everything"
    query = [(k, v) for k, v in request.query.items() if k != "_offset"]  # the query exactly as given
    links = [{"relation": "self", "url": f"{self_url}?{urlencode([*query, ('_offset', params.offset)])}"}]
    if params.offset + params.count < result["total"]:
        links.append(
            {
                "relation": "next",
                "url": f"{self_url}?{urlencode([*query, ('_offset', params.offset + params.count)])}",
            }
        )
    if params.offset > 0:
        prev = max(0, params.offset - params.count)
        links.append({"relation": "previous", "url": f"{self_url}?{urlencode([*query, ('_offset', prev)])}"})
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "type": "searchset",
        "total": result["total"],
        "link": links,
        "entry": result["entries"] + [{"resource": w, "search": {"mode": "outcome"}} for w in warnings],
    }
    if result["checkpoint"] is not None:
        bundle["meta"] = {"extension": [{"url": CHECKPOINT_EXT, "valueString": result["checkpoint"]["note"]}]}
    return fhir_response(bundle)


SEARCH_LIMIT = 200  # Patient search returns no more entries than this, and says so (no paging yet)


def _search_patients(
    backend: Any, identifier: str | None, name: str | None, birthdate: str | None
) -> tuple[list[dict[str, Any]], int]:
    """The first ``SEARCH_LIMIT`` matching Patients, and the number of matches."""
    index: IndexStore = backend.index()
    if identifier:
        system, sep, value = identifier.partition("|")
        ids = index.patients_by_identifier(system if sep else None, value if sep else identifier)
        patients = [p for p in (index.get("Patient", i) for i in ids) if p is not None]
        found = [p for p in patients if _matches(p, name, birthdate)]
        return found[:SEARCH_LIMIT], len(found)
    return index.search_patients(
        name=name, birthdate=birthdate, limit=SEARCH_LIMIT, match=lambda p: _matches(p, name, birthdate)
    )


def _matches(patient: dict[str, Any], name: str | None, birthdate: str | None) -> bool:
    if name:
        needle = name.casefold()
        if not any(needle in s.casefold() for s in _name_strings(patient)):
            return False
    return not birthdate or str(patient.get("birthDate", "")).startswith(birthdate)


def _name_strings(patient: dict[str, Any]) -> list[str]:
    out = []
    for n in patient.get("name") or ():
        out += [n.get("family", ""), *n.get("given", []), n.get("text", "")]
    return [s for s in out if s]


async def patient_search(request: web.Request) -> web.Response:
    from bridge.service.app import backend_of, base_url

    supported = {"identifier", "name", "birthdate", "_format"}
    check_query(request, supported)
    check_no_nul(request, supported)
    identifier = request.query.get("identifier")
    name = request.query.get("name")
    birthdate = _date_param(request, "birthdate")
    if not (identifier or name or birthdate):
        raise FhirHTTPError(400, "required", "give at least one of identifier, name, birthdate")
    backend = backend_of(request)
    patients, total = await backend.run(_search_patients, backend, identifier, name, birthdate)
    base = base_url(request)
    entries: list[dict[str, Any]] = [
        {"fullUrl": f"{base}/Patient/{p['id']}", "resource": p, "search": {"mode": "match"}} for p in patients
    ]
    entries += [
        {
            "resource": operation_outcome(
                "warning", "not-supported", f"search parameter {k!r} is not supported and was ignored"
            ),
            "search": {"mode": "outcome"},
        }
        for k in dict.fromkeys(request.query)
        if k not in supported
    ]
    if total > len(patients):
        entries.append(
            {
                "resource": operation_outcome(
                    "warning",
                    "too-costly",
                    f"{total} patients match; only the first {len(patients)} are returned (this search has no paging): "
                    "narrow it with more parameters",
                ),
                "search": {"mode": "outcome"},
            }
        )
    return fhir_response(
        {
            "resourceType": "Bundle",
            "id": str(uuid.uuid4()),
            "type": "searchset",
            "total": total,
            "link": [{"relation": "self", "url": str(request.url)}],
            "entry": entries,
        }
    )


async def read_resource(request: web.Request) -> web.Response:
    from bridge.service.app import backend_of

    rtype, rid = request.match_info["type"], request.match_info["id"]
    backend = backend_of(request)
    resource = await backend.run(lambda: backend.index().get(rtype, rid))
    if resource is None:
        raise FhirHTTPError(404, "not-found", f"{rtype}/{rid} is not known")
    return fhir_response(resource)


def setup_query_routes(app: web.Application) -> None:
    app.router.add_get("/Patient", patient_search)
    app.router.add_get(r"/Patient/{id}/$everything", patient_everything)
    app.router.add_get(r"/{type:[A-Z][A-Za-z]+}/{id:[A-Za-z0-9\-\.]{1,64}}", read_resource)
