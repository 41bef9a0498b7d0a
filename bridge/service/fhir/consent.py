"""Patients' privacy Consents through the API (docs/consent.md).

* ``PUT /Consent/{id}``: the patient's own ``patient/`` token (``Consent.cu``) or a registrar's ``user/``
  token writes a Consent. It goes the way every record goes: a bundle, signed with the service's own
  organisation's key (``FHIRBRIDGE_AUTH_ORGANIZATION``), produced to the bundles topic with ``acks=all``
  (so the ledger consumer appends its SHA-256), then applied to this service's index before the answer:
  the very next request is decided under it. The index consumer applies the same record later, which
  changes nothing.
* ``GET /Consent?patient=<id>``: the patient's current Consents.
* ``GET /Consent/{id}/_history``: every version the index received, newest first, each with the bundle
  that delivered it and, when the ledger holds that bundle, its leaf index ("what did I consent to, and
  since when", provable with ``GET /ledger/proof/...``).
* ``GET /Patient/{id}/$consent-decision?actor=...&purpose=...``: whether the patient's Consents let an
  organisation (``st-mary``, or ``Organization/<id>``) or a practitioner (``Practitioner/<id>``) read their
  record for a purpose (default TREAT), and which Consent and provision decide.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web
from pydantic import ValidationError

from adapters.base import SourceInfo
from adapters.bundle import BundleBuilder
from adapters.r4 import NotR4, resource_to_r4
from bridge import __version__
from bridge.errors import ConfigError
from bridge.logging import get_logger
from bridge.service.audit.middleware import note, open_patient_operation
from bridge.service.auth.marks import Forbidden, needs
from bridge.service.auth.middleware import access_of
from bridge.service.auth.purpose import PURPOSES
from bridge.service.consent.enforce import ORG_SYSTEM
from bridge.service.consent.evaluate import CONSENT_SCOPE, ConsentPolicy, Requester
from bridge.service.context import SETTINGS, Backend, base_url, run_db
from bridge.service.fhir.everything import PROVENANCE_EXT
from bridge.service.http import FhirHTTPError, check_query, fhir_response
from bridge.stores.index.rules import patient_of
from bridge.stores.index.store import IncomingBundle
from bridge.stream.producer import Publisher

log = get_logger(__name__)
routes = web.RouteTableDef()

#: what made an API-written bundle, in its envelope and Provenance
PRODUCER = ("api", __version__)
MAX_BODY = 1024 * 1024
PUBLISH_TIMEOUT = 15.0
_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_PATIENT_REF = re.compile(r"^(?:.*/)?Patient/([A-Za-z0-9\-.]{1,64})$")


class ConsentWriter:
    """The service's producer of API-written bundles: made on first use (the service needs no broker
    until someone writes), closed with the application."""

    def __init__(self, factory: Any = None) -> None:
        self._factory = factory
        self._publisher: Publisher | None = None

    def publisher(self, settings: Any) -> Publisher:
        if self._publisher is None:
            self._publisher = (self._factory or Publisher.from_settings)(settings)
        return self._publisher

    def close(self) -> None:
        if self._publisher is not None:
            self._publisher.close(timeout=5)
            self._publisher = None


CONSENT_WRITER = web.AppKey("consent_writer", ConsentWriter)


def _r4_consent(body: dict[str, Any]) -> None:
    """Validate ``body`` with the R4B models, then map it to R4 in place (:mod:`adapters.r4`): a 422 for
    what R4B refuses, and for R4B content that R4, the version we serve, cannot express."""
    from fhir.resources.R4B.consent import Consent  # 0.1 s to import: on the first write

    try:
        Consent.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "__root__")
        raise FhirHTTPError(
            422,
            "invalid",
            f"not a valid R4 Consent: Consent{'.' + where if where else ''}: {first.get('msg')}",
        ) from None
    try:
        resource_to_r4(body, ("Consent",))
    except NotR4 as exc:
        raise FhirHTTPError(422, "invalid", f"not a valid R4 Consent: {exc}") from None


def _consent_patient(body: dict[str, Any], base: str) -> str:
    ref = (body.get("patient") or {}).get("reference") if isinstance(body.get("patient"), dict) else None
    if isinstance(ref, str) and ref.startswith(("http://", "https://")) and not ref.startswith(base + "/"):
        ref = None  # a patient on another server
    m = _PATIENT_REF.match(ref) if isinstance(ref, str) else None
    if m is None:
        raise FhirHTTPError(
            422, "required", "Consent.patient must reference a Patient of this service (Patient/<id>)"
        )
    return m.group(1)


def _is_privacy(body: dict[str, Any]) -> bool:
    for coding in (body.get("scope") or {}).get("coding") or ():
        if isinstance(coding, dict) and coding.get("code") == "patient-privacy":
            return coding.get("system") in (None, CONSENT_SCOPE)
    return False


async def _read_body(request: web.Request) -> dict[str, Any]:
    if request.content_type not in ("application/fhir+json", "application/json"):
        raise FhirHTTPError(415, "not-supported", "send the Consent as application/fhir+json")
    raw = await request.content.read(MAX_BODY + 1)
    if len(raw) > MAX_BODY:
        raise FhirHTTPError(413, "too-costly", f"a Consent is at most {MAX_BODY} bytes")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise FhirHTTPError(400, "invalid", f"the body is not JSON: {exc}") from None
    if not isinstance(body, dict) or body.get("resourceType") != "Consent":
        raise FhirHTTPError(400, "invalid", "the body must be a Consent resource")
    return body


def _publish_and_apply(
    backend: Backend, writer: ConsentWriter, settings: Any, body: dict[str, Any], raw: bytes
) -> dict[str, Any]:
    """Build, sign and produce the bundle of ``body``; wait for the broker's acknowledgement; apply
    the same record to the index. Returns the Consent as stored."""
    org = settings.auth.organization
    source = SourceInfo(org)
    now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    builder = BundleBuilder(
        adapter_name=PRODUCER[0],
        adapter_version=PRODUCER[1],
        source=source,
        input_sha256=hashlib.sha256(raw).hexdigest(),
        record_key=f"Consent/{body['id']}",
        recorded=now,
    )
    builder.add(body)
    patient = patient_of(body)
    converted = builder.build(routing_key=f"Patient/{patient}", message_id=f"Consent/{body['id']}")
    try:
        meta = (
            writer.publisher(settings)
            .publish(converted, None, source, producer=PRODUCER)
            .get(PUBLISH_TIMEOUT)
        )
    except ConfigError as exc:  # the operator's to fix: say so in the log, not to the caller
        log.error("consent.publish_not_configured", problem=str(exc))
        raise FhirHTTPError(
            503,
            "transient",
            "the service cannot publish Consents yet (see its log); the Consent was not kept",
        ) from None
    except Exception as exc:  # a broker that does not acknowledge: nothing is kept, nothing is applied
        log.warning("consent.publish_failed", error=type(exc).__name__)
        raise FhirHTTPError(
            503, "transient", "the Consent could not be published, so it was not kept; retry later"
        ) from exc
    received = datetime.fromtimestamp(meta.timestamp / 1000, UTC).isoformat(timespec="milliseconds")
    backend.index().apply(
        [
            IncomingBundle(
                bundle=converted.bundle,
                bundle_sha256=converted.sha256,
                source_org=org,
                source_patient=converted.routing_key,
                topic=meta.topic,
                partition=meta.partition,
                offset=meta.offset,
                received_at=received.replace("+00:00", "Z"),
            )
        ]
    )
    stored = backend.index().get("Consent", body["id"])
    assert stored is not None
    return stored


@routes.put(r"/Consent/{id}")
@needs("Consent", "cu", contexts=("patient", "user"))
async def put_consent(request: web.Request) -> web.Response:
    """Create or replace a privacy Consent (module docstring)."""
    cid = request.match_info["id"]
    if not _ID.match(cid):
        raise FhirHTTPError(400, "invalid", "a Consent id is 1 to 64 letters, digits, '-' or '.'")
    body = await _read_body(request)
    if body.get("id") != cid:
        raise FhirHTTPError(400, "invalid", "the Consent's id must be the id in the URL")
    base = base_url(request)
    pid = _consent_patient(body, base)
    note(request, "update", "U", patients=[pid])
    access = access_of(request)
    if access is not None:
        access.require_patient(pid, "Consent", "cu")
    if not _is_privacy(body):
        raise FhirHTTPError(
            422,
            "business-rule",
            "only privacy Consents (scope patient-privacy) are written here and enforced",
        )
    body.pop("meta", None)  # versionId, lastUpdated and source are the service's to set
    body["patient"] = {**body["patient"], "reference": f"Patient/{pid}"}
    _r4_consent(body)

    def existing(be: Backend) -> tuple[bool, dict[str, Any] | None]:
        return be.index().get("Patient", pid) is not None, be.index().get("Consent", cid)

    known, previous = await run_db(request, existing)
    if not known:
        raise FhirHTTPError(422, "not-found", f"Patient/{pid} is not known to this service")
    if previous is not None and patient_of(previous) != pid:
        raise FhirHTTPError(409, "conflict", f"Consent/{cid} is another patient's Consent")
    settings = request.app[SETTINGS]
    raw = orjson.dumps(body)
    stored = await run_db(request, _publish_and_apply, request.app[CONSENT_WRITER], settings, body, raw)
    note(
        request,
        "update" if previous else "create",
        "U" if previous else "C",
        patients=[pid],
        touched={"Consent": 1},
    )
    log.info("consent.written", consent=cid, created=previous is None)
    return fhir_response(
        stored,
        status=200 if previous is not None else 201,
        headers={"Location": f"{base}/Consent/{cid}"},
    )


@routes.get("/Consent")
@needs("Consent", "s", contexts=("patient", "user"))
async def search_consents(request: web.Request) -> web.Response:
    """``GET /Consent?patient=<id>``: the patient's current Consents."""
    check_query(request, {"patient", "_format"})
    pid = request.query.get("patient", "")
    m = _PATIENT_REF.match(pid) or (re.match(r"^([A-Za-z0-9\-.]{1,64})$", pid))
    if not m:
        raise FhirHTTPError(400, "required", "give patient=<id> (the Consents of one patient)")
    pid = m.group(1)
    note(request, "search-type", "E", patients=[pid])
    access = access_of(request)
    if access is not None:
        access.require_patient(pid, "Consent", "s")
    rows = await run_db(request, lambda be: be.index().resources_for_patients([pid], types=["Consent"]))
    base = base_url(request)
    entries = [
        {
            "fullUrl": f"{base}/Consent/{r.id}",
            "resource": orjson.Fragment(r.body),
            "search": {"mode": "match"},
        }
        for r in sorted(rows, key=lambda r: r.id)
    ]
    note(request, "search-type", "E", patients=[pid], touched={"Consent": len(entries)})
    return fhir_response(
        {
            "resourceType": "Bundle",
            "id": str(uuid.uuid4()),
            "type": "searchset",
            "total": len(entries),
            "link": [{"relation": "self", "url": f"{base}/Consent?patient={pid}"}],
            "entry": entries,
        }
    )


@routes.get(r"/Consent/{id}/_history")
@needs("Consent", "r", contexts=("patient", "user"))
async def consent_history(request: web.Request) -> web.Response:
    """Every version of a Consent, newest first, with the bundle that delivered each and its ledger leaf."""
    cid = request.match_info["id"]
    access = access_of(request)

    def versions(be: Backend) -> list[dict[str, Any]]:
        found = be.index().consent_versions(cid)
        ledger = be.ledger()
        for v in found:
            v["leaf_index"] = ledger.find(v["bundle_sha256"], v["source_org"]) if ledger is not None else None
        return found

    found = await run_db(request, versions)
    pid = found[0]["patient_id"] if found else None
    note(request, "history-instance", "R", patients=[pid] if pid else [])
    if access is not None and pid is not None:
        try:
            access.require_patient(pid, "Consent", "r")
        except Forbidden:
            found = []  # another patient's Consent reads as absent, like a read
    if not found:
        raise FhirHTTPError(404, "not-found", f"Consent/{cid} is not known")
    base = base_url(request)
    entries = []
    for number, v in enumerate(reversed(found), start=1):
        resource = {**v["resource"], "meta": {**v["resource"].get("meta", {}), "versionId": str(number)}}
        sub = [
            {"url": "sourceOrg", "valueString": v["source_org"]},
            {"url": "bundleSha256", "valueString": v["bundle_sha256"]},
            {"url": "receivedAt", "valueInstant": v["received_at"]},
        ]
        if v["leaf_index"] is not None:
            sub.append({"url": "ledgerIndex", "valueInteger": v["leaf_index"]})
        entries.append(
            {
                "fullUrl": f"{base}/Consent/{cid}/_history/{number}",
                "resource": resource,
                "request": {"method": "PUT", "url": f"Consent/{cid}"},
                "response": {"status": "200", "lastModified": v["received_at"]},
                "extension": [{"url": PROVENANCE_EXT, "extension": sub}],
            }
        )
    entries.reverse()
    note(request, "history-instance", "R", patients=[pid] if pid else [], touched={"Consent": len(entries)})
    return fhir_response(
        {
            "resourceType": "Bundle",
            "id": str(uuid.uuid4()),
            "type": "history",
            "total": len(entries),
            "entry": entries,
        }
    )


@routes.get(r"/Patient/{id}/$consent-decision")
@needs("Consent", "r", contexts=("patient", "user"))
async def consent_decision(request: web.Request) -> web.Response:
    """Whether the patient's Consents permit ``actor`` to read their record for ``purpose``, and why."""
    pid = open_patient_operation(request, {"actor", "purpose"}, "Consent", "r")
    actor = request.query.get("actor", "").strip()
    purpose = request.query.get("purpose", "TREAT").strip()
    if purpose not in PURPOSES:
        raise FhirHTTPError(
            400, "invalid", "purpose must be a v3-ActReason code such as TREAT, ETREAT, HRESCH"
        )
    if not actor:
        raise FhirHTTPError(
            400,
            "required",
            "give actor: an organisation id (st-mary), Organization/<id> or Practitioner/<id>",
        )
    settings = request.app[SETTINGS]
    base = base_url(request)

    def explain(be: Backend) -> tuple[Any, list[dict[str, Any]]]:
        index = be.index()
        if index.get("Patient", pid) is None:
            raise FhirHTTPError(404, "not-found", f"Patient/{pid} is not known")
        mpi = be.mpi()
        linked = mpi.linked_patient_ids(pid) if mpi is not None else [pid]
        consents = [orjson.loads(r.body) for r in index.resources_for_patients(linked, types=["Consent"])]
        requester = _requester(index, actor, purpose)
        policy = ConsentPolicy(consents, settings.consent.default, base_url=base)
        return policy.explain(requester, now=datetime.now(UTC)), consents

    explanation, consents = await run_db(request, explain)
    params: list[dict[str, Any]] = [
        {"name": "decision", "valueCode": explanation.outcome},
        {"name": "reason", "valueString": explanation.reason},
        {"name": "consents", "valueInteger": len(consents)},
    ]
    decision = explanation.decision
    if decision is not None and decision.consent_id is not None:
        params.append({"name": "consent", "valueReference": {"reference": f"Consent/{decision.consent_id}"}})
        params.append({"name": "provision", "valueString": decision.provision_path})
    for dep in explanation.depends_on:
        params.append(
            {
                "name": "dependsOn",
                "part": [
                    {"name": "consent", "valueReference": {"reference": f"Consent/{dep.consent_id}"}},
                    {"name": "provision", "valueString": dep.provision_path},
                    {"name": "effect", "valueCode": dep.effect},
                    *({"name": "element", "valueString": e} for e in dep.elements),
                ],
            }
        )
    params.append(
        {
            "name": "note",
            "valueString": "an organisation always sees the records it sent itself; this decision is about the "
            "rest of the person's record",
        }
    )
    return fhir_response({"resourceType": "Parameters", "parameter": params})


def _requester(index: Any, actor: str, purpose: str) -> Requester:
    if actor.startswith(("Practitioner/", "PractitionerRole/")):
        return Requester(None, purpose, practitioner=actor)
    if actor.startswith("Organization/"):
        org = index.get("Organization", actor.split("/", 1)[1])
        named = [
            i["value"]
            for i in (org or {}).get("identifier") or ()
            if isinstance(i, dict) and i.get("system") == ORG_SYSTEM and isinstance(i.get("value"), str)
        ]
        return Requester(named[0] if named else None, purpose, organization_refs=frozenset({actor}))
    if not _ID.match(actor):
        raise FhirHTTPError(
            400, "invalid", "actor: an organisation id, Organization/<id> or Practitioner/<id>"
        )
    return Requester(actor, purpose)
