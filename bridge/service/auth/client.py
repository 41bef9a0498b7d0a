"""The client side of SMART Backend Services, for ``fhirbridge auth token`` and ``auth keygen``: a
client key pair, a signed client assertion, and a client-credentials exchange at a token URL.

The assertion is RFC 7523's (authlib's ``private_key_jwt_sign``): ``iss = sub =`` the client id,
``aud`` the token URL, a random ``jti``, and ``exp`` :data:`ASSERTION_LIFETIME` seconds ahead; signed
RS384 with an RSA key or ES384 with a P-384 key, its ``kid`` in the header.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import orjson
from authlib.oauth2.rfc7523 import private_key_jwt_sign
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
