"""authlib's OAuth 2 server framework, adapted to aiohttp and to the auth store.

authlib has no aiohttp integration; this module is one, shaped like its Flask and Django ones: an
:class:`AiohttpOAuth2Request` (what ``create_oauth2_request`` returns) over an :class:`HttpRequest`,
a snapshot of the aiohttp request taken on the event loop with its body read, so that authlib, which
is synchronous and queries the store, runs in the stores' thread pool; ``handle_response`` answers
an aiohttp ``web.Response``. The protocol is authlib's: RFC 6749 grants, RFC 7523 client assertions,
RFC 7636 PKCE, OpenID Connect's ID token and RFC 9068 JWT access tokens. What is ours:

* **private_key_jwt** (:class:`PrivateKeyJwt`, SMART Backend Services): RS384 or ES384 only; ``aud``
  the token URL; ``exp`` at most :data:`MAX_ASSERTION_AHEAD` seconds ahead (plus the clock-skew
  leeway); a ``jti`` accepted once, remembered until the assertion expires;
* **scopes**: a client is granted what it asks for only when every scope it asks for is covered by
  those it was registered with (:func:`scope_covered`: ``system/*.rs`` covers ``system/Patient.rs``
  and ``system/Observation.r?category=laboratory``; ``openid`` and the like only by themselves);
  otherwise the request is refused with ``invalid_scope``
  (RFC 6749 section 3.3 allows narrowing instead; refusing says at once that the registration and the
  request disagree). An empty request is refused the same way;
* **PKCE** is required for every authorization code, S256 only: ``plain``, or no method (which
  RFC 7636 reads as ``plain``), is refused;
* the SMART ``aud`` parameter of an authorization request must be this server's FHIR base URL;
* **access tokens** (:class:`AccessTokens`): JWTs signed ES256 with the active key (its ``kid`` in the
  header), claims ``iss aud sub client_id scope exp iat jti`` and, for a user, ``patient`` (with
  ``launch/patient``) and ``fhirUser`` (with ``fhirUser``), and the purposes of use a token request
  states (``purpose_of_use=ETREAT``, v3-ActReason codes) as IHE IUA's
  ``extensions.ihe_iua.purpose_of_use``, and a registered user's organisation as its
  ``subject_organization_id`` (which the verifier reads for this issuer only). No refresh tokens.
"""

from __future__ import annotations

import logging
import threading
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, ClassVar
from urllib.parse import parse_qsl

import orjson
from aiohttp import web
from authlib.common.security import is_secure_transport
from authlib.oauth2.rfc6749 import (
    AuthorizationServer,
    ClientMixin,
    InvalidClientError,
    InvalidRequestError,
    InvalidScopeError,
    OAuth2Error,
    OAuth2Payload,
    OAuth2Request,
)
from authlib.oauth2.rfc6749.grants import AuthorizationCodeGrant, ClientCredentialsGrant
from authlib.oauth2.rfc7523 import JWTBearerClientAssertion
from authlib.oauth2.rfc7636 import CodeChallenge
from authlib.oauth2.rfc9068 import JWTBearerTokenGenerator
from authlib.oidc.core import UserInfo
from authlib.oidc.core.grants import OpenIDCode
from authlib.oidc.core.models import AuthorizationCodeMixin
from joserfc import jwt
from joserfc.errors import BadSignatureError, InvalidKeyIdError, JoseError, UnsupportedAlgorithmError
from joserfc.jwk import KeySet
from multidict import CIMultiDict, MultiDict, MultiDictProxy

from bridge.logging import get_logger
from bridge.service.auth.keys import ALGORITHM, KeyRing
from bridge.service.auth.purpose import PURPOSES, iua_claims
from bridge.service.auth.scopes import ScopeSet, parse_scope
from bridge.stores.auth import AuthClient, AuthCode, AuthStore, AuthUser

log = get_logger(__name__)

# authlib logs the tokens it issues at debug level ("Issue token %r to %r"): never let them through
logging.getLogger("authlib").setLevel(logging.INFO)

#: the algorithms a client assertion may be signed with (SMART Backend Services: RS384, ES384)
ASSERTION_ALGORITHMS = ("RS384", "ES384")
#: a client assertion expires at most this many seconds after it is received (SMART: five minutes)
MAX_ASSERTION_AHEAD = 300
#: clock skew allowed on a client assertion's ``exp``, both ways
LEEWAY = 60
#: an authorization code is good for this many seconds (RFC 6749 recommends at most 600)
CODE_LIFETIME = 120
#: a form body larger than this is refused
MAX_FORM_BYTES = 64 * 1024
FORM_TYPE = "application/x-www-form-urlencoded"


def scope_covered(requested: str, registered: Iterable[str]) -> bool:
    """Whether the registered scopes grant everything ``requested`` grants: a resource scope is covered
    when, for each of its letters, a registered scope of the same context covers its type without a
    narrowing query, or with the same one; any other scope only by itself."""
    scope = parse_scope(requested)
    if scope is None:
        return requested in registered
    allowed = ScopeSet.parse(" ".join(registered))
    if scope.resource_type == "*":
        return all(
            any(
                r.context == scope.context
                and r.resource_type == "*"
                and letter in r.interactions
                and (not r.params or r.params == scope.params)
                for r in allowed.scopes
            )
            for letter in scope.interactions
        )
    for letter in scope.interactions:
        narrowing = allowed.narrowing(scope.resource_type, letter, scope.context)
        if () not in narrowing and scope.params not in narrowing:
            return False
    return True


# -- the aiohttp request, for authlib -------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class HttpRequest:
    """What the server reads of an aiohttp request, taken on the event loop. ``url`` is built on the
    service's base URL (``FHIRBRIDGE_PUBLIC_URL`` when set), the one authlib checks for TLS."""

    method: str
    url: str
    headers: Mapping[str, str]
    query: MultiDictProxy[str]
    form: MultiDictProxy[str] = field(default_factory=lambda: MultiDictProxy(MultiDict()))
    remote: str | None = None
    cookies: Mapping[str, str] = field(default_factory=dict)
    #: the URL as this request reached the service (its own scheme and host), path only
    seen_url: str | None = None


async def read_request(request: web.Request, base: str) -> HttpRequest:
    """The request with its form body read. Raises :class:`InvalidRequestError` for a POST whose body
    is not a form of at most :data:`MAX_FORM_BYTES` bytes of UTF-8."""
    form: MultiDict[str] = MultiDict()
    if request.method == "POST":
        if request.content_type != FORM_TYPE:
            raise InvalidRequestError(f"the body must be {FORM_TYPE}")
        if request.content_length is not None and request.content_length > MAX_FORM_BYTES:
            raise InvalidRequestError("the body is too large")
        body = await request.content.read(MAX_FORM_BYTES + 1)
        if len(body) > MAX_FORM_BYTES:
            raise InvalidRequestError("the body is too large")
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidRequestError("the body is not UTF-8") from None
        form.extend(parse_qsl(text, keep_blank_values=True))
    for values in (request.query.values(), form.values()):
        if any("\x00" in v for v in values):
            raise InvalidRequestError("a parameter holds a NUL character")
    return HttpRequest(
        method=request.method,
        url=base + request.path_qs,
        seen_url=f"{request.scheme}://{request.host}{request.path}",
        headers=CIMultiDict(request.headers),
        query=MultiDictProxy(MultiDict(request.query)),
        form=MultiDictProxy(form),
        remote=request.remote,
        cookies=dict(request.cookies),
    )


def requested_purposes(http: HttpRequest) -> tuple[str, ...]:
    """The purposes of use a token request states: ``purpose_of_use``, v3-ActReason codes separated by
    spaces, given once, in the form of a POST. Raises :class:`InvalidRequestError` for an unknown code."""
    values = http.form.getall("purpose_of_use", []) if http.method == "POST" else []
    if len(values) > 1:
        raise InvalidRequestError("purpose_of_use is given more than once")
    codes = tuple(dict.fromkeys(values[0].split())) if values else ()
    unknown = [c for c in codes if c not in PURPOSES]
    if unknown or (values and not codes):
        raise InvalidRequestError(
            "purpose_of_use must be v3-ActReason codes separated by spaces (such as TREAT, ETREAT, PUBHLTH)"
        )
    return codes


class AiohttpPayload(OAuth2Payload):  # type: ignore[misc]
    """The request's parameters: the query of a GET, the form of a POST (never both, so that a token
    request's credentials are never read from a URL)."""

    def __init__(self, params: MultiDictProxy[str]) -> None:
        self._params = params

    @cached_property
    def data(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for key, value in self._params.items():
            out.setdefault(key, value)
        return out

    @cached_property
    def datalist(self) -> defaultdict[str, list[str]]:
        values: defaultdict[str, list[str]] = defaultdict(list)
        for key, value in self._params.items():
            values[key].append(value)
        return values


class AiohttpOAuth2Request(OAuth2Request):  # type: ignore[misc]
    def __init__(self, http: HttpRequest) -> None:
        super().__init__(method=http.method, uri=http.url, headers=http.headers)
        self.http = http
        self.payload = AiohttpPayload(http.form if http.method == "POST" else http.query)

    @property
    def args(self) -> MultiDictProxy[str]:
        return self.http.query

    @property
    def form(self) -> MultiDictProxy[str]:
        return self.http.form


# -- the models authlib asks for ------------------------------------------------------------------
class OAuthClient(ClientMixin):  # type: ignore[misc]
    """A registered client as authlib sees it (see :class:`AuthClient`)."""

    def __init__(self, record: AuthClient) -> None:
        self.record = record

    def get_client_id(self) -> str:
        return self.record.client_id

    def get_default_redirect_uri(self) -> None:
        return None  # the redirect URI is always given (SMART requires it), and matched exactly

    def get_allowed_scope(self, scope: str | None) -> str:
        """``scope`` when each of its scopes is one the client was registered with; else
        ``invalid_scope`` (no narrowing, see the module docstring)."""
        requested = list(dict.fromkeys((scope or "").split()))
        if not requested:
            raise InvalidScopeError("the scope parameter is required")
        outside = [s for s in requested if not scope_covered(s, self.record.scopes)]
        if outside:
            raise InvalidScopeError(
                f"{len(outside)} of the requested scopes are not among those the client is registered with"
            )
        return " ".join(requested)

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        return redirect_uri in self.record.redirect_uris

    def check_client_secret(self, client_secret: str) -> bool:
        return False  # no client has a secret: public clients have none, the others sign assertions

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        if self.record.public:
            return method == "none"
        return method == PrivateKeyJwt.CLIENT_AUTH_METHOD

    def check_response_type(self, response_type: str) -> bool:
        return response_type == "code" and bool(self.record.redirect_uris)

    def check_grant_type(self, grant_type: str) -> bool:
        if grant_type == "authorization_code":
            return bool(self.record.redirect_uris)
        if grant_type == "client_credentials":
            return not self.record.public and any(s.startswith("system/") for s in self.record.scopes)
        return False  # no refresh tokens


class OAuthUser:
    def __init__(self, record: AuthUser) -> None:
        self.record = record

    def get_user_id(self) -> str:
        return self.record.user_id


class OAuthCode(AuthorizationCodeMixin):  # type: ignore[misc]
    def __init__(self, record: AuthCode) -> None:
        self.record = record
        self.code_challenge = record.code_challenge
        self.code_challenge_method = record.code_challenge_method

    def get_redirect_uri(self) -> str:
        return self.record.redirect_uri

    def get_scope(self) -> str:
        return self.record.scope

    def get_nonce(self) -> str | None:
        return self.record.nonce

    def get_auth_time(self) -> int:
        return self.record.auth_time


# -- client authentication: private_key_jwt -------------------------------------------------------
JwksSource = Callable[[str], dict[str, Any]]


class RemoteJwks:
    """The JWKS at a client's registered ``jwks_uri``, fetched (HTTPS, or HTTP to a loopback address)
    with a timeout and a size limit, and kept for ``ttl`` seconds."""

    def __init__(self, ttl: float = 60.0, timeout: float = 5.0, limit: int = 256 * 1024) -> None:
        self.ttl, self.timeout, self.limit = ttl, timeout, limit
        self._cache: dict[str, tuple[float, dict[str, Any]]] = {}
        self._lock = threading.Lock()

    def __call__(self, uri: str) -> dict[str, Any]:
        with self._lock:
            cached = self._cache.get(uri)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        if not is_secure_transport(uri):
            raise InvalidClientError(description="the client's JWKS URI must use https")
        try:
            req = urllib.request.Request(uri, headers={"Accept": "application/json"})
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                body = resp.read(self.limit + 1)
            if len(body) > self.limit:
                raise ValueError("too large")
            jwks = orjson.loads(body)
            if not isinstance(jwks, dict) or not isinstance(jwks.get("keys"), list):
                raise ValueError("not a JWKS")
        except (OSError, ValueError) as exc:  # URLError and timeouts are OSErrors
            log.warning("auth.client_jwks_unavailable", uri=uri, error=type(exc).__name__)
            raise InvalidClientError(description="the client's JWKS could not be fetched") from None
        with self._lock:
            self._cache[uri] = (time.monotonic() + self.ttl, jwks)
        return jwks


#: the process's cache of client JWKS fetched from their URIs
REMOTE_JWKS = RemoteJwks()


class PrivateKeyJwt(JWTBearerClientAssertion):  # type: ignore[misc]
    """RFC 7523 client authentication as SMART Backend Services profiles it (module docstring)."""

    CLIENT_AUTH_METHOD = "private_key_jwt"

    def __init__(self, store: AuthStore, token_urls: list[str], jwks_source: JwksSource) -> None:
        super().__init__(validate_jti=True, leeway=LEEWAY)
        self.store = store
        self.token_urls = token_urls
        self.jwks_source = jwks_source

    def get_audiences(self) -> list[str]:
        return self.token_urls

    def resolve_client_public_key(self, client: OAuthClient) -> KeySet:
        record = client.record
        if record.public:
            raise InvalidClientError(description="a public client has no keys to sign an assertion with")
        data = record.jwks if record.jwks is not None else self.jwks_source(str(record.jwks_uri))
        try:
            return KeySet.import_key_set(data)  # type: ignore[arg-type]
        except (JoseError, ValueError, KeyError, TypeError):
            raise InvalidClientError(description="the client's JWKS cannot be read") from None

    def process_assertion_claims(self, assertion: str, resolve_key: KeySet) -> dict[str, Any]:
        """Verify the signature with the client's keys (RS384 or ES384), then the claims. The error
        descriptions are ours: joserfc's may quote the assertion's header, which the client wrote."""
        try:
            token = jwt.decode(assertion, resolve_key, algorithms=list(ASSERTION_ALGORITHMS))
        except UnsupportedAlgorithmError:
            raise InvalidClientError(
                description=f"the client assertion must be signed with {' or '.join(ASSERTION_ALGORITHMS)}"
            ) from None
        except InvalidKeyIdError:
            raise InvalidClientError(
                description="no key of the client's JWKS has the assertion's kid and algorithm"
            ) from None
        except BadSignatureError:
            raise InvalidClientError(
                description="the client assertion's signature does not verify with the client's keys"
            ) from None
        except (JoseError, ValueError):
            raise InvalidClientError(description="the client assertion cannot be verified") from None
        self.verify_claims(token.claims)
        return token.claims

    def verify_claims(self, claims: dict[str, Any]) -> None:
        exp = claims.get("exp")
        if isinstance(exp, int | float) and exp > time.time() + MAX_ASSERTION_AHEAD + LEEWAY:
            raise InvalidClientError(
                description=f"the client assertion's exp is more than {MAX_ASSERTION_AHEAD} seconds ahead"
            )
        jti = claims.get("jti")
        if jti is not None and (not isinstance(jti, str) or not jti or len(jti) > 255):
            raise InvalidClientError(
                description="the client assertion's jti must be text of 1 to 255 characters"
            )
        super().verify_claims(claims)  # iss, sub, aud, exp; iss == sub; then validate_jti

    def validate_jti(self, claims: dict[str, Any], jti: str) -> bool:
        return self.store.remember_assertion(str(claims["iss"]), jti, int(claims["exp"]) + LEEWAY)


# -- grants and their extensions ------------------------------------------------------------------
class ClientCredentials(ClientCredentialsGrant):  # type: ignore[misc]
    """SMART Backend Services: a confidential-asymmetric client with system/ scopes."""

    TOKEN_ENDPOINT_AUTH_METHODS: ClassVar[list[str]] = [PrivateKeyJwt.CLIENT_AUTH_METHOD]


class AuthorizationCode(AuthorizationCodeGrant):  # type: ignore[misc]
    """The authorization code grant over the auth store: codes stored by digest, taken once."""

    TOKEN_ENDPOINT_AUTH_METHODS: ClassVar[list[str]] = ["none", PrivateKeyJwt.CLIENT_AUTH_METHOD]

    @property
    def store(self) -> AuthStore:
        return self.server.store  # type: ignore[no-any-return]

    def save_authorization_code(self, code: str, request: AiohttpOAuth2Request) -> None:
        now = int(time.time())
        data = request.payload.data
        self.store.save_code(
            code,
            AuthCode(
                client_id=request.client.get_client_id(),
                redirect_uri=request.payload.redirect_uri,
                scope=request.scope,
                user_id=request.user.get_user_id(),
                code_challenge=data["code_challenge"],
                code_challenge_method=data["code_challenge_method"],
                nonce=data.get("nonce") or None,
                auth_time=now,
                expires_at=now + CODE_LIFETIME,
            ),
            now=now,
        )

    def query_authorization_code(self, code: str, client: OAuthClient) -> OAuthCode | None:
        """The code's record, taken from the store: a code is good for one token request, whatever
        that request's outcome (a failed PKCE check or a wrong redirect URI spends it too)."""
        record = self.store.take_code(code)
        if record is None or record.client_id != client.get_client_id():
            return None
        return OAuthCode(record)

    def delete_authorization_code(self, authorization_code: OAuthCode) -> None:
        pass  # taken by query_authorization_code already

    def authenticate_user(self, authorization_code: OAuthCode) -> OAuthUser | None:
        user = self.store.user(authorization_code.record.user_id)
        return OAuthUser(user) if user is not None else None


class S256Challenge(CodeChallenge):  # type: ignore[misc]
    """PKCE required, S256 only."""

    SUPPORTED_CODE_CHALLENGE_METHOD: ClassVar[list[str]] = ["S256"]
    CODE_CHALLENGE_METHODS: ClassVar[dict[str, Any]] = {"S256": CodeChallenge.CODE_CHALLENGE_METHODS["S256"]}

    def validate_code_challenge(self, grant: AuthorizationCode, redirect_uri: str | None) -> None:
        data = grant.request.payload.data
        if not data.get("code_challenge"):
            raise InvalidRequestError("PKCE is required: send code_challenge and code_challenge_method=S256")
        if data.get("code_challenge_method") != "S256":
            raise InvalidRequestError("code_challenge_method must be S256 (plain is not supported)")
        super().validate_code_challenge(grant, redirect_uri)


class SmartAuthorize:
    """SMART App Launch checks of an authorization request: ``aud`` is this server's FHIR base URL,
    and no system/ scope is asked for (those are for backend services)."""

    def __call__(self, grant: AuthorizationCode) -> None:
        grant.register_hook("after_validate_authorization_request_payload", self.check)

    def check(self, grant: AuthorizationCode, result: object) -> None:
        aud = grant.request.payload.data.get("aud")
        if not aud or aud.rstrip("/") != grant.server.audience.rstrip("/"):
            raise InvalidRequestError("aud must be this server's FHIR base URL")
        if any(s.startswith("system/") for s in (grant.request.scope or "").split()):
            raise InvalidScopeError(
                "system/ scopes are granted to backend services only (client_credentials)"
            )


class LaunchContext:
    """SMART launch context in the token response: ``patient`` beside the token (it is in the token too)."""

    def __call__(self, grant: AuthorizationCode) -> None:
        grant.register_hook("after_create_token_response", self.add)

    def add(self, grant: AuthorizationCode, response: tuple[int, dict[str, Any], Any]) -> None:
        _, token, _ = response
        user = grant.request.user
        if "launch/patient" in token.get("scope", "").split() and user.record.patient_id:
            token["patient"] = user.record.patient_id


class OpenIdCode(OpenIDCode):  # type: ignore[misc]
    """The ID token of ``openid``: ES256 with the active key; ``fhirUser`` (absolute URL) with ``fhirUser``."""

    def __init__(self, server: EmbeddedAuthorizationServer) -> None:
        super().__init__(require_nonce=False)
        self.server = server

    def exists_nonce(self, nonce: str, request: AiohttpOAuth2Request) -> bool:
        return self.server.store.nonce_used(request.payload.client_id, nonce)

    def get_client_algorithm(self, client: OAuthClient) -> str:
        return ALGORITHM

    def resolve_client_private_key(self, client: OAuthClient) -> KeySet:
        return self.server.ring.signing_set()

    def get_client_claims(self, client: OAuthClient) -> dict[str, Any]:
        return {
            "iss": self.server.issuer,
            "aud": [client.get_client_id()],
            "exp": int(time.time()) + self.server.lifetime,
        }

    def generate_user_info(self, user: OAuthUser, scope: str) -> UserInfo:
        info = UserInfo(sub=user.get_user_id())
        if "fhirUser" in scope.split() and user.record.fhir_user:
            info["fhirUser"] = f"{self.server.audience}/{user.record.fhir_user}"
        return info


class AccessTokens(JWTBearerTokenGenerator):  # type: ignore[misc]
    """RFC 9068 JWT access tokens with the SMART claims (module docstring)."""

    def __init__(self, server: EmbeddedAuthorizationServer) -> None:
        super().__init__(issuer=server.issuer, alg=ALGORITHM, expires_generator=server.lifetime)
        self.server = server

    def get_jwks(self) -> KeySet:
        return self.server.ring.signing_set()

    def get_audiences(self, client: OAuthClient, user: OAuthUser | None, scope: str) -> str:
        return self.server.audience

    def get_extra_claims(
        self, client: OAuthClient, grant_type: str, user: OAuthUser | None, scope: str
    ) -> dict[str, Any]:
        organization = user.record.organization if user is not None else None
        claims: dict[str, Any] = iua_claims(self.server.purposes, organization)
        if user is not None:
            scopes = scope.split()
            if "launch/patient" in scopes and user.record.patient_id:
                claims["patient"] = user.record.patient_id
            if "fhirUser" in scopes and user.record.fhir_user:
                claims["fhirUser"] = user.record.fhir_user
        return claims


# -- the server -----------------------------------------------------------------------------------
class EmbeddedAuthorizationServer(AuthorizationServer):  # type: ignore[misc]
    """authlib's authorization server over one thread's store and the key ring, for one base URL
    (cheap to build: one per request). ``issuer`` is ``<base>/auth``; ``audience`` the FHIR base."""

    def __init__(
        self,
        store: AuthStore,
        ring: KeyRing,
        *,
        issuer: str,
        audience: str,
        lifetime: int,
        jwks_source: JwksSource = REMOTE_JWKS,
        token_url_seen: str | None = None,
        purposes: tuple[str, ...] = (),
    ) -> None:
        """``token_url_seen``: the token URL as this request reached it, which a client's assertion may
        name as its ``aud`` besides the advertised ``<issuer>/token`` (a proxy or another host name).
        ``purposes``: the purposes of use the token request states (:func:`requested_purposes`)."""
        super().__init__(scopes_supported=None)
        self.store, self.ring = store, ring
        self.purposes = purposes
        self.issuer, self.audience, self.lifetime = issuer, audience, lifetime
        self.register_token_generator("default", AccessTokens(self))
        self.register_client_auth_method(
            PrivateKeyJwt.CLIENT_AUTH_METHOD,
            PrivateKeyJwt(
                store, list(dict.fromkeys(u for u in (f"{issuer}/token", token_url_seen) if u)), jwks_source
            ),
        )
        self.register_grant(ClientCredentials)
        self.register_grant(
            AuthorizationCode, [S256Challenge(), SmartAuthorize(), LaunchContext(), OpenIdCode(self)]
        )

    def query_client(self, client_id: object) -> OAuthClient | None:
        if not isinstance(client_id, str) or not client_id.isprintable() or len(client_id) > 255:
            return None
        record = self.store.client(client_id)
        return OAuthClient(record) if record is not None else None

    def save_token(self, token: dict[str, Any], request: AiohttpOAuth2Request) -> None:
        # nothing to store (a JWT is checked by its signature); the log names no token and no user
        log.info(
            "auth.token_issued",
            client_id=request.client.get_client_id(),
            grant_type=request.payload.grant_type,
            scope=token.get("scope"),
            expires_in=token.get("expires_in"),
        )

    def create_oauth2_request(self, request: HttpRequest | AiohttpOAuth2Request) -> AiohttpOAuth2Request:
        return request if isinstance(request, AiohttpOAuth2Request) else AiohttpOAuth2Request(request)

    def create_json_request(self, request: object) -> None:
        raise NotImplementedError("no endpoint of this server takes JSON")

    def handle_response(self, status: int, body: object, headers: list[tuple[str, str]]) -> web.Response:
        return oauth_response(status, body, headers)

    def send_signal(self, name: str, *args: object, **kwargs: object) -> None:
        pass  # no signal receivers


def oauth_response(status: int, body: object, headers: list[tuple[str, str]] | None = None) -> web.Response:
    """An authlib answer as an aiohttp response: a dict as JSON, never cached."""
    hdrs: CIMultiDict[str] = CIMultiDict(headers or [])
    if isinstance(body, dict):
        data = orjson.dumps(body)
        hdrs["Content-Type"] = "application/json"
    else:
        data = str(body or "").encode("utf-8")
    hdrs.setdefault("Cache-Control", "no-store")
    return web.Response(status=status, body=data, headers=hdrs)


def error_response(error: OAuth2Error) -> web.Response:
    """An RFC 6749 error: a redirect to the client when its redirect URI is known, else JSON."""
    return oauth_response(*error())
