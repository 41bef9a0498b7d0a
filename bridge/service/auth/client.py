"""The client side of the embedded server, for ``fhirbridge auth token``, ``auth login`` and ``auth keygen``:
a client key pair, a signed client assertion, a client-credentials exchange at a token URL (SMART
Backend Services), and the authorization code flow with PKCE for a person at a terminal (:func:`sign_in`).

The assertion is RFC 7523's (authlib's ``private_key_jwt_sign``): ``iss = sub =`` the client id,
``aud`` the token URL, a random ``jti``, and ``exp`` :data:`ASSERTION_LIFETIME` seconds ahead; signed
RS384 with an RSA key or ES384 with a P-384 key, its ``kid`` in the header.
"""

from __future__ import annotations

import http.cookiejar
import secrets
import urllib.error
import urllib.request
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import orjson
from authlib.oauth2.rfc7523 import private_key_jwt_sign
from authlib.oauth2.rfc7636 import create_s256_code_challenge
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, KeyParameters, RSAKey

from bridge.stores.auth import AuthError

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ASSERTION_LIFETIME = 300
KEY_ALGORITHMS = ("ES384", "RS384")

ClientKey = RSAKey | ECKey


class ClientKeyError(AuthError):
    """A client key file that cannot be used (the message names the file, never key material)."""


class TokenRequestFailed(AuthError):
    """The token endpoint refused the request, or could not be reached. ``error`` is RFC 6749's code
    (``unreachable`` when there was no answer), ``description`` the server's own words."""

    def __init__(self, error: str, description: str = "", status: int | None = None) -> None:
        detail = f" ({description})" if description else ""
        super().__init__(f"the token request failed: {error}{detail}")
        self.error, self.description, self.status = error, description, status


def generate_client_key(alg: str = "ES384") -> ClientKey:
    """A new private key for ``alg`` (ES384: EC P-384; RS384: RSA 3072), its kid the RFC 7638 thumbprint."""
    params: KeyParameters = {"alg": alg, "use": "sig"}
    if alg == "ES384":
        return ECKey.generate_key("P-384", params, private=True, auto_kid=True)
    if alg == "RS384":
        return RSAKey.generate_key(3072, params, private=True, auto_kid=True)
    raise ClientKeyError(f"a client key's algorithm is one of {', '.join(KEY_ALGORITHMS)}")


def load_client_key(path: Path) -> ClientKey:
    """A private key from ``path``: a JWK (JSON) or PEM, RSA or EC P-384."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ClientKeyError(f"cannot read the key file {path}: {exc.strerror}") from None
    key: ClientKey
    try:
        if data.lstrip().startswith(b"{"):
            doc = orjson.loads(data)
            key = ECKey.import_key(doc) if doc.get("kty") == "EC" else RSAKey.import_key(doc)
        else:
            try:
                key = ECKey.import_key(data)
            except (JoseError, ValueError, TypeError):
                key = RSAKey.import_key(data)
    except (JoseError, ValueError, TypeError, AttributeError):
        raise ClientKeyError(f"the key file {path} holds no RSA or EC private key (JWK or PEM)") from None
    if not key.is_private:
        raise ClientKeyError(f"the key file {path} holds a public key; the private key signs assertions")
    if isinstance(key, ECKey) and key.get("crv") != "P-384":
        raise ClientKeyError(f"the key file {path} holds an EC key on {key.get('crv')}; ES384 needs P-384")
    key.ensure_kid()
    return key


def assertion_algorithm(key: ClientKey) -> str:
    return "ES384" if isinstance(key, ECKey) else "RS384"


def client_assertion(key: ClientKey, client_id: str, token_url: str) -> str:
    """A signed client assertion for ``client_id`` at ``token_url`` (module docstring)."""
    token: str = private_key_jwt_sign(
        key,
        client_id,
        token_url,
        alg=assertion_algorithm(key),
        header={"kid": key.kid},
        expires_in=ASSERTION_LIFETIME,
    )
    return token


def request_token(
    token_url: str,
    client_id: str,
    key: ClientKey,
    scope: str,
    *,
    purpose: str | None = None,
    timeout: float = 10.0,
) -> dict[str, Any]:
    """A client-credentials exchange at ``token_url``: the token response (``access_token``, ...).
    ``purpose``: the purposes of use to state (v3-ActReason codes separated by spaces). Raises
    :class:`TokenRequestFailed` when it is refused or the server cannot be reached."""
    form = {
        "grant_type": "client_credentials",
        "scope": scope,
        "client_assertion_type": ASSERTION_TYPE,
        "client_assertion": client_assertion(key, client_id, token_url),
    }
    if purpose:
        form["purpose_of_use"] = purpose
    return _token_request(token_url, form, timeout)


def _token_request(token_url: str, form: dict[str, str], timeout: float) -> dict[str, Any]:
    """POST ``form`` to the token endpoint: the token response, or :class:`TokenRequestFailed`."""
    req = urllib.request.Request(
        token_url,
        data=urlencode(form).encode(),
        headers={"Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = orjson.loads(resp.read(1024 * 1024))
    except urllib.error.HTTPError as exc:
        try:
            err = orjson.loads(exc.read(64 * 1024))
        except orjson.JSONDecodeError:
            err = {}
        if not isinstance(err, dict):
            err = {}
        raise TokenRequestFailed(
            str(err.get("error") or f"HTTP {exc.code}"), str(err.get("error_description") or ""), exc.code
        ) from None
    except (OSError, ValueError) as exc:  # URLError, timeouts, a body that is not JSON
        raise TokenRequestFailed(
            "unreachable", f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"
        ) from None
    if not isinstance(body, dict) or not isinstance(body.get("access_token"), str):
        raise TokenRequestFailed("invalid_response", "the answer holds no access_token")
    return body


# -- the authorization code flow, for a person at a terminal -----------------------------------------
class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # the redirect to the app carries the code: read it, do not follow it


class _Fields(HTMLParser):
    """The sign-in form's hidden fields (the authorization request and the CSRF token)."""

    def __init__(self) -> None:
        super().__init__()
        self.fields: dict[str, str] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "input" and a.get("type") == "hidden" and a.get("name"):
            self.fields[str(a["name"])] = a.get("value") or ""


def sign_in(
    fhir_base: str,
    client_id: str,
    redirect_uri: str,
    user: str,
    password: str,
    scope: str,
    *,
    purpose: str | None = None,
    timeout: float = 10.0,
) -> dict[str, Any]:
    """The authorization code flow with PKCE (S256) at the embedded server of ``fhir_base``, signing in
    on its form as ``user``, as a public SMART app registered with ``redirect_uri`` would: the token
    response. The redirect is read, not followed, so nothing need listen there. Raises
    :class:`TokenRequestFailed` for a refusal at any step (a wrong password: ``access_denied``)."""
    verifier = secrets.token_urlsafe(48)
    state = secrets.token_urlsafe(16)
    query = {
        "response_type": "code",
        "client_id": client_id,
        "redirect_uri": redirect_uri,
        "scope": scope,
        "state": state,
        "aud": fhir_base,
        "code_challenge": create_s256_code_challenge(verifier),
        "code_challenge_method": "S256",
    }
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar), _NoRedirect())
    authorize = f"{fhir_base}/auth/authorize"

    def call(req: urllib.request.Request) -> tuple[int, dict[str, str], bytes]:
        try:
            with opener.open(req, timeout=timeout) as resp:
                return resp.status, dict(resp.headers), resp.read(1024 * 1024)
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read(64 * 1024)
        except OSError as exc:
            raise TokenRequestFailed(
                "unreachable", f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"
            ) from None

    status, _, page = call(urllib.request.Request(f"{authorize}?{urlencode(query)}"))
    if status != 200:
        raise TokenRequestFailed(
            "invalid_request", f"the authorization request was refused (HTTP {status})", status
        )
    form = _Fields()
    form.feed(page.decode("utf-8", "replace"))
    fields = {**form.fields, "username": user, "password": password}
    status, headers, page = call(
        urllib.request.Request(authorize, data=urlencode(fields).encode(), method="POST")
    )
    location = headers.get("Location", "")
    if status != 302 or not location.startswith(redirect_uri):
        raise TokenRequestFailed("access_denied", "the sign-in was refused (user id or password)", status)
    answer = {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}
    if "error" in answer:
        raise TokenRequestFailed(answer["error"], answer.get("error_description", ""))
    if answer.get("state") != state or "code" not in answer:
        raise TokenRequestFailed("invalid_response", "the redirect carries no code for this request")
    form_data = {
        "grant_type": "authorization_code",
        "code": answer["code"],
        "redirect_uri": redirect_uri,
        "client_id": client_id,
        "code_verifier": verifier,
    }
    if purpose:
        form_data["purpose_of_use"] = purpose
    return _token_request(f"{fhir_base}/auth/token", form_data, timeout)
