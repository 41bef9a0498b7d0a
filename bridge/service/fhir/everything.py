"""``Patient/{id}/$everything``: the merged, de-duplicated, provable history of a patient.

* gathers every Patient linked to ``{id}`` (MPI MATCH links; possible matches are never merged into
  the view), then every resource in their compartments;
* honours ``start``/``end`` (the clinical date, per type in :mod:`bridge.stores.index.rules`), ``_since``
  (``meta.lastUpdated``), ``_type``, ``_count`` with searchset paging; any other parameter yields an
  OperationOutcome warning entry: never silently ignored;
* merges resources stating the same clinical fact (:func:`bridge.stores.index.rules.dedupe_key`) into one
  entry that lists every source;
* gives each entry its provenance (source org, source patient, bundle SHA-256, ledger leaf index);
  ``_proof=true`` adds an RFC 9162 inclusion proof per source against the latest signed checkpoint,
  which travels in ``Bundle.meta`` (docs/query.md).
"""

from __future__ import annotations

import base64
import operator
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import orjson
from aiohttp import web

from bridge.metrics import CONSENT_WITHHELD
from bridge.service.audit.middleware import note, patients_touched
from bridge.service.auth.marks import Forbidden, needs
from bridge.service.auth.middleware import access_of
from bridge.service.auth.policy import Access
from bridge.service.consent.enforce import ConsentCheck, consent_check, suppressed_outcome
from bridge.service.context import SETTINGS, Backend, base_url, stores
from bridge.service.fhir.dates import in_range, utc_millis
from bridge.service.fhir.paging import Cursor
from bridge.service.http import (
    FhirHTTPError,
    check_no_nul,
    check_query,
    date_param,
    fhir_response,
    int_param,
    operation_outcome,
)
from bridge.stores.index.rules import CLINICAL_DATE_PATHS, PATIENT_REFERENCE_PATHS
from bridge.stores.index.store import StoredResource
from ledger.merkle import leaf_hash

routes = web.RouteTableDef()

PROVENANCE_EXT = "https://fhirbridge.dev/fhir/StructureDefinition/entry-provenance"
CHECKPOINT_EXT = "https://fhirbridge.dev/fhir/StructureDefinition/ledger-checkpoint"
EVERYTHING_PARAMS = {"start", "end", "_since", "_type", "_count", "_offset", "_cursor", "_proof", "_format"}
#: the resource types a patient's compartment can hold in the index: Provenance is never returned, and
#: the patient's Consents are served by ``/Consent`` (who may see them is not who may see the record)
NOT_RETURNED = frozenset({"Provenance", "Consent"})
EVERYTHING_TYPES = {"Patient", "Appointment", *PATIENT_REFERENCE_PATHS, *CLINICAL_DATE_PATHS} - NOT_RETURNED
DEFAULT_COUNT = 100
MAX_COUNT = 1000


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
    #: the token's narrowing: whether a stored resource may be returned (None: every one)
    permit: Callable[[StoredResource], bool] | None = None
    #: the patient's Consents, for this requester (None: none apply, e.g. the patient's own token)
    consent: ConsentCheck | None = None
    #: the page's position, pinned to the snapshot of the first page (the same paging as search):
    #: ``(high-water mark, sort key of the entry the page follows or precedes, backward)``
    cursor: tuple[int, list[Any] | None, bool] | None = None


@dataclass
class MergedEntry:
    resource: StoredResource
    duplicates: list[StoredResource] = field(default_factory=list)

    @property
    def keys(self) -> list[tuple[str, str]]:
        return [(r.resource_type, r.id) for r in (self.resource, *self.duplicates)]


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


def entry_key(m: MergedEntry) -> list[Any]:
    """An entry's place in ``$everything``'s order (:func:`merge_duplicates`), as its paging cursor holds it."""
    r = m.resource
    return [int(r.resource_type != "Patient"), r.clinical_date or "", r.resource_type, r.id]


def everything(backend: Backend, patient_id: str, params: EverythingParams) -> dict[str, Any]:
    """Compute a page of ``$everything`` (runs in the DB thread pool)."""
    index = backend.index()
    if index.get("Patient", patient_id) is None:
        raise FhirHTTPError(404, "not-found", f"Patient/{patient_id} is not known")
    mpi = backend.mpi()
    linked = mpi.linked_patient_ids(patient_id) if mpi is not None else index.identifier_linked(patient_id)
    if patient_id not in linked:
        linked = [patient_id, *linked]
    # ``types == []``: ``_type`` held only empty values (``_type=,``), which match nothing (with a warning)
    hwm = params.cursor[0] if params.cursor is not None else index.high_water_mark()
    resources = (
        []
        if params.types == []
        else index.resources_for_patients(linked, types=params.types, since=params.since, max_seq=hwm)
    )
    start, end = params.start, params.end
    if start or end:
        resources = [
            r for r in resources if r.resource_type == "Patient" or in_range(r.clinical_date, start, end)
        ]
    resources = [r for r in resources if r.resource_type not in NOT_RETURNED]
    if params.permit is not None:
        resources = [r for r in resources if params.permit(r)]
    withheld, window = 0, None
    if params.consent is not None:
        gate = params.consent.gate(backend, linked)
        window = gate.window
        if not gate.unrestricted:
            resources = [r for r in resources if gate.admits(r)]
            withheld = gate.withheld
    merged = merge_duplicates(resources)
    total = len(merged)
    first, last = params.offset, min(params.offset + params.count, total)
    if params.cursor is not None and params.cursor[1] is not None:
        after, backward = params.cursor[1], params.cursor[2]
        at = next((i for i, m in enumerate(merged) if entry_key(m) >= after), total)
        if backward:  # the entries before the key
            first, last = max(0, at - params.count), at
        else:  # the entries after it
            first = at + 1 if at < total and entry_key(merged[at]) == after else at
            last = min(first + params.count, total)
    page = merged[first:last]
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
        "hwm": hwm,
        "next_key": entry_key(page[-1]) if page and last < total else None,
        "prev_key": entry_key(page[0]) if page and first > 0 else None,
        "linked": linked,
        "checkpoint": checkpoint,
        "unproven": unproven,
        "withheld": withheld,
        "window": window,
        "touched": patients_touched(
            [(r.patient_id, r.resource_type) for m in page for r in (m.resource, *m.duplicates)], patient_id
        ),
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
                leaf = ledger.entry(index).canonical()
                proof = ledger.inclusion_proof(index, checkpoint["size"])
                sub += [
                    {"url": "ledgerEntry", "valueBase64Binary": base64.b64encode(leaf).decode()},
                    {"url": "leafHash", "valueBase64Binary": base64.b64encode(leaf_hash(leaf)).decode()},
                    {"url": "treeSize", "valueInteger": checkpoint["size"]},
                    *({"url": "proofHash", "valueBase64Binary": base64.b64encode(h).decode()} for h in proof),
                ]
    return {"url": PROVENANCE_EXT, "extension": sub}


def _cursor_of(request: web.Request) -> tuple[int, list[Any] | None, bool] | None:
    raw = request.query.get("_cursor")
    if raw is None:
        return None
    if "_offset" in request.query:
        raise FhirHTTPError(400, "invalid", "give _cursor or _offset, not both")
    c = Cursor.decode(raw)
    if c.key is not None and (len(c.key) != 4 or not all(isinstance(x, int | str) for x in c.key)):
        raise FhirHTTPError(400, "invalid", "parameter _cursor: not a cursor of $everything")
    return c.hwm, c.key, c.backward


def _authorized(
    access: Access, pid: str, types: list[str] | None
) -> tuple[list[str] | None, Callable[[StoredResource], bool] | None]:
    """The types to return and the narrowing filter, for a token: the types it may read (of a patient
    outside a ``patient/`` token's compartment, none: :class:`Forbidden`, whether the patient exists
    or not), within ``_type`` when given; ``?category=``/``?code=`` narrowing as a filter."""
    readable = [
        t
        for t in sorted(EVERYTHING_TYPES)
        if access.allows(t, "r") and (not access.grant(t, "r")[1] or pid in (access.compartment or ()))
    ]
    if not readable:
        raise Forbidden("the token's scopes do not cover this patient")
    if len(readable) < len(EVERYTHING_TYPES) or types is not None:
        types = [t for t in (types if types is not None else readable) if t in readable]
    narrowed = frozenset(t for t in readable if access.narrowed(t, "r"))
    if not narrowed:
        return types, None

    def permit(r: StoredResource) -> bool:
        return r.resource_type not in narrowed or access.permits(orjson.loads(r.body), "r")

    return types, permit


@routes.get(r"/Patient/{id}/$everything")
@needs("*", "r")
async def patient_everything(request: web.Request) -> web.Response:
    """The merged history of a patient and the patients linked to them (docs/query.md)."""
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
    since = date_param(request, "_since")
    permit = None
    access = access_of(request)
    if access is not None:  # what the token may read of this patient, decided before any query
        types, permit = _authorized(access, pid, types)
    base = base_url(request)
    consent = consent_check(request, access, request.app[SETTINGS], base)
    params = EverythingParams(
        start=date_param(request, "start"),
        end=date_param(request, "end"),
        since=utc_millis(since) if since else None,
        types=types,
        count=int_param(request, "_count", DEFAULT_COUNT, 1, MAX_COUNT),
        offset=int_param(request, "_offset", 0, 0, 10**9),
        cursor=_cursor_of(request),
        proof=proof_raw == "true",
        base=base,
        permit=permit,
        consent=consent,
    )
    backend = stores(request)
    result = await backend.run(everything, backend, pid, params)
    note(
        request,
        "operation",
        "E",
        patients=[pid, *result["touched"]],
        touched_by_patient=result["touched"],
        window=result["window"],
    )
    if result["withheld"]:
        CONSENT_WITHHELD.inc(result["withheld"])
        warnings.append(suppressed_outcome())
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
    query = [
        (k, v) for k, v in request.query.items() if k not in ("_offset", "_cursor")
    ]  # the query as given

    def link(relation: str, key: list[Any] | None, backward: bool = False) -> dict[str, str]:
        cursor = Cursor(result["hwm"], key, backward).encode()
        return {"relation": relation, "url": f"{self_url}?{urlencode([*query, ('_cursor', cursor)])}"}

    self_key = params.cursor[1] if params.cursor is not None else None
    links = [link("self", self_key, bool(params.cursor and params.cursor[2]))]
    if result["next_key"] is not None:
        links.append(link("next", result["next_key"]))
    if result["prev_key"] is not None:
        links.append(link("previous", result["prev_key"], backward=True))
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
