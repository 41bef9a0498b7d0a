"""Signing in: the SMART authorization-code flow with PKCE (S256) against the embedded authorization
server, as a public client (``FHIRBRIDGE_UI_CLIENT_ID``, redirect URI ``<FHIR base>/app/callback``).

* ``GET /app/login``: a new sign-in in flight (state, verifier; cookie :data:`LOGIN_COOKIE`), then a
  redirect to the authorization endpoint.
* ``GET /app/callback``: the cookie's sign-in must be the one ``state`` names (no one else's code
  lands in this browser's session); the code is exchanged at the token endpoint with the verifier,
  and a session is made that lives as long as the token.
* ``POST /app/logout``: with the session's CSRF token; the session is forgotten.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from typing import Any
from urllib.parse import urlencode, urlsplit

import aiohttp_jinja2
import orjson
from aiohttp import web

from bridge.logging import get_logger
from bridge.service.auth.discovery import issuer_url
from bridge.service.auth.marks import public
from bridge.service.context import SETTINGS
from bridge.service.ui.api import token_request
from bridge.service.ui.session import CSRF_FIELD, LOGIN_COOKIE, SESSION_COOKIE, Session, SessionStore, csrf_ok

log = get_logger(__name__)
routes = web.RouteTableDef()
SESSIONS = web.AppKey("ui_sessions", SessionStore)
#: the cookies go to the app's pages only, never to the API or the authorization server
COOKIE_PATH = "/app"


def fhir_base(request: web.Request) -> str:
    base: str = request.app[SETTINGS].http.fhir_base()
    return base


def redirect_uri(request: web.Request) -> str:
    """The redirect URI the operator registers for the app's client."""
    return f"{fhir_base(request)}/app/callback"


def code_challenge(verifier: str) -> str:
    """RFC 7636 S256: base64url(SHA-256(verifier)) without padding."""
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()


def redirect(location: str, status: int = 303) -> web.Response:
    """A redirect response (returned, so that cookies can be set on it)."""
    return web.Response(status=status, headers={"Location": location})


def _secure(request: web.Request) -> bool:
    return request.secure or fhir_base(request).startswith("https:")


def current_session(request: web.Request) -> Session | None:
    return request.app[SESSIONS].get(request.cookies.get(SESSION_COOKIE, ""))


def safe_next(path: str) -> str:
    """``path`` when it is a path of this app (never another site's URL), else ``/app/``."""
    parts = urlsplit(path)
    segments = parts.path.split("/")
    if (
        parts.scheme
        or parts.netloc
        or not path.startswith("/app/")
        or "\\" in path
        or "." in segments
        or ".." in segments
        or "" in segments[2:-1]  # //: another site to a browser resolving it
        or not path.isprintable()
    ):
        return "/app/"
    return path


#: the purposes of use a sign-in may state (``?purpose=``): none (the issuer's default, treatment), or
#: emergency treatment, which the break-the-glass button needs (docs/consent.md)
SIGN_IN_PURPOSES = ("", "TREAT", "ETREAT")


@routes.get("/app/login")
@public
async def login(request: web.Request) -> web.StreamResponse:
    """Start a sign-in: a redirect to the authorization endpoint with state and a PKCE S256 challenge.
    ``?role=steward`` asks for the steward desk's scope too (the issuer grants it to stewards only);
    ``?purpose=ETREAT`` states emergency treatment, for breaking the glass."""
    settings = request.app[SETTINGS]
    role, purpose = request.query.get("role", ""), request.query.get("purpose", "")
    if role not in ("", "steward") or purpose not in SIGN_IN_PURPOSES:
        return _message(request, "Sign-in refused", "Unknown sign-in role or purpose of use.", 400)
    scope = settings.ui.scope + (f" {settings.ui.steward_scope}" if role == "steward" else "")
    key, pending = request.app[SESSIONS].begin_login(
        safe_next(request.query.get("next", "/app/")), purpose=purpose
    )
    query = {
        "response_type": "code",
        "client_id": settings.ui.client_id,
        "redirect_uri": redirect_uri(request),
        "scope": scope,
        "state": pending.state,
        "aud": fhir_base(request),
        "code_challenge": code_challenge(pending.verifier),
        "code_challenge_method": "S256",
    }
    if purpose:  # said in the authorization request too, and stated in the token request (callback)
        query["purpose_of_use"] = purpose
    response = redirect(f"{issuer_url(fhir_base(request))}/authorize?{urlencode(query)}", 302)
    response.set_cookie(
        LOGIN_COOKIE,
        key,
        max_age=600,
        path=COOKIE_PATH,
        httponly=True,
        samesite="Lax",  # the callback is a top-level navigation from the issuer (another site when external)
        secure=_secure(request),
    )
    return response


@routes.get("/app/callback")
@public
async def callback(request: web.Request) -> web.StreamResponse:
    """The authorization server's answer: exchange the code, start the session."""
    store = request.app[SESSIONS]
    pending = store.take_login(request.cookies.get(LOGIN_COOKIE, ""))
    state = request.query.get("state", "")
    if pending is None or not state or not hmac.compare_digest(state.encode(), pending.state.encode()):
        log.warning("ui.callback_refused", reason="state")
        return _message(
            request, "Sign-in not recognised", "This sign-in was not started here or has expired.", 400
        )
    if "error" in request.query:
        log.info("ui.callback_error", error=request.query.get("error", "")[:64])
        return _message(
            request, "Sign-in refused", request.query.get("error_description") or request.query["error"], 400
        )
    code = request.query.get("code", "")
    if not code:
        return _message(request, "Sign-in failed", "The authorization server sent no code.", 400)
    settings = request.app[SETTINGS]
    answer = await token_request(
        request,
        {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": redirect_uri(request),
            "client_id": settings.ui.client_id,
            "code_verifier": pending.verifier,
            # the IHE IUA purpose of use the embedded issuer writes into the token, stated where it
            # reads it: the token request (docs/auth.md)
            **({"purpose_of_use": pending.purpose} if pending.purpose else {}),
        },
    )
    token = answer.body.get("access_token")
    if answer.status != 200 or not isinstance(token, str):
        log.warning("ui.token_refused", status=answer.status, error=str(answer.body.get("error", ""))[:64])
        return _message(request, "Sign-in failed", answer.diagnostics(), 400)
    claims = _claims(token)
    expires_at = float(claims.get("exp") or time.time() + float(answer.body.get("expires_in") or 0))
    store.end(request.cookies.get(SESSION_COOKIE, ""))  # a new sign-in ends the session it replaces
    session = store.create(token, expires_at, str(claims.get("sub") or ""), _str(claims.get("fhirUser")))
    log.info("ui.signin", sessions=len(store))
    response = redirect(pending.next_path)
    response.del_cookie(LOGIN_COOKIE, path=COOKIE_PATH)
    response.set_cookie(
        SESSION_COOKIE,
        session.id,
        max_age=max(1, int(expires_at - time.time())),
        path=COOKIE_PATH,
        httponly=True,
        samesite="Lax",
        secure=_secure(request),
    )
    return response


@routes.post("/app/logout")
@public
async def logout(request: web.Request) -> web.StreamResponse:
    """End the session (the form carries its CSRF token)."""
    session = current_session(request)
    form = await request.post()
    if session is None:
        return redirect("/app/signed-out")
    if not csrf_ok(session, str(form.get(CSRF_FIELD, ""))):
        return csrf_refused(request)
    request.app[SESSIONS].end(session.id)
    response = redirect("/app/signed-out")
    response.del_cookie(SESSION_COOKIE, path=COOKIE_PATH)
    return response


@routes.get("/app/signed-out")
@public
async def signed_out(request: web.Request) -> web.StreamResponse:
    return _message(request, "Signed out", "You are signed out.", 200, sign_in=True)


def csrf_refused(request: web.Request) -> web.StreamResponse:
    route = request.match_info.route.resource
    log.warning("ui.csrf_refused", route=route.canonical if route is not None else "?")  # never the ids
    return _message(
        request,
        "Form refused",
        "This form did not come from this session. Reload the page and try again.",
        403,
    )


def _message(
    request: web.Request, title: str, message: str, status: int, *, sign_in: bool = False
) -> web.StreamResponse:
    return aiohttp_jinja2.render_template(
        "message.html",
        request,
        {"title": title, "message": message, "sign_in": sign_in or status == 400, "session": None},
        status=status,
    )


def _claims(token: str) -> dict[str, Any]:
    """The access token's claims, read for the session's expiry and the user's name only: the token is
    verified by the API on every use, so nothing here trusts it."""
    try:
        payload = token.split(".")[1]
        claims = orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError):
        return {}
    return claims if isinstance(claims, dict) else {}


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None
