"""Consent on every read: which of a person's resources a request may see, decided from the Consents in
the index at the time of the request (a Consent written a moment ago applies to the very next request).

A request gets a :class:`ConsentCheck` (who asks, why, the base policy, a break-the-glass reason) on the
event loop; in the stores' thread, :meth:`ConsentCheck.gate` reads the Consents of every record the MPI
links to the patient by MATCH (a POSSIBLE_MATCH neither shares data nor Consents), builds one
:class:`~bridge.service.consent.evaluate.ConsentPolicy`, and answers for each resource
(:meth:`ConsentGate.admits`). The rules (docs/consent.md):

* a patient reading their own record (a ``patient/`` token) is not subject to their Consents;
* an organisation always sees what it sent itself: Consents govern what the bridge shares between
  organisations, not an organisation's own records;
* every other resource of the person is decided by the Consents of all the person's records together:
  a Consent filed at one hospital covers the person's data from every source, and when two records'
  Consents disagree, deny wins (the stricter);
* a ``system/`` token must state its purpose of use; a ``user/`` token that states none reads for TREAT;
* break-the-glass: a clinician (``user/`` token) of an organisation in
  ``FHIRBRIDGE_BREAK_GLASS_ORGANIZATIONS``, whose token states ETREAT or BTG, opens a window with the
  ``X-Break-Glass-Reason`` header; for the window's length, that clinician's emergency-purpose reads of
  the person see everything. Opening it and every read in it are audited.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web

from bridge.config import Settings
from bridge.errors import FhirbridgeError
from bridge.service.auth.marks import Forbidden
from bridge.service.auth.policy import Access
from bridge.service.auth.purpose import EMERGENCY
from bridge.service.consent.evaluate import BoundPolicy, ConsentPolicy, Requester
from bridge.stores.breakglass import Window
from bridge.stores.index.store import StoredResource

#: the request header that gives the reason for breaking the glass
BREAK_GLASS_HEADER = "X-Break-Glass-Reason"
MAX_REASON = 500
#: the identifier system naming a source organisation (the adapters' Provenance uses it too)
ORG_SYSTEM = "urn:fhirbridge:org"
_SOURCE = re.compile(r"^urn:fhirbridge:([^:]+)$")
_ORG_REF = re.compile(r"(?:^|/)(Organization/[A-Za-z0-9\-.]{1,64})$")


class Withheld(FhirbridgeError):
    """A read of a resource the patient's Consent withholds from this requester (403, with the
    break-the-glass hint of :func:`suppressed_outcome`; never what was withheld or why)."""

    def __init__(self) -> None:
        super().__init__("withheld by the patient's consent")


def suppressed_outcome() -> dict[str, Any]:
    """The OperationOutcome that says some data was withheld, and how to ask for it (FHIR's
    operationoutcome-example-break-the-glass): never what, nor how much, nor why."""
    hint = "Additional information may be available using the Break-The-Glass Protocol"
    return {
        "resourceType": "OperationOutcome",
        "issue": [
            {
                "severity": "information",
                "code": "suppressed",
                "details": {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/v3-ActReason",
                            "code": "BTG",
                            "display": "Break the glass",
                        }
                    ],
                    "text": hint,
                },
            }
        ],
    }


def source_org_of(resource: Mapping[str, Any]) -> str | None:
    """The source organisation a stored resource came from (its ``meta.source``, ``urn:fhirbridge:<org>``)."""
    meta = resource.get("meta")
    source = meta.get("source") if isinstance(meta, Mapping) else None
    m = _SOURCE.match(source) if isinstance(source, str) else None
    return m.group(1) if m else None


@dataclass(frozen=True, slots=True)
class ConsentCheck:
    """What one request brings to the consent decision; :meth:`gate` runs it in the stores' thread."""

    requester: Requester
    #: ``issuer|subject``: whose break-the-glass window this is
    agent: str
    default: str
    base_url: str
    now: datetime
    #: the token states an emergency purpose and its organisation may break the glass
    may_break_glass: bool = False
    #: the ``X-Break-Glass-Reason`` of this request (opens a window)
    reason: str | None = None
    window_seconds: int = 3600
    #: the token's other purposes of use: a resource is admitted only when every purpose is permitted
    more_purposes: tuple[str, ...] = ()

    def gate(self, backend: Any, patient_ids: Sequence[str]) -> ConsentGate:
        """The gate for the person whose records are ``patient_ids`` (MATCH-linked, the asked one first)."""
        index = backend.index()
        consents = [
            orjson.loads(r.body) for r in index.resources_for_patients(patient_ids, types=["Consent"])
        ]
        window: Window | None = None
        if self.may_break_glass:
            store = backend.break_glass()
            now = int(self.now.timestamp())
            if self.reason is not None:
                window = store.open_window(
                    self.agent,
                    self.requester.organization or "",
                    patient_ids,
                    self.reason,
                    now=now,
                    seconds=self.window_seconds,
                )
            else:
                window = store.active(self.agent, patient_ids, now=now)
        if not consents and self.default == "permit":
            return ConsentGate(None, self.requester.organization, window)
        org_refs = _organization_refs(index, consents, self.base_url)
        r = self.requester
        own_refs = org_refs.get(r.organization or "", frozenset())
        policy = ConsentPolicy(consents, self.default, base_url=self.base_url)
        bound = tuple(
            policy.bind(Requester(r.organization, purpose, own_refs, r.practitioner), now=self.now)
            for purpose in (r.purpose, *self.more_purposes)
        )
        return ConsentGate(bound, r.organization, window, org_refs)


@dataclass(slots=True)
class ConsentGate:
    """The consent decision of one request over one person: :meth:`admits` each resource; ``withheld``
    counts those refused. With an open break-the-glass ``window``, everything is admitted."""

    #: one bound policy per purpose of use of the request (None: no Consent applies)
    policies: tuple[BoundPolicy, ...] | None
    own_org: str | None
    window: Window | None = None
    org_refs: Mapping[str, frozenset[str]] = field(default_factory=dict)
    withheld: int = 0

    @property
    def unrestricted(self) -> bool:
        """Whether every resource is admitted without looking (no Consent applies, or the glass is broken)."""
        if self.window is not None or self.policies is None:
            return True
        return all(p.constant is not None and p.constant.permit for p in self.policies)

    def admits(self, r: StoredResource) -> bool:
        """Whether the stored resource ``r`` may be returned (counted in ``withheld`` when not)."""
        if self.window is not None or self.policies is None or r.source_org == self.own_org:
            return True
        parsed: dict[str, Any] | None = None
        refs = self.org_refs.get(r.source_org, frozenset())
        for policy in self.policies:
            decision = policy.constant
            if decision is None:
                if parsed is None:
                    parsed = orjson.loads(r.body)
                decision = policy.decide(parsed, source=r.source_org, source_refs=refs)
            if not decision.permit:
                self.withheld += 1
                return False
        return True

    def admits_resource(self, resource: dict[str, Any], source_org: str | None) -> bool:
        """Whether ``resource`` (as stored, from ``source_org``) may be returned."""
        if self.window is not None or self.policies is None or (source_org and source_org == self.own_org):
            return True
        refs = self.org_refs.get(source_org or "", frozenset())
        for policy in self.policies:
            decision = policy.constant or policy.decide(resource, source=source_org, source_refs=refs)
            if not decision.permit:
                self.withheld += 1
                return False
        return True


def _organization_refs(
    index: Any, consents: Iterable[Mapping[str, Any]], base_url: str
) -> dict[str, frozenset[str]]:
    """Source organisation id -> the ``Organization/<id>`` references of the Consents that denote it: an
    Organization we hold that carries the identifier ``urn:fhirbridge:org|<org id>``."""
    refs: set[str] = set()
    for consent in consents:
        _collect_org_refs(consent.get("provision"), base_url, refs)
    out: dict[str, set[str]] = {}
    for ref in sorted(refs):
        org = index.get("Organization", ref.split("/", 1)[1])
        for ident in (org or {}).get("identifier") or ():
            if (
                isinstance(ident, dict)
                and ident.get("system") == ORG_SYSTEM
                and isinstance(ident.get("value"), str)
            ):
                out.setdefault(ident["value"], set()).add(ref)
    return {k: frozenset(v) for k, v in out.items()}


def _collect_org_refs(node: Any, base_url: str, out: set[str]) -> None:
    if isinstance(node, dict):
        value = node.get("reference")
        if isinstance(value, str) and (
            not value.startswith(("http:", "https:")) or value.startswith(base_url)
        ):
            m = _ORG_REF.search(value)
            if m:
                out.add(m.group(1))
        for v in node.values():
            if isinstance(v, dict | list):
                _collect_org_refs(v, base_url, out)
    elif isinstance(node, list):
        for v in node:
            _collect_org_refs(v, base_url, out)


def consent_check(
    request: web.Request, access: Access | None, settings: Settings, base_url: str
) -> ConsentCheck | None:
    """The request's :class:`ConsentCheck`, or None when no Consent applies to it: authorization off
    (benchmarks) or a ``patient/`` token (the patient reads their own record). Raises :class:`Forbidden`
    for a ``system/`` token that states no purpose of use, and for a break-the-glass reason the token
    may not give (not a clinician's ``user/`` token, no emergency purpose, an organisation not allowed)."""
    if access is None:
        return None
    contexts = access.scopes.contexts()
    if not contexts & {"user", "system"}:
        return None
    purposes = access.purposes
    if not purposes:
        raise Forbidden(
            "a system/ token must state its purpose of use (purpose_of_use, a v3-ActReason code such as TREAT)"
        )
    context = access.context
    reason = request.headers.get(BREAK_GLASS_HEADER)
    emergency = "user" in contexts and bool(EMERGENCY.intersection(purposes))
    allowed = emergency and context.organization in settings.consent.break_glass_organizations
    if reason is not None:
        reason = reason.strip()
        if not reason:
            raise Forbidden(f"{BREAK_GLASS_HEADER} must say why the glass is broken")
        if len(reason) > MAX_REASON or not reason.isprintable():
            raise Forbidden(f"{BREAK_GLASS_HEADER} must be printable text of at most {MAX_REASON} characters")
        if not emergency:
            raise Forbidden("breaking the glass needs a user/ token whose purpose of use is ETREAT or BTG")
        if not allowed:
            raise Forbidden("this organisation's clinicians may not break the glass on this service")
    purpose, *more = purposes
    fhir_user = context.fhir_user
    practitioner = (
        fhir_user if fhir_user and fhir_user.startswith(("Practitioner/", "PractitionerRole/")) else None
    )
    return ConsentCheck(
        requester=Requester(context.organization, purpose, practitioner=practitioner),
        agent=f"{context.issuer}|{context.subject or context.client_id or ''}",
        default=settings.consent.default,
        base_url=base_url,
        now=datetime.now(UTC),
        may_break_glass=allowed,
        reason=reason,
        window_seconds=settings.consent.break_glass_minutes * 60,
        more_purposes=tuple(more),
    )
