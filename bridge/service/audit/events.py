"""FHIR R4 ``AuditEvent`` resources for every access, after IHE Basic Audit Log Patterns (BALP).

:func:`audit_events` builds the events of one access (a read, a search, ``$everything``, an export, an
MPI operation, a consent decision; allowed, denied or failed): **one event per patient** the access
touched (BALP: "one AuditEvent is created for every Patient identified in the resulting search set"), or
one event without a patient when it touched none. Each event carries:

* ``type`` ``rest`` (audit-event-type) and ``subtype`` the FHIR interaction (restful-interaction:
  ``read``, ``search-type``, ``operation``...); with break-the-glass also DICOM ``110127`` "Emergency
  Override Started";
* ``action`` (``R`` for a read, ``E`` for a search or an operation), ``recorded``, ``outcome`` (``0``
  success, ``4`` denied, ``8`` error) and, for a failure, ``outcomeDesc``;
* ``purposeOfEvent``: the token's purpose of use (v3 ActReason, e.g. ``TREAT``) and, with
  break-the-glass, v3 ActReason ``BTG`` whose ``text`` is the reason given;
* agents, as BALP's Query/Read and OAuth token patterns place them:

  - the **user** (``IRCP`` information recipient and BALP ``UserOauthAgent``): ``who.identifier`` is
    the token's issuer (``system``) and subject (``value``), ``who.reference`` its ``fhirUser``,
    ``policy`` its ``jti``, ``purposeOfUse`` as above, ``requestor`` true;
  - the **client**: ``who.identifier`` the issuer and ``client_id``; DICOM ``110153`` Source Role ID for
    a search or an operation, ``110152`` Destination Role ID for a read (BALP swaps them for reads:
    the data flows to the client); ``network`` its address when known;
  - the **server** (the other DICOM role), and the user's **organisation** (v3 RoleClass ``PROV``,
    ``who.identifier`` ``urn:fhirbridge:org|<id>``), the one configured for the token's issuer;

* entities: the **patient** (audit-entity-type 1 Person, object-role 1 Patient, ``what``
  ``Patient/<id>``); the **query** (type 2 System Object, role 24 Query, ``query`` the base64 of the
  request, ``description`` the request itself); **what was touched**, one entity per resource type
  (type ``http://hl7.org/fhir/resource-types#<Type>``, role 4 Domain Resource, ``detail`` ``count``);
  and the **request id** (BALP ``XrequestId``).

No profile is claimed in ``meta.profile``: BALP's profiles are for successful accesses only, and they
require elements the service does not always know (the client's network address; for a read, a
reference to each resource returned). The events are valid R4 (checked with the R4B models, identical
for AuditEvent).
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Literal

from bridge.service.auth.tokens import AccessContext
from bridge.stores.audit import (
    ACT_REASON,
    BREAK_GLASS,
    DCM,
    DESTINATION_ROLE,
    OBJECT_ROLE,
    ORGANIZATION_TYPE,
    OUTCOME_CODES,
    PARTICIPATION_TYPE,
    READ_INTERACTIONS,
    RESTFUL_INTERACTION,
    SOURCE_ROLE,
    USER_TYPE,
    client_role_of,
)

__all__ = ["INTERACTIONS", "Outcome", "agent_key", "audit_events", "summarize"]

Outcome = Literal["success", "denied", "error"]
Action = Literal["C", "R", "U", "D", "E"]

AUDIT_EVENT_TYPE = "http://terminology.hl7.org/CodeSystem/audit-event-type"
AUDIT_ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
AUDIT_EVENT_OUTCOME_DISPLAY = {"0": "Success", "4": "Minor failure", "8": "Serious failure"}
SECURITY_SOURCE_TYPE = "http://terminology.hl7.org/CodeSystem/security-source-type"
RESOURCE_TYPES = "http://hl7.org/fhir/resource-types"
NETWORK_TYPE_IP, NETWORK_TYPE_URI = "2", "5"
BALP_USER_AGENT_TYPES = "https://profiles.ihe.net/ITI/BALP/CodeSystem/UserAgentTypes"
BALP_ENTITY_TYPES = "https://profiles.ihe.net/ITI/BALP/CodeSystem/BasicAuditEntityType"
#: the organisation identifiers' system, as in the Provenance the adapters write
ORG_SYSTEM = "urn:fhirbridge:org"

#: http://hl7.org/fhir/restful-interaction (R4)
INTERACTIONS = frozenset(
    {
        "read", "vread", "update", "patch", "delete", "history", "history-instance", "history-type",
        "history-system", "create", "search", "search-type", "search-system", "capabilities",
        "transaction", "batch", "operation",
    }
)  # fmt: skip
_ACTIONS = frozenset({"C", "R", "U", "D", "E"})
_OUTCOME_DESC = {"denied": "access denied", "error": "the access failed"}


def _coding(system: str, code: str, display: str | None = None) -> dict[str, str]:
    out = {"system": system, "code": code}
    if display:
        out["display"] = display
    return out


def _instant(recorded: datetime) -> str:
    if recorded.tzinfo is None:
        raise ValueError("recorded must be a timezone-aware datetime")
    return recorded.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _purpose_coding(purpose: str) -> dict[str, str]:
    """``TREAT`` (a v3 ActReason code) or ``system|code``."""
    system, sep, code = purpose.rpartition("|")
    if not code or (sep and not system):
        raise ValueError("purpose must be a v3 ActReason code or system|code")
    return _coding(system or ACT_REASON, code)


def agent_key(access: AccessContext | None) -> str | None:
    """The ``agent`` an access is stored and searched by: ``issuer|subject`` (as MPI decisions name their
    actor), ``issuer|client_id`` for a token without a subject, None without a token."""
    if access is None:
        return None
    who = access.subject or access.client_id
    return f"{access.issuer}|{who}" if who else None


def _agents(
    access: AccessContext | None,
    *,
    read: bool,
    purposes: list[dict[str, Any]],
    server: str,
    client_address: str | None,
) -> list[dict[str, Any]]:
    source_role = _coding(*SOURCE_ROLE, "Source Role ID")
    destination_role = _coding(*DESTINATION_ROLE, "Destination Role ID")
    client_role, server_role = (destination_role, source_role) if read else (source_role, destination_role)
    agents: list[dict[str, Any]] = []
    has_user = access is not None and bool(access.subject)
    if access is not None and access.subject:
        who: dict[str, Any] = {"identifier": {"system": access.issuer, "value": access.subject}}
        if access.fhir_user:
            who["reference"] = access.fhir_user
        user: dict[str, Any] = {
            "type": {
                "coding": [
                    _coding(PARTICIPATION_TYPE, "IRCP", "information recipient"),
                    _coding(BALP_USER_AGENT_TYPES, "UserOauthAgent", "User OAuth Agent participant"),
                ]
            },
            "who": who,
            "requestor": True,
        }
        if access.token_id:
            user["policy"] = [access.token_id]
        if purposes:
            user["purposeOfUse"] = purposes
        agents.append(user)
    client: dict[str, Any] = {"type": {"coding": [client_role]}, "requestor": not has_user}
    if access is not None and access.client_id:
        client["who"] = {"identifier": {"system": access.issuer, "value": access.client_id}}
    else:
        client["who"] = {"display": "unidentified client"}
    if access is not None and access.token_id and not has_user:
        client["policy"] = [access.token_id]  # a client's own token (backend services): its jti
    if client_address:
        client["network"] = {"address": client_address, "type": NETWORK_TYPE_IP}
    agents.append(client)
    server_agent: dict[str, Any] = {
        "type": {"coding": [server_role]},
        "who": {"display": server},
        "requestor": False,
    }
    if "://" in server:
        server_agent["network"] = {"address": server, "type": NETWORK_TYPE_URI}
    agents.append(server_agent)
    if access is not None and access.organization:
        agents.append(
            {
                "type": {"coding": [_coding(*ORGANIZATION_TYPE, "healthcare provider")]},
                "who": {
                    "identifier": {"system": ORG_SYSTEM, "value": access.organization},
                    "display": access.organization,
                },
                "requestor": False,
            }
        )
    return agents


def _touched_entities(touched: Mapping[str, int] | None) -> list[dict[str, Any]]:
    out = []
    for rtype, count in sorted((touched or {}).items()):
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise ValueError("touched counts must be non-negative integers")
        out.append(
            {
                "type": _coding(RESOURCE_TYPES, rtype, rtype),
                "role": _coding(OBJECT_ROLE, "4", "Domain Resource"),
                "detail": [{"type": "count", "valueString": str(count)}],
            }
        )
    return out


def audit_events(
    access: AccessContext | None,
    *,
    action: Action,
    interaction: str,
    patients: Sequence[str],
    touched: Mapping[str, int] | None,
    query: str | None,
    outcome: Outcome,
    request_id: str | None,
    purpose: str | Sequence[str] | None,
    break_glass_reason: str | None,
    recorded: datetime,
    touched_by_patient: Mapping[str, Mapping[str, int]] | None = None,
    server: str = "fhirbridge",
    client_address: str | None = None,
    break_glass_started: bool = True,
) -> list[dict[str, Any]]:
    """The AuditEvents of one access: one per distinct patient of ``patients`` (in order), or one without a
    patient when ``patients`` is empty (a search that matched nobody, a refusal before any patient was
    known).

    ``access`` is the verified token (None when there was none or it was refused); ``action`` ``R`` for a
    read, ``E`` for a search or an operation; ``interaction`` a restful-interaction code; ``patients``
    Patient ids (or ``Patient/<id>`` references); ``touched`` resource type -> count returned (for every
    patient, unless ``touched_by_patient`` gives a patient its own); ``query`` the request as received
    (``GET /Patient/1/$everything?_type=Observation``); ``purpose`` the purpose of use, a v3 ActReason
    code (``TREAT``) or ``system|code``, or several (the token's ``purpose_of_use``); ``break_glass_reason`` not None for a break-the-glass access (the reason given, may be
    empty), with ``break_glass_started`` when this access opened the override (DICOM 110127) rather
    than read within it; ``recorded`` a timezone-aware time; ``server`` the service's FHIR base (or a name);
    ``client_address`` the client's IP address.

    Every event gets a new random id (so its hash, the audit log's leaf, cannot be guessed from its
    content). Raises ValueError for an unknown action, interaction or outcome, a naive ``recorded``, a
    malformed purpose or a negative count.
    """
    if action not in _ACTIONS:
        raise ValueError(f"unknown action {action!r}")
    if interaction not in INTERACTIONS:
        raise ValueError(f"unknown restful interaction {interaction!r}")
    if outcome not in OUTCOME_CODES:
        raise ValueError(f"unknown outcome {outcome!r}")
    when = _instant(recorded)
    codes: list[tuple[str, str]] = []
    for text in [purpose] if isinstance(purpose, str) else purpose or ():
        coding = _purpose_coding(text)
        if break_glass_reason is not None and (coding["system"], coding["code"]) == BREAK_GLASS:
            continue  # the break-the-glass coding below carries the reason
        codes.append((coding["system"], coding["code"]))
    reason = break_glass_reason.strip() if break_glass_reason is not None else None
    started = break_glass_reason is not None and break_glass_started
    read = interaction in READ_INTERACTIONS
    code = OUTCOME_CODES[outcome]
    query_b64 = base64.b64encode(query.encode("utf-8")).decode("ascii") if query else None

    # Every part is built anew for every event (no two events share a mutable part), by literals rather
    # than copies: copy.deepcopy made building cost 130 µs an event.
    def purposes() -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = [{"coding": [_coding(system, c)]} for system, c in codes]
        if break_glass_reason is not None:
            btg: dict[str, Any] = {"coding": [_coding(*BREAK_GLASS, "break the glass")]}
            if reason:
                btg["text"] = break_glass_reason
            out.append(btg)
        return out

    def event(patient: str | None) -> dict[str, Any]:
        subtype = [_coding(RESTFUL_INTERACTION, interaction, interaction)]
        if started:  # the access that opened the override; those within its window carry BTG only
            subtype.append(_coding(DCM, "110127", "Emergency Override Started"))
        ev: dict[str, Any] = {
            "resourceType": "AuditEvent",
            "id": str(uuid.uuid4()),
            "type": _coding(AUDIT_EVENT_TYPE, "rest", "Restful Operation"),
            "subtype": subtype,
            "action": action,
            "recorded": when,
            "outcome": code,
            "agent": _agents(
                access, read=read, purposes=purposes(), server=server, client_address=client_address
            ),
            "source": {
                "observer": {"display": server},
                "type": [_coding(SECURITY_SOURCE_TYPE, "4", "Application Server")],
            },
        }
        if outcome in _OUTCOME_DESC:
            ev["outcomeDesc"] = _OUTCOME_DESC[outcome]
        if codes or break_glass_reason is not None:
            ev["purposeOfEvent"] = purposes()
        entities: list[dict[str, Any]] = []
        if patient is not None:
            entities.append(
                {
                    "what": {"reference": f"Patient/{patient}"},
                    "type": _coding(AUDIT_ENTITY_TYPE, "1", "Person"),
                    "role": _coding(OBJECT_ROLE, "1", "Patient"),
                }
            )
        own = touched_by_patient.get(patient) if touched_by_patient and patient is not None else None
        entities.extend(_touched_entities(own if own is not None else touched))
        if query:
            entities.append(
                {
                    "type": _coding(AUDIT_ENTITY_TYPE, "2", "System Object"),
                    "role": _coding(OBJECT_ROLE, "24", "Query"),
                    "query": query_b64,
                    "description": query,
                }
            )
        if request_id:
            entities.append(
                {
                    "type": _coding(BALP_ENTITY_TYPES, "XrequestId"),
                    "what": {"identifier": {"value": request_id}},
                }
            )
        if entities:
            ev["entity"] = entities
        return ev

    ids: list[str | None] = list(
        dict.fromkeys(p.split("/", 1)[1] if p.startswith("Patient/") else p for p in patients)
    )
    return [event(patient) for patient in ids or [None]]


def summarize(event: Mapping[str, Any]) -> dict[str, Any]:
    """What an AuditEvent built by :func:`audit_events` says, for the access log: ``interaction``,
    ``action``, ``outcome`` (the code), ``fhir_user`` and ``client_id``, ``purpose`` codes (``system|code``
    outside v3 ActReason), ``break_glass`` and its ``break_glass_reason``, ``touched`` (type -> count),
    ``query`` and ``request_id``. Unknown or missing parts are left out or None, never an error."""
    out: dict[str, Any] = {
        "interaction": None,
        "action": event.get("action"),
        "outcome": event.get("outcome"),
        "fhir_user": None,
        "client_id": None,
        "purpose": [],
        "break_glass": False,
        "break_glass_reason": None,
        "touched": {},
        "query": None,
        "request_id": None,
    }
    for c in event.get("subtype") or ():
        if isinstance(c, dict) and c.get("system") == RESTFUL_INTERACTION:
            out["interaction"] = c.get("code")
    for reason in event.get("purposeOfEvent") or ():
        for c in reason.get("coding") or () if isinstance(reason, dict) else ():
            if (c.get("system"), c.get("code")) == BREAK_GLASS:
                out["break_glass"] = True
                out["break_glass_reason"] = reason.get("text")
            elif c.get("system") == ACT_REASON:
                out["purpose"].append(c.get("code"))
            else:
                out["purpose"].append(f"{c.get('system')}|{c.get('code')}")
    client_role = client_role_of(event)
    for agent in event.get("agent") or ():
        codes = {(c.get("system"), c.get("code")) for c in (agent.get("type") or {}).get("coding") or ()}
        who = agent.get("who") or {}
        if USER_TYPE in codes:
            out["fhir_user"] = who.get("reference")
        elif client_role in codes:
            out["client_id"] = (who.get("identifier") or {}).get("value")
    for entity in event.get("entity") or ():
        etype, role = entity.get("type") or {}, entity.get("role") or {}
        if etype.get("system") == RESOURCE_TYPES:
            for d in entity.get("detail") or ():
                if d.get("type") == "count" and str(d.get("valueString", "")).isdigit():
                    out["touched"][etype.get("code")] = int(d["valueString"])
        elif (role.get("system"), role.get("code")) == (OBJECT_ROLE, "24"):
            out["query"] = entity.get("description")
        elif (etype.get("system"), etype.get("code")) == (BALP_ENTITY_TYPES, "XrequestId"):
            out["request_id"] = ((entity.get("what") or {}).get("identifier") or {}).get("value")
    return out
