"""``GET /{type}`` and ``POST /{type}/_search``: FHIR R4 search on every stored type (docs/query.md).

How a search runs (in the DB thread pool):

1. The query is parsed (:mod:`bridge.service.fhir.query`): bad values and modifiers are 400s naming
   the parameter; unknown parameters are ignored with a warning entry, or refused with
   ``Prefer: handling=strict``.
2. It is pinned to a snapshot: the index's insertion high-water mark, taken at the first page and
   carried in every paging link (``_cursor``), so that pages read while data is being ingested neither
   skip nor repeat an entry: what was stored after the first page is not in the result.
3. The index narrows the candidates by type, patient (``patient=``/``subject=Patient/..``: every
   record the MPI links to that patient by MATCH), ``_id``, ``_source`` and, for Patient, identifier;
   each candidate is then matched exactly against every criterion, the token's scopes, its patient
   compartment and the patients' Consents (withheld entries are counted in an OperationOutcome).
4. ``patient=`` searches merge the copies of one clinical fact the way ``$everything`` does.
5. Up to :data:`CANDIDATE_LIMIT` candidates are sorted in memory by any ``_sort``; larger candidate
   sets are read in index order (``_id`` or ``_lastUpdated``) page by page, and other sorts are refused
   as too costly (narrow the search).
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import parse_qsl, urlencode

import orjson
from aiohttp import web
from fhir.resources.R4B import get_fhir_model_class

from bridge.metrics import CONSENT_WITHHELD
from bridge.service.audit.middleware import note
from bridge.service.auth.marks import PATH_TYPE, needs
from bridge.service.auth.middleware import access_of
from bridge.service.auth.policy import Access
from bridge.service.consent.enforce import ConsentCheck, ConsentGate, consent_check, suppressed_outcome
from bridge.service.context import SETTINGS, Backend, base_url, stores
from bridge.service.fhir import searchparams as sp
from bridge.service.fhir.everything import merge_duplicates
from bridge.service.fhir.paging import Cursor
from bridge.service.fhir.query import (
    SearchQuery,
    SortKey,
    fold,
    is_patient_param,
    parse_search,
    reference_targets,
)
from bridge.service.http import FhirHTTPError, fhir_response, operation_outcome, read_body
from bridge.stores.index.store import StoredResource

routes = web.RouteTableDef()

#: candidate sets up to this size are matched, merged and sorted in memory; larger ones are read page
#: by page in index order
CANDIDATE_LIMIT = 20_000
#: rows read per step of a page-by-page scan
SCAN_CHUNK = 500
#: types with a search of their own elsewhere (``/Consent``, ``/AuditEvent``), or not searchable
#: (Provenance: ``_revinclude=Provenance:target`` only)
NOT_SEARCHED = frozenset({"Consent", "Provenance"})
SUBSETTED = {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "SUBSETTED"}
REDACTED = {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "REDACTED"}


def search_types() -> list[str]:
    return [t for t in sp.searchable_types() if t not in NOT_SEARCHED]


# -- the cursor ----------------------------------------------------------------------------------


# -- sorting ---------------------------------------------------------------------------------------


def _sort_value(resource: dict[str, Any], stored: StoredResource, key: SortKey) -> Any:
    p = key.param
    if p.name == "_id":
        return stored.id
    if p.name == "_lastUpdated":
        return stored.last_updated
    if p.name == "_source":
        return stored.source_org
    values: list[Any]
    if p.type == "date":
        spans = sp.date_values(resource, p)
        if not spans:
            return None
        return max(s[1] for s in spans) if key.descending else min(s[0] for s in spans)
    if p.type == "string":
        values = [fold(v) for v in sp.string_values(resource, p)]
    elif p.type == "token":
        values = [t[1] for t in sp.token_values(resource, p) if t[1] is not None]
    elif p.type in ("quantity", "number"):
        values = [float(q[0]) for q in sp.quantity_values(resource, p)]
    elif p.type == "reference":
        values = sp.reference_values(resource, p)
    else:
        values = [v for v in sp.raw_values(resource, p) if isinstance(v, str)]
    if not values:
        return None
    return max(values) if key.descending else min(values)


def _compare(a: list[Any], b: list[Any], descending: list[bool]) -> int:
    """Sort keys compared: each component in its direction, a missing value last; the last two
    components (type and id) ascending, so that every key is unique."""
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if x == y:
            continue
        if x is None:
            return 1
        if y is None:
            return -1
        if type(x) is not type(y):  # never for one parameter; a stale cursor at worst
            x, y = str(x), str(y)
        r = int(x > y) - int(x < y)
        return -r if i < len(descending) and descending[i] else r
    return 0


@dataclass
class Candidate:
    stored: StoredResource
    resource: dict[str, Any]
    key: list[Any] = field(default_factory=list)
    duplicates: list[StoredResource] = field(default_factory=list)


# -- the search ------------------------------------------------------------------------------------


@dataclass
class SearchRequest:
    query: SearchQuery
    base: str
    access: Access | None
    consent: ConsentCheck | None
    cursor: Cursor | None


@dataclass
class SearchResult:
    matches: list[Candidate]
    total: int | None
    hwm: int
    next_key: list[Any] | None
    prev_key: list[Any] | None
    included: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    withheld: int = 0
    touched: dict[str, dict[str, int]] = field(default_factory=dict)


class _Admission:
    """Whether a stored resource may be returned to this requester: the token's types, compartment and
    narrowing, then the Consents of its patient's MPI person (one gate per person)."""

    def __init__(self, backend: Backend, req: SearchRequest) -> None:
        self.backend = backend
        self.access = req.access
        self.consent = req.consent
        self.mpi = backend.mpi()
        self.gates: dict[str, ConsentGate] = {}
        self.linked_cache: dict[str, list[str]] = {}

    def linked(self, pid: str) -> list[str]:
        found = self.linked_cache.get(pid)
        if found is None:
            # the MPI's MATCH links; without an MPI, shared identifiers (as $everything links them)
            mpi, index = self.mpi, self.backend.index()
            found = mpi.linked_patient_ids(pid) if mpi is not None else index.identifier_linked(pid)
            if pid not in found:
                found = [pid, *found]
            for other in found:
                self.linked_cache.setdefault(other, found)
        return found

    def token_allows(self, stored: StoredResource, resource: dict[str, Any], interaction: str = "r") -> bool:
        """The token's grant of ``interaction`` (``s`` for a search's matches, ``r`` for what it includes)."""
        access = self.access
        if access is None:
            return True
        allowed, limited = access.grant(stored.resource_type, interaction)
        if not allowed:
            return False
        if limited:
            owner = stored.id if stored.resource_type == "Patient" else stored.patient_id
            if owner is None or owner not in (access.compartment or ()):
                return False
        return not access.narrowed(stored.resource_type, interaction) or access.permits(resource, interaction)

    def consent_allows(self, stored: StoredResource, resource: dict[str, Any]) -> bool:
        if self.consent is None:
            return True
        owner = stored.id if stored.resource_type == "Patient" else stored.patient_id
        if owner is None:
            return True  # not a patient's data (an Organization, a Practitioner): no Consent applies
        linked = self.linked(owner)
        gate = self.gates.get(linked[0])
        if gate is None:
            gate = self.consent.gate(self.backend, linked)
            for pid in linked:
                self.gates[pid] = gate
        if stored.resource_type == "Patient":
            return gate.admits_resource(resource, stored.source_org)
        return gate.admits(stored)

    def withheld(self) -> int:
        return sum(g.withheld for g in {id(g): g for g in self.gates.values()}.values())


def run_search(backend: Backend, req: SearchRequest) -> SearchResult:
    """One page of a search (runs in the DB thread pool)."""
    q = req.query
    index = backend.index()
    hwm = req.cursor.hwm if req.cursor is not None else index.high_water_mark()
    admission = _Admission(backend, req)
    patient_ids = q.patient_ids()
    narrow_patients: list[str] | None = None
    if patient_ids is not None:
        q.linked = {pid: frozenset(admission.linked(pid)) for pid in patient_ids}
        narrow_patients = sorted({x for ids in q.linked.values() for x in ids})
    ids = q.token_values("_id")
    if q.resource_type == "Patient":
        # the identifier table holds identifiers with a system: only criteria whose every value names
        # a system and a value narrow by it (the others are matched on the candidates)
        for crit in q.criteria:
            if crit.name == "identifier" and all(v[0] and v[1] for v in crit.values):
                found: set[str] = set()
                for system, code in crit.values:
                    found.update(index.patients_by_identifier(system, code))
                ids = sorted(found if ids is None else found & set(ids))
    access = req.access
    if access is not None:
        allowed, limited = access.grant(q.resource_type, "s")
        if not allowed:
            return SearchResult([], 0, hwm, None, None)
        if limited:
            compartment = sorted(access.compartment or ())
            if q.resource_type == "Patient":
                ids = compartment if ids is None else sorted(set(ids) & set(compartment))
            else:
                narrow_patients = (
                    compartment
                    if narrow_patients is None
                    else sorted(set(narrow_patients) & set(compartment))
                )
    sources = next(
        (
            [v for v in c.values if isinstance(v, str)]
            for c in q.criteria
            if c.param.column == "source_org" and c.modifier is None
        ),
        None,
    )
    narrowing: dict[str, Any] = {"patient_ids": narrow_patients, "ids": ids, "source_orgs": sources}
    # in no order: enough to tell a candidate set sorted in memory from one to read page by page
    first = index.scan(q.resource_type, max_seq=hwm, order=None, limit=CANDIDATE_LIMIT + 1, **narrowing)
    descending = [k.descending for k in q.sort]

    def admit(stored: StoredResource) -> Candidate | None:
        resource = orjson.loads(stored.body)
        if not q.matches(resource, source_org=stored.source_org):
            return None
        if not admission.token_allows(stored, resource, "s") or not admission.consent_allows(
            stored, resource
        ):
            return None
        return Candidate(stored, resource)

    if len(first) <= CANDIDATE_LIMIT:
        found_c = [c for c in map(admit, first) if c is not None]
        if patient_ids is not None and q.resource_type != "Patient":
            found_c = _merged(found_c)
        for c in found_c:
            c.key = [
                *(_sort_value(c.resource, c.stored, k) for k in q.sort),
                c.stored.resource_type,
                c.stored.id,
            ]
        found_c.sort(key=functools.cmp_to_key(lambda a, b: _compare(a.key, b.key, descending)))
        page, next_key, prev_key = _window(found_c, req.cursor, q.count, descending)
        total: int | None = len(found_c)
    else:
        if patient_ids is not None:
            raise FhirHTTPError(
                400,
                "too-costly",
                f"this patient has more than {CANDIDATE_LIMIT} {q.resource_type} resources: narrow the search "
                "(a code, a date range)",
            )
        page, next_key, prev_key, total = _scan_pages(index, q, req.cursor, hwm, narrowing, admit)
    result = SearchResult(page, total, hwm, next_key, prev_key)
    included, result.warnings = _includes(backend, q, page, admission, hwm)
    result.included = [inc.resource for inc in included]
    result.withheld = admission.withheld()
    touched: dict[str, dict[str, int]] = {}
    for released in [*page, *included]:  # what the answer releases, included resources too
        kind = released.stored.resource_type
        owner = released.stored.id if kind == "Patient" else released.stored.patient_id
        if owner is not None:
            counts = touched.setdefault(owner, {})
            counts[kind] = counts.get(kind, 0) + 1
    result.touched = touched
    return result


def _merged(found: list[Candidate]) -> list[Candidate]:
    """The copies of one clinical fact merged as ``$everything`` merges them: the earliest received leads."""
    by_key = {(c.stored.resource_type, c.stored.id): c for c in found}
    out = []
    for m in merge_duplicates([c.stored for c in found]):
        lead = by_key[(m.resource.resource_type, m.resource.id)]
        lead.duplicates = m.duplicates
        out.append(lead)
    return out


def _window(
    ordered: list[Candidate], cursor: Cursor | None, count: int, descending: list[bool]
) -> tuple[list[Candidate], list[Any] | None, list[Any] | None]:
    """The page of ``ordered`` the cursor points at, and the keys for the next and previous links."""
    start, end = 0, count
    if cursor is not None and cursor.key is not None:
        key = cursor.key
        if len(key) != len(descending) + 2:
            raise FhirHTTPError(
                400, "invalid", "parameter _cursor: not a cursor of this search (follow its links)"
            )
        # the first entry not before the cursor's key (its own entry, if it is still a match)
        at = next((i for i, c in enumerate(ordered) if _compare(c.key, key, descending) >= 0), len(ordered))
        if cursor.backward:  # the entries before it
            start, end = max(0, at - count), at
        else:  # the entries after it
            start = at + 1 if at < len(ordered) and _compare(ordered[at].key, key, descending) == 0 else at
            end = start + count
    page = ordered[start:end]
    next_key = page[-1].key if page and end < len(ordered) else None
    prev_key = page[0].key if page and start > 0 else None
    return page, next_key, prev_key


def _scan_pages(
    index: Any,
    q: SearchQuery,
    cursor: Cursor | None,
    hwm: int,
    narrowing: dict[str, Any],
    admit: Callable[[StoredResource], Candidate | None],
) -> tuple[list[Candidate], list[Any] | None, list[Any] | None, int | None]:
    """A page of a candidate set too large to sort in memory, read in index order."""
    if len(q.sort) > 1 or (q.sort and q.sort[0].param.name not in ("_id", "_lastUpdated")):
        raise FhirHTTPError(
            400,
            "too-costly",
            f"more than {CANDIDATE_LIMIT} {q.resource_type} resources to sort by "
            f"{','.join(k.param.name for k in q.sort)}: narrow the search (patient, _id, identifier, _source) "
            "or sort by _id or _lastUpdated",
        )
    order = "last_updated" if q.sort and q.sort[0].param.name == "_lastUpdated" else "id"
    descending = bool(q.sort and q.sort[0].descending)
    backward = cursor is not None and cursor.backward
    after: tuple[str, str] | None = None
    if cursor is not None and cursor.key is not None and len(cursor.key) != 3:
        raise FhirHTTPError(
            400, "invalid", "parameter _cursor: not a cursor of this search (follow its links)"
        )
    if cursor is not None and cursor.key is not None:
        after = (str(cursor.key[0]), str(cursor.key[-1]))

    def key_of(c: Candidate) -> list[Any]:
        value = c.stored.last_updated if order == "last_updated" else c.stored.id
        return [value, c.stored.resource_type, c.stored.id]

    found: list[Candidate] = []
    scan_desc = descending != backward
    exhausted = False
    while len(found) <= q.count:
        rows = index.scan(
            q.resource_type,
            max_seq=hwm,
            order=order,
            descending=scan_desc,
            after=after,
            limit=SCAN_CHUNK,
            **narrowing,
        )
        for stored in rows:
            c = admit(stored)
            if c is not None:
                c.key = key_of(c)
                found.append(c)
        if len(rows) < SCAN_CHUNK:
            exhausted = True
            break
        last = rows[-1]
        after = (last.last_updated if order == "last_updated" else last.id, last.id)
    more = len(found) > q.count or (not exhausted and len(found) == q.count)
    page = found[: q.count]
    if backward:
        page.reverse()
    started = cursor is not None and cursor.key is not None
    if backward:
        next_key = page[-1].key if page else None
        prev_key = page[0].key if page and more else None
    else:
        next_key = page[-1].key if page and more else None
        prev_key = page[0].key if page and started else None
    total = len(page) if not started and not more else None
    return page, next_key, prev_key, total


def count_all(backend: Backend, req: SearchRequest) -> int:
    """Every match of the query (``_summary=count``, ``_total=accurate`` on a large candidate set)."""
    q = replace(req.query, count=CANDIDATE_LIMIT, sort=[], include=[], revinclude=[])
    total = 0
    cursor = req.cursor
    while True:
        result = run_search(backend, replace(req, query=q, cursor=cursor))
        total += len(result.matches)
        if result.total is not None and (cursor is None or cursor.key is None):
            return result.total
        if result.next_key is None:
            return total
        cursor = Cursor(result.hwm, result.next_key)


def _includes(
    backend: Backend, q: SearchQuery, page: list[Candidate], admission: _Admission, hwm: int
) -> tuple[list[Candidate], list[str]]:
    """The resources ``_include`` and ``_revinclude`` add to the page, as the requester may see them,
    and warnings for a ``_revinclude`` that could not be read whole."""
    if not (q.include or q.revinclude) or not page:
        return [], []
    index = backend.index()
    on_page = {(c.stored.resource_type, c.stored.id) for c in page}
    wanted: set[tuple[str, str]] = set()
    for inc in q.include:
        for c in page:
            wanted.update(reference_targets(c.resource, inc))
    out: dict[tuple[str, str], Candidate] = {}
    warnings: list[str] = []

    def add(stored: StoredResource, resource: dict[str, Any]) -> None:
        if admission.token_allows(stored, resource) and admission.consent_allows(stored, resource):
            out.setdefault((stored.resource_type, stored.id), Candidate(stored, resource))

    for stored in index.get_stored(sorted(wanted - on_page)):
        add(stored, orjson.loads(stored.body))
    page_patients = sorted(
        {
            owner
            for c in page
            if (owner := c.stored.id if c.stored.resource_type == "Patient" else c.stored.patient_id)
        }
    )
    for inc in q.revinclude:
        if inc.source_type == "Provenance":
            for stored in index.provenance_of(sorted(on_page)):
                prov = _provenance_for(orjson.loads(stored.body), on_page, admission)
                if prov is not None:
                    out[("Provenance", stored.id)] = Candidate(stored, prov)
            continue
        if inc.source_type in NOT_SEARCHED:
            continue
        by_patient = inc.param is not None and is_patient_param(inc.source_type, inc.param)
        after: tuple[str, str] | None = None
        read = 0
        while True:
            rows = index.scan(
                inc.source_type,
                max_seq=hwm,
                patient_ids=page_patients if by_patient else None,
                after=after,
                limit=SCAN_CHUNK,
            )
            for stored in rows:
                resource = orjson.loads(stored.body)
                if set(reference_targets(resource, replace(inc, target=None))) & on_page:
                    add(stored, resource)
            read += len(rows)
            if len(rows) < SCAN_CHUNK:
                break
            if read >= CANDIDATE_LIMIT:
                warnings.append(
                    f"_revinclude={inc.raw}: only the first {read} {inc.source_type} resources were read "
                    "(too costly); narrow the search or search that type with the reference"
                )
                break
            after = (rows[-1].id, rows[-1].id)
    return list(out.values()), warnings


def _provenance_for(
    prov: dict[str, Any], on_page: set[tuple[str, str]], admission: _Admission
) -> dict[str, Any] | None:
    """A Provenance as this requester may see it: its targets narrowed to the page's entries (the others
    of its bundle may be withheld from them), marked REDACTED when narrowed; None when the token may not
    read Provenance."""
    access = admission.access
    if access is not None:
        allowed, limited = access.grant("Provenance", "r")
        # a Provenance belongs to no patient: outside any patient/ compartment, as a read of it is
        if not allowed or limited or not access.permits(prov, "r"):
            return None
    targets = prov.get("target") or []
    kept = [
        t
        for t in targets
        if isinstance(t, dict) and tuple(str(t.get("reference", "")).split("/")[-2:]) in on_page
    ]
    if len(kept) == len(targets):
        return prov
    meta = dict(prov.get("meta") or {})
    meta["security"] = [*(meta.get("security") or []), REDACTED]
    return {**prov, "target": kept, "meta": meta}


# -- shaping the output ----------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def _mandatory_elements(rtype: str) -> frozenset[str]:
    """The elements of a type with a minimum cardinality of 1 (kept by ``_elements`` and ``_summary``)."""
    try:
        model = get_fhir_model_class(rtype)
    except (KeyError, ValueError):
        return frozenset()
    out = set()
    for name, f in model.model_fields.items():
        extra = f.json_schema_extra if isinstance(f.json_schema_extra, dict) else {}
        if f.is_required() or extra.get("element_required"):
            out.add((f.alias or name).removesuffix("__ext"))  # the JSON name (class, not class_fhir)
    return frozenset(out)


@functools.lru_cache(maxsize=256)
def _summary_elements(rtype: str) -> frozenset[str]:
    """The R4 summary elements of a type (from the model's metadata: R4B's summary flags are R4's)."""
    try:
        model = get_fhir_model_class(rtype)
    except (KeyError, ValueError):
        return frozenset({"id", "meta"})
    out = set()
    for name, f in model.model_fields.items():
        extra = f.json_schema_extra if isinstance(f.json_schema_extra, dict) else {}
        if extra.get("summary_element_property") or extra.get("element_required"):
            out.add(f.alias or name)
    return frozenset(out | {"id", "meta", "modifierExtension", "implicitRules"})


def _kept(resource: dict[str, Any], q: SearchQuery) -> frozenset[str] | None:
    """The top-level elements ``_elements``/``_summary`` keep (None: all of them)."""
    rtype = resource["resourceType"]
    if q.elements is not None:
        wanted = {e.replace("[x]", "") for e in q.elements}
        # a choice element (value[x]) is asked for by its stem; the mandatory elements always stay
        chosen = {
            k
            for k in resource
            if any(k == w or (k.startswith(w) and k[len(w) : len(w) + 1].isupper()) for w in wanted)
        }
        return frozenset(chosen | _mandatory_elements(rtype) | {"id", "meta"})
    if q.summary == "true":
        return _summary_elements(rtype) | _mandatory_elements(rtype)
    if q.summary == "text":
        return frozenset({"id", "meta", "text"} | _mandatory_elements(rtype))
    if q.summary == "data":
        return frozenset(k for k in resource if k != "text")
    return None


def _shape(resource: dict[str, Any], q: SearchQuery) -> dict[str, Any]:
    """``_elements``/``_summary`` applied; a subset is tagged SUBSETTED (FHIR search)."""
    keep = _kept(resource, q)
    if keep is None:
        return resource
    out = {k: v for k, v in resource.items() if k == "resourceType" or k in keep}
    meta = dict(out.get("meta") or {})
    meta["tag"] = [*(meta.get("tag") or []), SUBSETTED]
    out["meta"] = meta
    return out


def _params_of(request: web.Request, form: list[tuple[str, str]] | None) -> list[tuple[str, str]]:
    return list(request.query.items()) + (form or [])


async def _search(request: web.Request, form: list[tuple[str, str]] | None = None) -> web.Response:
    rtype = request.match_info["type"]
    if rtype in NOT_SEARCHED:
        raise FhirHTTPError(
            404,
            "not-supported",
            f"{rtype} is not searchable here"
            + (": use _revinclude=Provenance:target" if rtype == "Provenance" else ""),
        )
    base = base_url(request)
    params = _params_of(request, form)
    strict = "handling=strict" in request.headers.get("Prefer", "").replace(" ", "")
    q = parse_search(rtype, params, strict=strict, base=base)
    access = access_of(request)
    check = consent_check(request, access, request.app[SETTINGS], base)
    if check is not None and check.reason is not None:
        # the glass is broken for one person, never for whoever a search happens to match: windows
        # already open are honoured, none is opened here
        check = replace(check, reason=None)
    cursor = Cursor.decode(q.cursor) if q.cursor else None
    req = SearchRequest(q, base, access, check, cursor)
    backend = stores(request)
    if q.summary == "count" or q.count == 0:
        total = await backend.run(count_all, backend, req)
        # a count says something about the patients it names: their access logs show it
        note(request, "search-type", "E", patients=q.patient_ids() or [])
        return fhir_response(
            {
                "resourceType": "Bundle",
                "id": str(uuid.uuid4()),
                "type": "searchset",
                "total": total,
                "link": [{"relation": "self", "url": _link(request, base, params, None)}],
            }
        )
    result = await backend.run(run_search, backend, req)
    if result.total is None and q.total == "accurate":
        result.total = await backend.run(count_all, backend, replace(req, cursor=Cursor(result.hwm)))
    note(
        request,
        "search-type",
        "E",
        patients=sorted(result.touched),
        touched_by_patient=result.touched,
    )
    entries: list[dict[str, Any]] = [
        {
            "fullUrl": f"{base}/{c.stored.resource_type}/{c.stored.id}",
            "resource": _shape(c.resource, q),
            "search": {"mode": "match"},
        }
        for c in result.matches
    ]
    entries += [
        {
            "fullUrl": f"{base}/{r['resourceType']}/{r['id']}",
            "resource": _shape(r, q) if q.elements is None else r,
            "search": {"mode": "include"},
        }
        for r in result.included
    ]
    entries += [
        {
            "resource": operation_outcome(
                "warning",
                "not-supported",
                f"search parameter {name!r} is not supported for {rtype} and was ignored",
            ),
            "search": {"mode": "outcome"},
        }
        for name in dict.fromkeys(q.unknown)
    ]
    entries += [
        {"resource": operation_outcome("warning", "too-costly", w), "search": {"mode": "outcome"}}
        for w in result.warnings
    ]
    if result.withheld:
        CONSENT_WITHHELD.inc(result.withheld)
        entries.append({"resource": suppressed_outcome(), "search": {"mode": "outcome"}})
    self_cursor = q.cursor or Cursor(result.hwm).encode()
    links = [{"relation": "self", "url": _link(request, base, params, self_cursor)}]
    if result.next_key is not None:
        links.append(
            {
                "relation": "next",
                "url": _link(request, base, params, Cursor(result.hwm, result.next_key).encode()),
            }
        )
    if result.prev_key is not None:
        links.append(
            {
                "relation": "previous",
                "url": _link(
                    request, base, params, Cursor(result.hwm, result.prev_key, backward=True).encode()
                ),
            }
        )
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "type": "searchset",
        "link": links,
        "entry": entries,
    }
    if result.total is not None and q.total != "none":
        bundle["total"] = result.total
    return fhir_response(bundle)


def _link(request: web.Request, base: str, params: list[tuple[str, str]], cursor: str | None) -> str:
    """An absolute paging link: the query as given (a POSTed form moved into the URL), at ``cursor``."""
    kept = [(k, v) for k, v in params if k != "_cursor"]
    if cursor is not None:
        kept.append(("_cursor", cursor))
    return f"{base}/{request.match_info['type']}?{urlencode(kept)}"


def _code_key(resource: dict[str, Any]) -> str:
    """What ``$lastn`` groups by: the Observation's first coded code (``system|code``), else its text."""
    code = resource.get("code") or {}
    for c in code.get("coding") or ():
        if isinstance(c, dict) and c.get("code"):
            return f"{c.get('system') or ''}|{c['code']}"
    return f"text:{fold(str(code.get('text') or ''))}"


@routes.get("/Observation/$lastn")
@needs("Observation", "s")
async def observation_lastn(request: web.Request) -> web.Response:
    """The ``max`` most recent Observations (by clinical time) of each code, for one patient's MPI
    person (``patient`` or ``subject`` required), narrowed by any Observation search parameter
    (``category``, ``code``, ``date``...): FHIR's ``Observation/$lastn``."""
    base = base_url(request)
    raw_max = request.query.get("max", "1")
    try:
        most = int(raw_max)
    except ValueError:
        raise FhirHTTPError(400, "invalid", f"parameter max: {raw_max!r} is not an integer") from None
    if not 1 <= most <= 1000:
        raise FhirHTTPError(400, "invalid", "parameter max must be between 1 and 1000")
    params = [(k, v) for k, v in request.query.items() if k != "max"]
    for name in ("_count", "_sort", "_cursor", "_summary", "_total"):
        if any(k == name for k, _ in params):
            raise FhirHTTPError(400, "invalid", f"parameter {name} is not a $lastn parameter")
    strict = "handling=strict" in request.headers.get("Prefer", "").replace(" ", "")
    q = parse_search("Observation", params, strict=strict, base=base)
    if q.patient_ids() is None:
        raise FhirHTTPError(
            400, "required", "$lastn needs patient (or subject=Patient/..): one person's observations"
        )
    q.count = CANDIDATE_LIMIT
    date = sp.params_of("Observation")["date"]
    q.sort = [SortKey(date, descending=True)]
    access = access_of(request)
    check = consent_check(request, access, request.app[SETTINGS], base)
    if check is not None and check.reason is not None:
        check = replace(check, reason=None)
    backend = stores(request)
    result = await backend.run(run_search, backend, SearchRequest(q, base, access, check, None))
    kept: list[Candidate] = []
    per_code: dict[str, int] = {}
    for c in result.matches:  # newest first
        key = _code_key(c.resource)
        if per_code.get(key, 0) < most:
            per_code[key] = per_code.get(key, 0) + 1
            kept.append(c)
    touched: dict[str, dict[str, int]] = {}
    for c in kept:
        if c.stored.patient_id:
            touched.setdefault(c.stored.patient_id, {"Observation": 0})["Observation"] += 1
    note(request, "operation", "E", patients=sorted(touched), touched_by_patient=touched)
    entries: list[dict[str, Any]] = [
        {
            "fullUrl": f"{base}/Observation/{c.stored.id}",
            "resource": _shape(c.resource, q),
            "search": {"mode": "match"},
        }
        for c in kept
    ]
    entries += [
        {
            "resource": operation_outcome(
                "warning", "not-supported", f"parameter {n!r} is not supported and was ignored"
            ),
            "search": {"mode": "outcome"},
        }
        for n in dict.fromkeys(q.unknown)
    ]
    if result.withheld:
        CONSENT_WITHHELD.inc(result.withheld)
        entries.append({"resource": suppressed_outcome(), "search": {"mode": "outcome"}})
    return fhir_response(
        {
            "resourceType": "Bundle",
            "id": str(uuid.uuid4()),
            "type": "searchset",
            "total": len(kept),
            "link": [
                {
                    "relation": "self",
                    "url": f"{base}/Observation/$lastn?{urlencode(list(request.query.items()))}",
                }
            ],
            "entry": entries,
        }
    )


@routes.get(r"/{type:[A-Z][A-Za-z]+}")
@needs(PATH_TYPE, "s")
async def search_type(request: web.Request) -> web.Response:
    """Search one resource type (docs/query.md)."""
    return await _search(request)


@routes.post(r"/{type:[A-Z][A-Za-z]+}/_search")
@needs(PATH_TYPE, "s")
async def search_type_post(request: web.Request) -> web.Response:
    """Search with the parameters in an ``application/x-www-form-urlencoded`` body (FHIR's POST search)."""
    ctype = request.headers.get("Content-Type", "").split(";")[0].strip().lower()
    if ctype != "application/x-www-form-urlencoded":
        raise FhirHTTPError(
            415, "not-supported", "POST _search takes an application/x-www-form-urlencoded body"
        )
    body = await read_body(request, 64 * 1024)
    try:
        form = parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
    except UnicodeDecodeError:
        raise FhirHTTPError(400, "invalid", "the form body is not UTF-8") from None
    return await _search(request, form)
