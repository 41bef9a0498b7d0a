"""The embedded authorization server end to end over HTTP: SMART Backend Services (client credentials
with private_key_jwt), the authorization code flow with PKCE through the sign-in form, the published
keys and their rotation. The app is the auth routes over the service's context keys, on SQLite and
PostgreSQL."""

from __future__ import annotations

import re
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from authlib.oauth2.rfc7636 import create_s256_code_challenge
from joserfc import jwt
from joserfc.jwk import ECKey, KeySet, RSAKey

from bridge.config import Settings
from bridge.service.auth import keys, server
from bridge.service.auth.login import CSRF_COOKIE, FAILURE_WINDOW, MAX_FAILURES
from bridge.service.auth.oauth import LEEWAY, MAX_ASSERTION_AHEAD
from bridge.service.context import ALLOWED_HOSTS, BACKEND, SETTINGS, Backend
from bridge.stores.auth import AuthClient, AuthStore, AuthUser

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
REDIRECT = "http://127.0.0.1:9/callback"
APP_SCOPES = ("openid", "fhirUser", "launch/patient", "patient/*.rs", "user/*.rs")
PASSWORD = "correct horse battery"


class Env:
    """The running app, its store (another connection to the same database) and its URLs."""

    def __init__(self, client: TestClient, store: AuthStore, settings: Settings) -> None:
        self.client, self.store, self.settings = client, store, settings
        # the service's one base, whatever address the test server got (HttpSettings.fhir_base)
        self.base = settings.http.fhir_base()
        self.issuer = f"{self.base}/auth"
        self.token_url = f"{self.issuer}/token"

    async def jwks(self) -> KeySet:
        resp = await self.client.get("/auth/jwks")
        assert resp.status == 200
        body = await resp.json()
        assert all("d" not in k for k in body["keys"])  # public keys only
        return KeySet.import_key_set(body)

    async def token(self, **form: str) -> tuple[int, dict[str, Any]]:
        resp = await self.client.post("/auth/token", data=form)
        assert resp.content_type == "application/json"
        assert resp.headers["Cache-Control"] == "no-store"
        return resp.status, await resp.json()


@pytest.fixture(params=["sqlite", "postgres"])
async def env(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Env]:
    vars = {"FHIRBRIDGE_DATA_DIR": str(tmp_path)}
    if request.param == "postgres":
        vars["FHIRBRIDGE_AUTH_URL"] = request.getfixturevalue("pg_dsn")
    settings = Settings.from_env(vars)
    app = web.Application()
    app[SETTINGS] = settings
    app[ALLOWED_HOSTS] = None
    backend = Backend(settings)
    app[BACKEND] = backend
    app.add_routes(server.routes)

    async def _close(_: web.Application) -> None:
        backend.close()

    app.on_cleanup.append(_close)
    store = AuthStore.open(settings.auth.url)
    async with TestClient(TestServer(app)) as client:
        yield Env(client, store, settings)
    store.close()


# -- SMART Backend Services -----------------------------------------------------------------------
def _client_key(alg: str) -> RSAKey | ECKey:
    if alg == "RS384":
        return RSAKey.generate_key(2048, {"alg": "RS384"}, auto_kid=True)
    return ECKey.generate_key("P-384", {"alg": "ES384"}, auto_kid=True)


def _register_backend(env: Env, alg: str = "ES384", cid: str = "bulk-export") -> RSAKey | ECKey:
    key = _client_key(alg)
    env.store.add_client(
        AuthClient(
            cid,
            "confidential-asymmetric",
            ("system/*.rs", "system/Patient.rs"),
            jwks={"keys": [key.as_dict(private=False)]},
        )
    )
    return key


def _assertion(key: RSAKey | ECKey, claims: dict[str, Any], alg: str | None = None) -> str:
    alg = alg or ("RS384" if isinstance(key, RSAKey) else "ES384")
    return jwt.encode({"alg": alg, "kid": key.kid, "typ": "JWT"}, claims, key, algorithms=[alg])


def _claims(env: Env, cid: str = "bulk-export", **over: Any) -> dict[str, Any]:
    claims = {
        "iss": cid,
        "sub": cid,
        "aud": env.token_url,
        "exp": int(time.time()) + 300,
        "jti": uuid.uuid4().hex,
    }
    claims.update(over)
    return {k: v for k, v in claims.items() if v is not None}


def _cc_form(assertion: str, scope: str = "system/*.rs") -> dict[str, str]:
    return {
        "grant_type": "client_credentials",
        "scope": scope,
        "client_assertion_type": ASSERTION_TYPE,
        "client_assertion": assertion,
    }


@pytest.mark.parametrize("alg", ["RS384", "ES384"])
async def test_backend_services_token_honours_the_contract(env: Env, alg: str) -> None:
    key = _register_backend(env, alg)
    before = int(time.time())
    status, body = await env.token(**_cc_form(_assertion(key, _claims(env))))
    assert status == 200, body
    assert body["token_type"] == "Bearer"
    assert body["scope"] == "system/*.rs"
    assert 0 < body["expires_in"] <= 300
    assert "refresh_token" not in body and "id_token" not in body

    token = jwt.decode(body["access_token"], await env.jwks(), algorithms=["ES256"])
    assert token.header["alg"] == "ES256" and token.header["typ"] == "at+jwt"
    assert token.header["kid"] == keys.signing_keys(env.settings).kid
    claims = token.claims
    assert claims["iss"] == env.issuer
    assert claims["aud"] == env.base
    assert claims["sub"] == claims["client_id"] == "bulk-export"
    assert claims["scope"] == "system/*.rs"
    assert before <= claims["iat"] <= int(time.time())
    assert claims["exp"] - claims["iat"] <= 300
    assert claims["jti"]
    assert "patient" not in claims and "fhirUser" not in claims


async def test_several_scopes_within_the_registration_are_granted(env: Env) -> None:
    key = _register_backend(env)
    status, body = await env.token(**_cc_form(_assertion(key, _claims(env)), "system/Patient.rs system/*.rs"))
    assert status == 200 and body["scope"] == "system/Patient.rs system/*.rs"


async def test_scope_beyond_the_registration_is_refused_not_narrowed(env: Env) -> None:
    key = _register_backend(env)
    status, body = await env.token(**_cc_form(_assertion(key, _claims(env)), "system/*.rs system/*.cud"))
    assert status == 400 and body["error"] == "invalid_scope"
    assert "system/*.cud" not in body.get("error_description", "")
    status, body = await env.token(**_cc_form(_assertion(key, _claims(env)), ""))
    assert status == 400 and body["error"] == "invalid_scope"


async def test_assertion_expiring_more_than_five_minutes_ahead_is_refused(env: Env) -> None:
    key = _register_backend(env)
    too_far = int(time.time()) + MAX_ASSERTION_AHEAD + LEEWAY + 5
    status, body = await env.token(**_cc_form(_assertion(key, _claims(env, exp=too_far))))
    assert status in (400, 401) and body["error"] == "invalid_client"
    assert "exp" in body["error_description"]


async def test_expired_assertion_is_refused(env: Env) -> None:
    key = _register_backend(env)
    status, body = await env.token(
        **_cc_form(_assertion(key, _claims(env, exp=int(time.time()) - LEEWAY - 5)))
    )
    assert status in (400, 401) and body["error"] == "invalid_client"


async def test_reused_jti_is_refused(env: Env) -> None:
    key = _register_backend(env)
    claims = _claims(env)
    status, _ = await env.token(**_cc_form(_assertion(key, claims)))
    assert status == 200
    # the same assertion again, and a new signature over the same jti
    for assertion in (_assertion(key, claims), _assertion(key, {**claims, "exp": claims["exp"] - 1})):
        status, body = await env.token(**_cc_form(assertion))
        assert status in (400, 401) and body["error"] == "invalid_client"


async def test_missing_jti_is_refused(env: Env) -> None:
    key = _register_backend(env)
    status, body = await env.token(**_cc_form(_assertion(key, _claims(env, jti=None))))
    assert status in (400, 401) and body["error"] == "invalid_client"


@pytest.mark.parametrize("aud", ["base", "issuer", "elsewhere"])
async def test_wrong_audience_is_refused(env: Env, aud: str) -> None:
    key = _register_backend(env)
    value = {"base": env.base, "issuer": env.issuer, "elsewhere": "https://other.example/auth/token"}[aud]
    claims = _claims(env, aud=value)
    status, body = await env.token(**_cc_form(_assertion(key, claims)))
    assert status in (400, 401) and body["error"] == "invalid_client"
    # a refused assertion did not spend its jti: the same jti with the right aud is accepted
    status, _ = await env.token(**_cc_form(_assertion(key, {**claims, "aud": env.token_url})))
    assert status == 200


async def test_unregistered_client_is_refused(env: Env) -> None:
    key = _register_backend(env)
    status, body = await env.token(**_cc_form(_assertion(key, _claims(env, cid="stranger"))))
    assert status in (400, 401) and body["error"] == "invalid_client"


@pytest.mark.parametrize("kid", ["same", "other"])
async def test_key_not_in_the_clients_jwks_is_refused(env: Env, kid: str) -> None:
    _register_backend(env)
    registered = env.store.client("bulk-export").jwks["keys"][0]["kid"]  # type: ignore[union-attr]
    intruder = ECKey.generate_key("P-384", {"alg": "ES384", "kid": registered if kid == "same" else "x"})
    status, body = await env.token(**_cc_form(_assertion(intruder, _claims(env))))
    assert status in (400, 401) and body["error"] == "invalid_client"


async def test_iss_other_than_sub_is_refused(env: Env) -> None:
    key = _register_backend(env)
    status, body = await env.token(**_cc_form(_assertion(key, _claims(env, iss="someone-else"))))
    assert status in (400, 401) and body["error"] == "invalid_client"


async def test_assertion_algorithm_outside_rs384_es384_is_refused(env: Env) -> None:
    key = RSAKey.generate_key(2048, {"alg": "RS256"}, auto_kid=True)
    env.store.add_client(
        AuthClient("rs256", "confidential-asymmetric", ("system/*.rs",), jwks={"keys": [key.as_dict()]})
    )
    status, body = await env.token(**_cc_form(_assertion(key, _claims(env, cid="rs256"), alg="RS256")))
    assert status in (400, 401) and body["error"] == "invalid_client"
    assert "RS384" in body["error_description"]


async def test_hostile_kid_is_not_echoed_and_breaks_nothing(env: Env) -> None:
    key = _register_backend(env)
    token = jwt.encode({"alg": "ES384", "kid": 'x"\\<script>'}, _claims(env), key, algorithms=["ES384"])
    status, body = await env.token(**_cc_form(token))
    assert status in (400, 401) and body["error"] == "invalid_client"
    assert "script" not in body["error_description"]


async def test_public_client_cannot_use_client_credentials(env: Env) -> None:
    env.store.add_client(AuthClient("app", "public", APP_SCOPES, (REDIRECT,)))
    status, body = await env.token(grant_type="client_credentials", client_id="app", scope="patient/*.rs")
    assert status in (400, 401) and body["error"] in ("invalid_client", "unauthorized_client")


async def test_client_jwks_fetched_from_its_uri(env: Env) -> None:
    key = _client_key("ES384")
    published = web.Application()

    async def serve_jwks(request: web.Request) -> web.Response:
        return web.json_response({"keys": [key.as_dict(private=False)]})

    published.router.add_get("/jwks.json", serve_jwks)
    async with TestServer(published) as jwks_server:
        uri = str(jwks_server.make_url("/jwks.json"))
        env.store.add_client(AuthClient("remote", "confidential-asymmetric", ("system/*.rs",), jwks_uri=uri))
        status, body = await env.token(**_cc_form(_assertion(key, _claims(env, cid="remote"))))
    assert status == 200, body


async def test_form_body_required(env: Env) -> None:
    resp = await env.client.post("/auth/token", json={"grant_type": "client_credentials"})
    assert resp.status == 400 and (await resp.json())["error"] == "invalid_request"
    resp = await env.client.post(
        "/auth/token", data={"grant_type": "password", "username": "a", "password": "b"}
    )
    assert resp.status == 400 and (await resp.json())["error"] == "unsupported_grant_type"


# -- authorization code with PKCE -----------------------------------------------------------------
class _Form(HTMLParser):
    """The sign-in form's action and fields."""

    def __init__(self) -> None:
        super().__init__()
        self.action = ""
        self.fields: dict[str, str] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "form":
            self.action = a.get("action") or ""
        if tag == "input" and a.get("name"):
            self.fields[str(a["name"])] = a.get("value") or ""


def _parse_form(page: str) -> _Form:
    form = _Form()
    form.feed(page)
    return form


def _setup_app(env: Env) -> None:
    env.store.add_client(AuthClient("app", "public", APP_SCOPES, (REDIRECT,)))
    env.store.add_user(AuthUser("jane", "patient", patient_id="p123"), PASSWORD)
    env.store.add_user(AuthUser("dr-who", "clinician", "st-mary", "Practitioner/7"), PASSWORD)


def _authorize_query(env: Env, verifier: str, **over: str | None) -> dict[str, str]:
    query = {
        "response_type": "code",
        "client_id": "app",
        "redirect_uri": REDIRECT,
        "scope": "launch/patient openid fhirUser patient/*.rs",
        "state": "st-42",
        "aud": env.base,
        "code_challenge": create_s256_code_challenge(verifier),
        "code_challenge_method": "S256",
        "nonce": "n-0S6",
    }
    query.update(over)  # type: ignore[arg-type]
    return {k: v for k, v in query.items() if v is not None}


async def _sign_in(env: Env, query: dict[str, str], user: str, password: str = PASSWORD) -> Any:
    resp = await env.client.get("/auth/authorize", params=query)
    assert resp.status == 200, await resp.text()
    assert resp.content_type == "text/html"
    form = _parse_form(await resp.text())
    assert form.action == f"{env.base}/auth/authorize"
    fields = {**form.fields, "username": user, "password": password}
    return await env.client.post("/auth/authorize", data=fields, allow_redirects=False)


def _redirect_params(resp: Any) -> dict[str, str]:
    assert resp.status == 302
    location = resp.headers["Location"]
    assert location.startswith(REDIRECT + "?")
    return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}


async def _code_flow(env: Env, user: str = "jane", **over: str | None) -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    resp = await _sign_in(env, _authorize_query(env, verifier, **over), user)
    params = _redirect_params(resp)
    assert params["state"] == "st-42"
    return params["code"], verifier


def _code_form(code: str, verifier: str, redirect: str = REDIRECT) -> dict[str, str]:
    return {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": redirect,
        "client_id": "app",
        "code_verifier": verifier,
    }


async def test_standalone_patient_launch_end_to_end(env: Env) -> None:
    _setup_app(env)
    code, verifier = await _code_flow(env)
    status, body = await env.token(**_code_form(code, verifier))
    assert status == 200, body
    assert body["token_type"] == "Bearer" and 0 < body["expires_in"] <= 300
    assert body["scope"] == "launch/patient openid fhirUser patient/*.rs"
    assert body["patient"] == "p123"
    assert "refresh_token" not in body

    jwks = await env.jwks()
    claims = jwt.decode(body["access_token"], jwks, algorithms=["ES256"]).claims
    assert claims["iss"] == env.issuer and claims["aud"] == env.base
    assert claims["sub"] == "jane" and claims["client_id"] == "app"
    assert claims["patient"] == "p123" and claims["fhirUser"] == "Patient/p123"
    assert claims["scope"] == body["scope"]
    assert claims["exp"] - claims["iat"] <= 300

    id_token = jwt.decode(body["id_token"], jwks, algorithms=["ES256"])
    assert id_token.header["kid"] == keys.signing_keys(env.settings).kid
    assert id_token.claims["iss"] == env.issuer and id_token.claims["aud"] == ["app"]
    assert id_token.claims["sub"] == "jane" and id_token.claims["nonce"] == "n-0S6"
    assert id_token.claims["fhirUser"] == f"{env.base}/Patient/p123"


async def test_clinician_gets_fhir_user_and_no_patient(env: Env) -> None:
    _setup_app(env)
    code, verifier = await _code_flow(env, "dr-who", scope="openid fhirUser user/*.rs")
    status, body = await env.token(**_code_form(code, verifier))
    assert status == 200, body
    claims = jwt.decode(body["access_token"], await env.jwks(), algorithms=["ES256"]).claims
    assert claims["fhirUser"] == "Practitioner/7" and "patient" not in claims and "patient" not in body
    # the clinician's organisation, which the verifier reads for this issuer only
    assert claims["extensions"]["ihe_iua"]["subject_organization_id"] == "st-mary"


async def test_clinician_states_a_purpose_at_the_token_request(env: Env) -> None:
    _setup_app(env)
    code, verifier = await _code_flow(env, "dr-who", scope="openid fhirUser user/*.rs")
    status, body = await env.token(**_code_form(code, verifier), purpose_of_use="ETREAT")
    assert status == 200, body
    claims = jwt.decode(body["access_token"], await env.jwks(), algorithms=["ES256"]).claims
    assert [c["code"] for c in claims["extensions"]["ihe_iua"]["purpose_of_use"]] == ["ETREAT"]


async def test_launch_patient_needs_a_patient_user(env: Env) -> None:
    _setup_app(env)
    verifier = secrets.token_urlsafe(48)
    resp = await _sign_in(env, _authorize_query(env, verifier), "dr-who")
    params = _redirect_params(resp)
    assert params["error"] == "invalid_scope" and params["state"] == "st-42" and "code" not in params


async def test_patient_user_is_not_granted_user_scopes(env: Env) -> None:
    _setup_app(env)
    verifier = secrets.token_urlsafe(48)
    resp = await _sign_in(env, _authorize_query(env, verifier, scope="openid user/*.rs"), "jane")
    assert _redirect_params(resp)["error"] == "invalid_scope"


async def test_code_used_twice_is_refused(env: Env) -> None:
    _setup_app(env)
    code, verifier = await _code_flow(env)
    status, _ = await env.token(**_code_form(code, verifier))
    assert status == 200
    status, body = await env.token(**_code_form(code, verifier))
    assert status == 400 and body["error"] == "invalid_grant"


async def test_wrong_code_verifier_is_refused_and_spends_the_code(env: Env) -> None:
    _setup_app(env)
    code, verifier = await _code_flow(env)
    status, body = await env.token(**_code_form(code, secrets.token_urlsafe(48)))
    assert status == 400 and body["error"] == "invalid_grant"
    status, body = await env.token(**_code_form(code, verifier))
    assert status == 400 and body["error"] == "invalid_grant"


async def test_missing_code_verifier_is_refused(env: Env) -> None:
    _setup_app(env)
    code, _ = await _code_flow(env)
    form = _code_form(code, "")
    del form["code_verifier"]
    status, body = await env.token(**form)
    assert status == 400 and body["error"] in ("invalid_request", "invalid_grant")


@pytest.mark.parametrize("method", ["plain", None])
async def test_pkce_other_than_s256_is_refused(env: Env, method: str | None) -> None:
    _setup_app(env)
    verifier = secrets.token_urlsafe(48)
    query = _authorize_query(env, verifier, code_challenge=verifier, code_challenge_method=method)
    resp = await env.client.get("/auth/authorize", params=query, allow_redirects=False)
    params = _redirect_params(resp)
    assert params["error"] == "invalid_request" and "S256" in params["error_description"]
    assert params["state"] == "st-42"


async def test_pkce_is_required(env: Env) -> None:
    _setup_app(env)
    query = _authorize_query(env, "x", code_challenge=None, code_challenge_method=None)
    resp = await env.client.get("/auth/authorize", params=query, allow_redirects=False)
    assert _redirect_params(resp)["error"] == "invalid_request"


async def test_unregistered_redirect_uri_is_refused_without_redirecting(env: Env) -> None:
    _setup_app(env)
    for uri in ("http://127.0.0.1:9/callback/", "http://127.0.0.1:9/callback?x=1", "https://evil.example/cb"):
        query = _authorize_query(env, secrets.token_urlsafe(48), redirect_uri=uri)
        resp = await env.client.get("/auth/authorize", params=query, allow_redirects=False)
        assert resp.status == 400 and "Location" not in resp.headers
        assert (await resp.json())["error"] == "invalid_request"


async def test_redirect_uri_other_than_the_codes_is_refused_at_the_token_endpoint(env: Env) -> None:
    env.store.add_client(AuthClient("app", "public", APP_SCOPES, (REDIRECT, "http://127.0.0.1:9/other")))
    env.store.add_user(AuthUser("jane", "patient", patient_id="p123"), PASSWORD)
    code, verifier = await _code_flow(env)
    status, body = await env.token(**_code_form(code, verifier, "http://127.0.0.1:9/other"))
    assert status == 400 and body["error"] == "invalid_grant"


async def test_code_of_another_client_is_refused(env: Env) -> None:
    _setup_app(env)
    env.store.add_client(AuthClient("app2", "public", APP_SCOPES, (REDIRECT,)))
    code, verifier = await _code_flow(env)
    status, body = await env.token(**{**_code_form(code, verifier), "client_id": "app2"})
    assert status == 400 and body["error"] == "invalid_grant"


async def test_wrong_aud_is_refused(env: Env) -> None:
    _setup_app(env)
    for aud in ("https://other.example/fhir", None):
        query = _authorize_query(env, secrets.token_urlsafe(48), aud=aud)
        resp = await env.client.get("/auth/authorize", params=query, allow_redirects=False)
        assert _redirect_params(resp)["error"] == "invalid_request"


async def test_scope_beyond_the_apps_registration_is_refused(env: Env) -> None:
    _setup_app(env)
    query = _authorize_query(env, secrets.token_urlsafe(48), scope="openid patient/*.cruds")
    resp = await env.client.get("/auth/authorize", params=query, allow_redirects=False)
    assert _redirect_params(resp)["error"] == "invalid_scope"


async def test_unknown_client_is_refused_without_redirecting(env: Env) -> None:
    _setup_app(env)
    query = _authorize_query(env, secrets.token_urlsafe(48), client_id="stranger")
    resp = await env.client.get("/auth/authorize", params=query, allow_redirects=False)
    assert resp.status in (400, 401) and "Location" not in resp.headers


async def test_wrong_password_shows_the_form_again(env: Env) -> None:
    _setup_app(env)
    resp = await _sign_in(env, _authorize_query(env, secrets.token_urlsafe(48)), "jane", "wrong password!")
    assert resp.status == 200 and "Location" not in resp.headers
    page = await resp.text()
    assert "wrong" in page and _parse_form(page).fields["username"] == "jane"


async def test_sign_in_rate_limit_answers_429(env: Env) -> None:
    _setup_app(env)
    query = _authorize_query(env, secrets.token_urlsafe(48))
    for _ in range(MAX_FAILURES):
        resp = await _sign_in(env, query, "jane", "wrong password!")
        assert resp.status == 200
    # the right password no longer helps, for this user from any address ...
    resp = await _sign_in(env, query, "jane")
    assert resp.status == 429
    assert 0 < int(resp.headers["Retry-After"]) <= FAILURE_WINDOW
    # ... nor for another user from this address
    resp = await _sign_in(env, query, "dr-who")
    assert resp.status == 429
    # once the window has passed, the user signs in again
    env.store.db.execute("UPDATE auth_login_failures SET failed_at = failed_at - ?", [FAILURE_WINDOW + 1])
    resp = await _sign_in(env, query, "jane")
    assert "code" in _redirect_params(resp)


async def test_failed_sign_in_keeps_no_user_id_as_typed(env: Env) -> None:
    _setup_app(env)
    query = _authorize_query(env, secrets.token_urlsafe(48))
    await _sign_in(env, query, "my-password-typed-here", "oops")
    subjects = [r[0] for r in env.store.db.query("SELECT subject FROM auth_login_failures")]
    assert len(subjects) == 2 and not any("my-password" in s for s in subjects)


async def test_rate_limit_counts_unknown_users_per_address(env: Env) -> None:
    _setup_app(env)
    query = _authorize_query(env, secrets.token_urlsafe(48))
    for i in range(MAX_FAILURES):
        assert (await _sign_in(env, query, f"nobody-{i}", "guess guess")).status == 200
    assert (await _sign_in(env, query, "jane")).status == 429


async def test_sign_in_without_the_csrf_cookie_or_token_is_refused(env: Env) -> None:
    _setup_app(env)
    query = _authorize_query(env, secrets.token_urlsafe(48))
    resp = await env.client.get("/auth/authorize", params=query)
    fields = {**_parse_form(await resp.text()).fields, "username": "jane", "password": PASSWORD}
    assert resp.cookies[CSRF_COOKIE]["httponly"] and resp.cookies[CSRF_COOKIE]["samesite"] == "Strict"
    # a forged token
    resp = await env.client.post(
        "/auth/authorize",
        data={**fields, "csrf_token": f"{int(time.time())}.{'0' * 64}"},
        allow_redirects=False,
    )
    assert resp.status == 400
    # no cookie (a cross-site post): the token was made for the cookie the browser holds
    env.client.session.cookie_jar.clear()
    resp = await env.client.post("/auth/authorize", data=fields, allow_redirects=False)
    assert resp.status == 400
    # neither counted as a failed sign-in
    assert env.store.db.query("SELECT COUNT(*) FROM auth_login_failures")[0][0] == 0


async def test_form_escapes_what_the_request_carries(env: Env) -> None:
    _setup_app(env)
    hostile = '"><script>alert(1)</script>'
    resp = await env.client.get(
        "/auth/authorize", params=_authorize_query(env, secrets.token_urlsafe(48), state=hostile)
    )
    page = await resp.text()
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert _parse_form(page).fields["state"] == hostile  # carried back intact
    assert "frame-ancestors 'none'" in resp.headers["Content-Security-Policy"]
    assert resp.headers["Cache-Control"] == "no-store"


# -- keys, rotation, metadata ---------------------------------------------------------------------
async def test_signing_key_file_is_private(env: Env) -> None:
    _register_backend(env)
    await env.jwks()
    path = env.settings.auth.keys_dir / keys.KEYRING_FILE
    assert path.stat().st_mode & 0o777 == 0o600
    assert env.settings.auth.keys_dir.stat().st_mode & 0o077 == 0


async def test_rotate_key_keeps_old_tokens_valid_and_signs_with_the_new_key(env: Env) -> None:
    key = _register_backend(env)
    _, before = await env.token(**_cc_form(_assertion(key, _claims(env))))
    old_kid = jwt.decode(before["access_token"], await env.jwks(), algorithms=["ES256"]).header["kid"]

    ring = keys.rotate(env.settings.auth.keys_dir, env.settings.auth.token_lifetime)
    assert ring.kid != old_kid

    jwks = await env.jwks()
    assert {k.kid for k in jwks.keys} == {old_kid, ring.kid}
    assert jwt.decode(before["access_token"], jwks, algorithms=["ES256"]).claims["sub"] == "bulk-export"

    _, after = await env.token(**_cc_form(_assertion(key, _claims(env))))
    token = jwt.decode(after["access_token"], jwks, algorithms=["ES256"])
    assert token.header["kid"] == ring.kid
    # the retired key is published until the tokens it signed have expired, then dropped
    later = int(time.time()) + env.settings.auth.token_lifetime + keys.CLOCK_SKEW + 1
    assert [k["kid"] for k in keys.current_jwks(env.settings, now=later)["keys"]] == [ring.kid]


async def test_openid_configuration(env: Env) -> None:
    resp = await env.client.get("/auth/.well-known/openid-configuration")
    assert resp.status == 200
    meta = await resp.json()
    assert meta["issuer"] == env.issuer
    assert meta["authorization_endpoint"] == f"{env.issuer}/authorize"
    assert meta["token_endpoint"] == env.token_url
    assert meta["jwks_uri"] == f"{env.issuer}/jwks"
    assert meta["code_challenge_methods_supported"] == ["S256"]
    assert "private_key_jwt" in meta["token_endpoint_auth_methods_supported"]
    assert set(meta["token_endpoint_auth_signing_alg_values_supported"]) == {"RS384", "ES384"}
    assert set(meta["grant_types_supported"]) == {"authorization_code", "client_credentials"}
    assert {"openid", "fhirUser", "launch/patient", "system/*.rs"} <= set(meta["scopes_supported"])
    assert meta["id_token_signing_alg_values_supported"] == ["ES256"]


async def test_public_base_url_is_the_issuer(tmp_path: Path) -> None:
    settings = Settings.from_env(
        {"FHIRBRIDGE_DATA_DIR": str(tmp_path), "FHIRBRIDGE_PUBLIC_URL": "https://fhir.example/r4"}
    )
    app = web.Application()
    app[SETTINGS], app[ALLOWED_HOSTS], app[BACKEND] = settings, None, Backend(settings)
    app.add_routes(server.routes)
    async with TestClient(TestServer(app)) as client:
        meta = await (await client.get("/auth/.well-known/openid-configuration")).json()
        assert meta["issuer"] == "https://fhir.example/r4/auth"
        assert meta["token_endpoint"] == "https://fhir.example/r4/auth/token"
    app[BACKEND].close()


async def test_no_error_carries_a_traceback(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    key = _register_backend(env)

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("secret detail /etc/passwd")

    monkeypatch.setattr(AuthStore, "remember_assertion", broken)
    resp = await env.client.post("/auth/token", data=_cc_form(_assertion(key, _claims(env))))
    assert resp.status == 500
    body = await resp.json()
    assert body["error"] == "server_error" and not re.search("Traceback|secret|passwd", str(body))


@pytest.mark.parametrize(
    ("requested", "covered"),
    [
        ("system/Patient.rs", True),
        ("system/Observation.r?category=laboratory", True),
        ("system/Patient.read", True),
        ("system/*.rs", True),
        ("system/*.cruds", False),
        ("user/Patient.rs", False),
        ("system/Patient.u", False),
        ("openid", False),
        ("nonsense", False),
    ],
)
def test_a_registered_wildcard_covers_the_narrower_scopes_it_grants(requested: str, covered: bool) -> None:
    from bridge.service.auth.oauth import scope_covered

    assert scope_covered(requested, ("system/*.rs",)) is covered
    assert scope_covered("system/Observation.rs", ("system/Observation.rs?category=laboratory",)) is False
    assert scope_covered("openid", ("openid", "fhirUser")) is True


# -- purpose of use -------------------------------------------------------------------------------
async def test_stated_purpose_of_use_is_in_the_token_the_ihe_iua_way(env: Env) -> None:
    key = _register_backend(env)
    form = {**_cc_form(_assertion(key, _claims(env))), "purpose_of_use": "PUBHLTH HRESCH"}
    status, body = await env.token(**form)
    assert status == 200, body
    claims = jwt.decode(body["access_token"], await env.jwks(), algorithms=["ES256"]).claims
    codings = claims["extensions"]["ihe_iua"]["purpose_of_use"]
    assert [(c["system"], c["code"]) for c in codings] == [
        ("http://terminology.hl7.org/CodeSystem/v3-ActReason", "PUBHLTH"),
        ("http://terminology.hl7.org/CodeSystem/v3-ActReason", "HRESCH"),
    ]
    assert "subject_organization_id" not in claims["extensions"]["ihe_iua"]  # a client has none


@pytest.mark.parametrize("purpose", ["NOSUCH", "", "treat"])
async def test_unknown_purpose_of_use_is_refused(env: Env, purpose: str) -> None:
    key = _register_backend(env)
    status, body = await env.token(**{**_cc_form(_assertion(key, _claims(env))), "purpose_of_use": purpose})
    assert status == 400 and body["error"] == "invalid_request"
    assert "v3-ActReason" in body["error_description"]


async def test_no_purpose_stated_no_purpose_claim(env: Env) -> None:
    key = _register_backend(env)
    status, body = await env.token(**_cc_form(_assertion(key, _claims(env))))
    claims = jwt.decode(body["access_token"], await env.jwks(), algorithms=["ES256"]).claims
    assert status == 200 and "extensions" not in claims


@pytest.mark.parametrize(
    ("kind", "scope", "refused"),
    [
        ("clinician", "openid user/*.rs user/Person.u", True),
        ("clinician", "user/Person.write", True),
        ("clinician", "user/Person.cruds?identifier=x", True),
        ("clinician", "user/Person.rs user/*.rs", False),
        ("clinician", "user/*.cruds", False),  # a wildcard type: the client's registration decides
        ("steward", "openid user/*.rs user/Person.u", False),
    ],
)
def test_only_a_steward_is_granted_person_writes(kind: str, scope: str, refused: bool) -> None:
    from bridge.service.auth.server import _scope_problem
    from bridge.stores.auth import AuthUser

    problem = _scope_problem(AuthUser("u1", kind), scope)
    assert (problem is not None and "stewards" in problem) is refused
