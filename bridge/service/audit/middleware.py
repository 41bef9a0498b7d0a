"""Every access to patient data leaves AuditEvents, stored durably before the answer goes out.

The middleware sits between the error middleware and the authorization middleware, so it sees every
request to a route that needs a scope: allowed, refused for its token (401, 403) or failed. Handlers say
what the access touched with :func:`note` (the patients in the result, the types and counts per patient,
an open break-the-glass window); a request refused before its handler ran is recorded with what its path
names (``/Patient/{id}/...``: that patient). The events (:func:`~bridge.service.audit.events.audit_events`,
one per patient) are committed to the audit store in the stores' thread; only then is the response
released. If they cannot be stored, the answer is 503 and no data goes out.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from aiohttp import web

from bridge.errors import TransientError
from bridge.logging import get_logger
from bridge.metrics import AUDIT_FAILURES, BREAK_GLASS_ACCESSES
from bridge.service.audit.events import Action, Outcome, audit_events
from bridge.service.auth.marks import Need, mark_of
from bridge.service.auth.middleware import AUTHORIZATION, access_of
from bridge.service.context import BACKEND, base_url
from bridge.service.http import FhirHTTPError, check_query, error_response
from bridge.stores.breakglass import Window

log = get_logger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
REQUEST_ID_HEADER = "X-Request-Id"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


@dataclass
class AuditNote:
    """What a handler says its access touched."""

    interaction: str
    action: Action
    patients: list[str] = field(default_factory=list)
    touched: dict[str, int] | None = None
    touched_by_patient: dict[str, dict[str, int]] | None = None
    window: Window | None = None


NOTE = web.RequestKey("audit_note", AuditNote)


def note(
    request: web.Request,
    interaction: str,
    action: Action,
    *,
    patients: Sequence[str] = (),
    touched: Mapping[str, int] | None = None,
    touched_by_patient: Mapping[str, Mapping[str, int]] | None = None,
    window: Window | None = None,
) -> None:
    """Record what this request's access touched, for its AuditEvents (the last call wins)."""
    request[NOTE] = AuditNote(
        interaction,
        action,
        list(dict.fromkeys(patients)),
        dict(touched) if touched is not None else None,
        {p: dict(t) for p, t in touched_by_patient.items()} if touched_by_patient is not None else None,
        window,
    )


def _default_note(request: web.Request) -> AuditNote:
    """What a request names when its handler did not say (refused before it ran, or failed)."""
    path = request.path
    patients = []
    if request.match_info.get("type") in (None, "Patient") and path.startswith("/Patient/"):
        pid = request.match_info.get("id")
        if pid:
            patients.append(pid)
    if request.method == "PUT":
        return AuditNote("update", "U", patients)
    if "$" in path or request.method == "POST":
        return AuditNote("operation", "E", patients)
    if request.match_info.get("id") is not None:
        return AuditNote("read", "R", patients)
    return AuditNote("search-type", "E", patients)


def _status(exc: BaseException) -> int:
    if isinstance(exc, web.HTTPException):
        return exc.status
    known = error_response(exc)
    return known.status if known is not None else 500


def _outcome(status: int) -> Outcome:
    if status < 400:
        return "success"
    return "denied" if status in (401, 403) else "error"


def request_id_of(request: web.Request) -> str:
    """The request's id: the caller's ``X-Request-Id`` when it is a plain token, else a new one."""
    given = request.headers.get(REQUEST_ID_HEADER, "")
    return given if _REQUEST_ID.match(given) else uuid.uuid4().hex


@web.middleware
async def audit_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Audit each access to a route that needs a scope, then release its answer (module docstring)."""
    if (
        request.match_info.http_exception is not None
        or not isinstance(mark_of(request.match_info.handler), Need)
        or request.app[AUTHORIZATION].verifier is None  # benchmarks only: nothing checked, nothing audited
    ):
        return await handler(request)
    rid = request_id_of(request)
    error: BaseException | None = None
    response: web.StreamResponse | None = None
    try:
        response = await handler(request)
        status = response.status
    except Exception as exc:
        error = exc
        status = _status(exc)
    noted = request.get(NOTE) or _default_note(request)
    access = access_of(request)
    window = noted.window
    purposes: tuple[str, ...] = access.purposes if access is not None else ()
    try:
        events = audit_events(
            access.context if access is not None else None,
            action=noted.action,
            interaction=noted.interaction,
            patients=noted.patients,
            touched=noted.touched,
            touched_by_patient=noted.touched_by_patient,
            query=f"{request.method} {request.path_qs}",
            outcome=_outcome(status),
            request_id=rid,
            purpose=purposes,
            break_glass_reason=window.reason if window is not None else None,
            break_glass_started=window is not None and window.opened_now,
            recorded=datetime.now(UTC),
            server=base_url(request),
            client_address=request.remote,
        )
        backend = request.app[BACKEND]
        await backend.run(lambda be: be.audit().record(events), backend)
    except Exception as exc:  # the store down, or an event it refuses: either way nothing goes out
        AUDIT_FAILURES.inc()
        if window is not None and window.opened_now:  # an override whose start is not on record
            await _withdraw(request, window)
        resource = request.match_info.route.resource
        log.error(
            "audit.not_recorded",
            route=resource.canonical if resource else None,
            status=status,
            error=type(exc).__name__,
            transient=isinstance(exc, TransientError),
        )
        raise FhirHTTPError(
            503, "transient", "the access could not be audited, so nothing is released; retry later"
        ) from None
    if window is not None:
        BREAK_GLASS_ACCESSES.labels(started="true" if window.opened_now else "false").inc()
    if error is not None:
        raise error
    assert response is not None
    response.headers[REQUEST_ID_HEADER] = rid
    return response


async def _withdraw(request: web.Request, window: Window) -> None:
    backend = request.app[BACKEND]
    try:
        await backend.run(lambda be: be.break_glass().withdraw(window), backend)
    except Exception as exc:  # the audit database is down: the window was most likely not kept either
        log.error("break_glass.not_withdrawn", error=type(exc).__name__)


def open_patient_operation(
    request: web.Request, known: set[str], resource_type: str, interaction: str
) -> str:
    """The opening of a ``/Patient/{id}/$operation``: the query checked against ``known`` (and
    ``_format``), the access noted for the audit (the patient, before anything is read), the token's
    right to ``interaction`` on ``resource_type`` of that patient checked (the same refusal whether the
    patient exists or not). Returns the patient id."""
    check_query(request, known | {"_format"})
    pid = request.match_info["id"]
    note(request, "operation", "E", patients=[pid])
    access = access_of(request)
    if access is not None:
        access.require_patient(pid, resource_type, interaction)
    return pid


def patients_touched(resources: Sequence[tuple[str | None, str]], fallback: str) -> dict[str, dict[str, int]]:
    """Patient id -> resource type -> count, for ``(patient_id, resource_type)`` pairs (``fallback``
    for a resource without a patient)."""
    out: dict[str, dict[str, int]] = {}
    for pid, rtype in resources:
        counts = out.setdefault(pid or fallback, {})
        counts[rtype] = counts.get(rtype, 0) + 1
    return out
