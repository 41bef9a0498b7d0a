"""The service's one HTTP shape: responses, OperationOutcomes, the error table, the parameter parsers.

Handlers raise; :func:`error_response` (called by the application's error middleware) answers from
:data:`ERRORS`, the one table that maps an exception to a status and an OperationOutcome. Parameters
are read with the parsers below, so that every route refuses the same bad input the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web

from bridge.errors import FhirbridgeError, TransientError
from bridge.service.auth.marks import Forbidden, Unauthorized
from bridge.service.auth.tokens import IssuerUnavailable
from bridge.service.consent.enforce import Withheld, suppressed_outcome
from bridge.service.fhir.dates import DATE, interval
from bridge.stores.mpi.config import MpiConflict, MpiError, MpiInputError, MpiNotFound
from ledger.errors import InvalidEntry, LedgerError, OutOfRange, StorageUnavailable, VerificationError

FHIR_JSON = "application/fhir+json"


def fhir_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """Serialise ``body`` with orjson as ``application/fhir+json``."""
    return web.Response(
        body=orjson.dumps(body),
        status=status,
        content_type=FHIR_JSON,
        charset="utf-8",
        headers=headers,
    )


def json_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def operation_outcome(
    severity: str, code: str, diagnostics: str, *, expression: list[str] | None = None
) -> dict[str, Any]:
    issue: dict[str, Any] = {"severity": severity, "code": code, "diagnostics": diagnostics}
    if expression:
        issue["expression"] = expression
    return {"resourceType": "OperationOutcome", "issue": [issue]}


def outcome_response(status: int, code: str, diagnostics: str, *, severity: str = "error") -> web.Response:
    """An OperationOutcome error response. ``code`` is a FHIR issue-type code (not-found, invalid, ...)."""
    return fhir_response(operation_outcome(severity, code, diagnostics), status=status)


class FhirHTTPError(FhirbridgeError):
    """Raise from a handler to answer with an OperationOutcome; the middleware renders it."""

    def __init__(self, status: int, code: str, diagnostics: str) -> None:
        super().__init__(diagnostics)
        self.status = status
        self.code = code
        self.diagnostics = diagnostics


#: exception class -> (status, FHIR issue-type code, diagnostics); the first class that matches wins
ERRORS: list[tuple[type[BaseException], int, str, Callable[[BaseException], str]]] = [
    (IssuerUnavailable, 503, "transient", lambda e: "the token's issuer cannot be reached; retry later"),
    (OutOfRange, 404, "not-found", str),
    (StorageUnavailable, 503, "transient", lambda e: "the ledger database is unavailable; retry later"),
    (TransientError, 503, "transient", lambda e: "a database is unavailable; retry later"),
    (VerificationError, 422, "processing", lambda e: f"rejected: {e}"),
    (InvalidEntry, 500, "exception", lambda e: f"stored entry is invalid: {e}"),
    (LedgerError, 500, "exception", str),
    (MpiNotFound, 404, "not-found", str),
    (MpiConflict, 409, "conflict", str),
    (MpiInputError, 400, "invalid", str),
    (MpiError, 500, "exception", str),
]


def _bearer_challenge(error: str, description: str) -> str:
    """An RFC 6750 ``WWW-Authenticate`` value (the description is ours, never the token's content)."""
    safe = description.replace("\\", "").replace('"', "'")
    return f'Bearer realm="fhirbridge", error="{error}", error_description="{safe}"'


def error_response(exc: BaseException) -> web.Response | None:
    """The OperationOutcome answer to ``exc``, or None when the table does not know it (a 500)."""
    if isinstance(exc, FhirHTTPError):
        return outcome_response(exc.status, exc.code, exc.diagnostics)
    if isinstance(exc, Unauthorized):
        return fhir_response(
            operation_outcome("error", "login", f"authentication needed: {exc.reason}"),
            status=401,
            headers={"WWW-Authenticate": _bearer_challenge("invalid_token", exc.reason)},
        )
    if isinstance(exc, Withheld):
        return fhir_response(suppressed_outcome(), status=403)
    if isinstance(exc, Forbidden):
        return fhir_response(
            operation_outcome("error", "forbidden", str(exc)),
            status=403,
            headers={"WWW-Authenticate": _bearer_challenge("insufficient_scope", str(exc))},
        )
    for cls, status, code, diagnostics in ERRORS:
        if isinstance(exc, cls):
            return outcome_response(status, code, diagnostics(exc))
    return None


# -- the one set of parameter parsers ------------------------------------------------------------
#: ``_format`` values meaning JSON (the only format served)
JSON_FORMATS = {"json", "application/json", "application/fhir+json", "application/json+fhir"}


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


def date_param(request: web.Request, name: str) -> str | None:
    value = request.query.get(name)
    if value is None:
        return None
    if not DATE.fullmatch(value):
        raise FhirHTTPError(400, "invalid", f"parameter {name}: {value!r} is not a FHIR date or dateTime")
    try:
        interval(value)
    except ValueError:
        raise FhirHTTPError(400, "invalid", f"parameter {name}: {value!r} is not a valid date") from None
    return value


def int_param(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
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


_MAX_INDEX = 2**63  # the databases' BIGINT


def _index(raw: str) -> int | None:
    """A non-negative integer written in ASCII digits that fits a BIGINT, else None (``str.isdigit``
    also accepts characters such as ``²``, which ``int`` refuses)."""
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 19:
        return None
    value = int(raw)
    return value if value < _MAX_INDEX else None


def query_index(request: web.Request, name: str) -> int:
    """A required query parameter that is a non-negative integer below 2**63 (400 otherwise)."""
    raw = request.query.get(name)
    if raw is None:
        raise FhirHTTPError(400, "invalid", f"query parameter {name!r} is required")
    value = _index(raw)
    if value is None:
        raise FhirHTTPError(
            400, "invalid", f"query parameter {name!r} must be a non-negative integer below 2**63"
        )
    return value


def path_index(request: web.Request, name: str) -> int:
    """A path segment that is a non-negative integer below 2**63 (400 otherwise)."""
    value = _index(request.match_info[name])
    if value is None:
        raise FhirHTTPError(400, "invalid", f"the entry {name} must be a non-negative integer below 2**63")
    return value


async def read_body(request: web.Request, limit: int) -> bytes:
    """The request body, refused with 400 beyond ``limit`` bytes (without reading more than that)."""
    if request.content_length is not None and request.content_length > limit:
        raise FhirHTTPError(400, "invalid", "body too large")
    body = await request.content.read(limit + 1)
    if len(body) > limit:
        raise FhirHTTPError(400, "invalid", "body too large")
    return body
