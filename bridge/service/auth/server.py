"""The embedded OAuth 2 authorization server's endpoints (docs/auth.md), for a single-machine install
without an identity provider of its own:

* ``POST /auth/token``: ``client_credentials`` with ``private_key_jwt`` (SMART Backend Services), and
  ``authorization_code`` with PKCE (SMART apps);
* ``GET /auth/authorize``: checks the authorization request and shows the sign-in form;
  ``POST /auth/authorize``: the form's answer; a redirect to the client with a code, or with an error;
* ``GET /auth/jwks``: the public keys of the tokens' signatures;
* ``GET /auth/.well-known/openid-configuration``: the issuer's metadata.

The protocol is authlib's (:mod:`bridge.service.auth.oauth`); each request builds the server in the
stores' thread pool (:func:`bridge.service.context.run_db`), where the store, the password hash and
the signatures do their blocking work. Errors are RFC 6749's JSON ``error`` and ``error_description``
(or a redirect to the client, when its redirect URI is known), never a traceback: these endpoints
answer OAuth clients, not FHIR clients, so they map their errors here rather than to OperationOutcomes.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any
from urllib.parse import urlsplit

import orjson
from aiohttp import web
from authlib.oauth2.rfc6749 import InvalidScopeError, OAuth2Error

from bridge.config import Settings
from bridge.errors import TransientError
from bridge.logging import get_logger
from bridge.service.auth.discovery import issuer_url, smart_configuration
from bridge.service.auth.keys import ALGORITHM, current_jwks, signing_keys
from bridge.service.auth.login import (
    CSRF_COOKIE,
    CSRF_FIELD,
    CSRF_MAX_AGE,
    FAILURE_WINDOW,
    FORM_FIELDS,
    MAX_FAILURES,
    PAGE_HEADERS,
    csrf_token,
    csrf_valid,
    login_page,
    message_page,
    new_cookie,
)
from bridge.service.auth.marks import public
from bridge.service.auth.oauth import (
    AuthorizationCode,
    EmbeddedAuthorizationServer,
    HttpRequest,
    OAuthUser,
    error_response,
    oauth_response,
    read_request,
    requested_purposes,
)
from bridge.service.context import SETTINGS, Backend, run_db
from bridge.stores.auth import AuthStore, AuthUser

log = get_logger(__name__)
routes = web.RouteTableDef()


def _auth_store(backend: Backend, settings: Settings) -> AuthStore:
    """The calling thread's auth store (the backend opens one per thread and closes it with the others)."""
    store: AuthStore = backend.auth()
    return store


def _server(
    backend: Backend,
    settings: Settings,
    base: str,
    token_url_seen: str | None = None,
    purposes: tuple[str, ...] = (),
) -> EmbeddedAuthorizationServer:
    return EmbeddedAuthorizationServer(
        _auth_store(backend, settings),
        signing_keys(settings),
        issuer=issuer_url(base),
        audience=base,
        lifetime=settings.auth.token_lifetime,
        token_url_seen=token_url_seen,
        purposes=purposes,
    )


def fhir_base(request: web.Request) -> str:
    """The FHIR base the issuer (``<base>/auth``), the tokens' ``aud`` and the endpoints' URLs are built
    on: the service's one base (:meth:`bridge.config.HttpSettings.fhir_base`), whatever host name the
    client used, so that every token names the audience the verifier checks."""
    return request.app[SETTINGS].http.fhir_base()


async def _answer(request: web.Request, work: Any) -> web.StreamResponse:
    """``work(backend, settings, base, http)`` in the thread pool, its failures as RFC 6749 errors."""
    settings = request.app[SETTINGS]
    base = fhir_base(request)
    try:
        http = await read_request(request, base)
        response: web.StreamResponse = await run_db(request, work, settings, base, http)
        return response
    except OAuth2Error as err:
        return error_response(err)
    except TransientError:
        log.warning("auth.store_unavailable", path=request.path)
        return oauth_response(
            503,
            {
                "error": "temporarily_unavailable",
                "error_description": "the authorization database is unavailable",
            },
        )
    except Exception:  # an OAuth client gets RFC 6749's server_error, never a traceback
        log.exception("auth.unhandled", path=request.path)
        return oauth_response(500, {"error": "server_error", "error_description": "internal error"})


# -- POST /auth/token -----------------------------------------------------------------------------
@routes.post("/auth/token")
@public
async def token(request: web.Request) -> web.StreamResponse:
    """The token endpoint (RFC 6749 section 3.2): client credentials or an authorization code."""
    return await _answer(request, _token)


def _token(backend: Backend, settings: Settings, base: str, http: HttpRequest) -> web.Response:
    server = _server(backend, settings, base, http.seen_url, requested_purposes(http))
    response: web.Response = server.create_token_response(http)
    return response


# -- GET|POST /auth/authorize ---------------------------------------------------------------------
@routes.get("/auth/authorize")
@public
async def authorize(request: web.Request) -> web.StreamResponse:
    """The authorization endpoint: the request is checked, then the sign-in form is shown."""
    return await _answer(request, _authorize_form)


@routes.post("/auth/authorize")
@public
async def authorize_signin(request: web.Request) -> web.StreamResponse:
    """The sign-in form's answer: a redirect to the client with a code (or an error), the form again
    after a wrong password, 429 after too many."""
    return await _answer(request, _authorize_signin)


def _authorize_form(backend: Backend, settings: Settings, base: str, http: HttpRequest) -> web.Response:
    server = _server(backend, settings, base)
    try:
        grant = server.get_consent_grant(http)
    except OAuth2Error as err:
        return error_response(err)
    return _form(server, grant, http, base)


def _authorize_signin(backend: Backend, settings: Settings, base: str, http: HttpRequest) -> web.Response:
    server = _server(backend, settings, base)
    store = server.store
    try:
        grant = server.get_consent_grant(http)
    except OAuth2Error as err:
        return error_response(err)
    client_id = grant.client.get_client_id()
    now = int(time.time())
    form = http.form
    if not csrf_valid(store.secret("csrf"), http.cookies.get(CSRF_COOKIE, ""), form.get(CSRF_FIELD, ""), now):
        log.warning("auth.signin_csrf_refused", client_id=client_id)
        page = message_page(
            "Sign-in expired",
            "This sign-in form has expired or did not come from this server. "
            "Go back to the application and start again.",
        )
        return _page(page, 400)
    username, password = form.get("username", ""), form.get("password", "")
    # the user id as typed is kept only as a digest: a password typed into the wrong field stays unreadable
    subjects = (
        f"user:{hashlib.sha256(username.encode()).hexdigest()}",
        f"address:{http.remote or 'unknown'}",
    )
    blocked = {
        s: oldest
        for s, (count, oldest) in store.login_failures(subjects, now - FAILURE_WINDOW).items()
        if count >= MAX_FAILURES
    }
    if blocked:
        retry_after = max(1, max(oldest + FAILURE_WINDOW - now for oldest in blocked.values()))
        log.warning(
            "auth.signin_rate_limited", client_id=client_id, by=sorted(s.split(":")[0] for s in blocked)
        )
        page = message_page(
            "Too many failed sign-ins",
            f"Too many failed sign-ins. Try again in {(retry_after + 59) // 60} minutes.",
        )
        return _page(page, 429, {"Retry-After": str(retry_after)})
    user = store.check_password(username, password) if username and password else None
    if user is None:
        store.record_login_failure(subjects, now=now)
        log.info("auth.signin_failed", client_id=client_id)
        return _form(
            server, grant, http, base, username=username, error="The user id or the password is wrong."
        )
    store.clear_login_failures(subjects[0])
    problem = _scope_problem(user, grant.request.scope or "")
    if problem:
        return error_response(
            InvalidScopeError(problem, redirect_uri=grant.redirect_uri, state=grant.request.payload.state)
        )
    log.info("auth.signin", client_id=client_id, user_kind=user.kind)
    response: web.Response = server.create_authorization_response(
        http, grant_user=OAuthUser(user), grant=grant
    )
    return response


def _scope_problem(user: AuthUser, scope: str) -> str | None:
    """Why ``user`` cannot be granted ``scope``, or None. A standalone patient launch needs a patient
    user (there is no patient picker); a patient is granted patient/ scopes, never user/ ones; only a
    steward may change the MPI's links (a Person write scope)."""
    scopes = scope.split()
    if "launch/patient" in scopes and user.kind != "patient":
        return "launch/patient needs a patient user: this server has no patient picker"
    if user.kind == "patient" and any(s.startswith("user/") for s in scopes):
        return "a patient user is granted patient/ scopes, not user/ scopes"
    if user.kind != "steward" and any(_writes_person(s) for s in scopes):
        return "changing the master patient index's links (Person writes) is for data stewards"
    return None


def _writes_person(scope: str) -> bool:
    """Whether a scope names Person explicitly with a write: ``user/Person.u`` (SMART v2 ``c``, ``u``,
    ``d`` in any order, a ``?`` narrowing aside) or ``user/Person.write``/``.*`` (v1). Wildcard types
    (``user/*.cruds``) are not Person writes by name and are left to the client's registration."""
    context, _, rest = scope.partition("/")
    if context not in ("user", "system") or not rest.startswith("Person."):
        return False
    perms = rest[len("Person.") :].split("?", 1)[0]
    return perms in ("write", "*") or any(c in perms for c in "cud")


def _form(
    server: EmbeddedAuthorizationServer,
    grant: AuthorizationCode,
    http: HttpRequest,
    base: str,
    *,
    username: str = "",
    error: str | None = None,
) -> web.Response:
    """The sign-in form for the checked request ``grant``, with a CSRF token for the browser's cookie
    (a new cookie when it sent none)."""
    cookie = http.cookies.get(CSRF_COOKIE) or new_cookie()
    source = http.form if http.method == "POST" else http.query
    page = login_page(
        action=f"{base}/auth/authorize",
        client_id=grant.client.get_client_id(),
        scopes=(grant.request.scope or "").split(),
        params=[(k, v) for k, v in source.items() if k not in FORM_FIELDS],
        csrf=csrf_token(server.store.secret("csrf"), cookie, int(time.time())),
        username=username,
        error=error,
    )
    response = _page(page, 200)
    response.set_cookie(
        CSRF_COOKIE,
        cookie,
        max_age=CSRF_MAX_AGE,
        path=f"{urlsplit(base).path.rstrip('/')}/auth/authorize",
        secure=base.startswith("https:"),
        httponly=True,
        samesite="Strict",
    )
    return response


def _page(page: str, status: int, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        text=page, status=status, content_type="text/html", headers={**PAGE_HEADERS, **(headers or {})}
    )


# -- keys and metadata ----------------------------------------------------------------------------
@routes.get("/auth/jwks")
@public
async def jwks(request: web.Request) -> web.Response:
    """The public keys that verify the access tokens: the active key, and the retired ones whose tokens
    may still be valid."""
    body = await run_db(request, _jwks, request.app[SETTINGS])
    return web.Response(
        body=orjson.dumps(body), content_type="application/json", headers={"Cache-Control": "max-age=60"}
    )


def _jwks(backend: Backend, settings: Settings) -> dict[str, Any]:
    return current_jwks(settings)


@routes.get("/auth/.well-known/openid-configuration")
@public
async def openid_configuration(request: web.Request) -> web.Response:
    """The issuer's metadata (OpenID Connect Discovery; RFC 8414's fields)."""
    return web.Response(
        body=orjson.dumps(issuer_metadata(fhir_base(request))), content_type="application/json"
    )


def issuer_metadata(base: str) -> dict[str, Any]:
    """The SMART configuration of ``base`` with what OpenID Connect Discovery requires besides."""
    meta = smart_configuration(base)
    meta.update(
        {
            "response_modes_supported": ["query"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": [ALGORITHM],
            "claims_supported": ["iss", "sub", "aud", "exp", "iat", "auth_time", "nonce", "fhirUser"],
        }
    )
    return meta
