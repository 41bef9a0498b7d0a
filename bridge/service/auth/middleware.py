"""Every request carries an identity and a scope, checked before the handler reads anything.

The middleware finds the route's mark (:mod:`bridge.service.auth.policy`), lets public routes
through, and otherwise verifies the Bearer token (RFC 6750: 401 ``invalid_token`` for a missing, bad
or expired one), checks the route's need against the token's scopes (403 ``insufficient_scope``),
and, for a token with ``patient/`` scopes, resolves its compartment: the MPI person of its
``patient`` claim through MATCH links. A ``patient/`` token without a ``patient`` claim, or naming a
patient this service does not know, is refused with 401: fail closed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from bridge.errors import TransientError
from bridge.logging import get_logger
from bridge.service.auth.marks import AUTHENTICATED, PATH_TYPE, PUBLIC, Forbidden, Need, Unauthorized, mark_of
from bridge.service.auth.policy import Access
from bridge.service.auth.tokens import AccessContext, InvalidToken, TokenVerifier
from bridge.service.context import BACKEND, Backend

log = get_logger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ACCESS = web.RequestKey("access", Access)


@dataclass(frozen=True, slots=True)
class Authorization:
    """How the service authenticates: a token verifier, or (benchmarks only) nothing at all."""

    verifier: TokenVerifier | None

    @classmethod
    def off_for_benchmarks(cls) -> Authorization:
        """No authentication, hence no consent and no audit either: only for measuring what they cost
        (`benchmarks/bench_query.py`)."""
        return cls(None)


AUTHORIZATION = web.AppKey("authorization", Authorization)


def access_of(request: web.Request) -> Access | None:
    """The request's :class:`Access` (None only when authorization is off, in benchmarks)."""
    return request.get(ACCESS)


def _bearer(request: web.Request) -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("a Bearer access token is required")
    return token.strip()


async def _compartment(backend: Backend, context: AccessContext) -> frozenset[str]:
    patient = context.patient
    if not patient:
        raise Unauthorized("patient/ scopes need a patient claim")

    def lookup(be: Backend) -> frozenset[str] | None:
        if be.index().get("Patient", patient) is None:
            return None
        mpi = be.mpi()
        linked = mpi.linked_patient_ids(patient) if mpi is not None else be.index().identifier_linked(patient)
        return frozenset({patient, *linked})

    ids = await backend.run(lookup, backend)
    if ids is None:
        raise Unauthorized("the token's patient is not known to this service")
    return ids


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Authenticate, then check the route's need against the token, before the handler reads anything."""
    authorization: Authorization = request.app[AUTHORIZATION]
    route_handler: Any = request.match_info.handler
    mark = mark_of(route_handler)
    if mark == PUBLIC or request.match_info.http_exception is not None or authorization.verifier is None:
        return await handler(request)
    token = _bearer(request)
    try:
        context = await authorization.verifier.verify(token)
    except InvalidToken as exc:
        raise Unauthorized(exc.reason) from None
    except TransientError:
        log.warning("auth.issuer_unavailable")
        raise
    access = Access(context)
    if mark is None:  # an unmarked handler: deny by default
        raise Forbidden("this route is open to no token")
    if isinstance(mark, Need):
        rtype = request.match_info.get("type", "") if mark.resource_type == PATH_TYPE else mark.resource_type
        access.check(mark, rtype)
    elif mark != AUTHENTICATED:  # pragma: no cover - the marks are the three above
        raise Unauthorized("unknown route mark")
    if "patient" in context.scopes.contexts():
        access.compartment = await _compartment(request.app[BACKEND], context)
    request[ACCESS] = access
    return await handler(request)
