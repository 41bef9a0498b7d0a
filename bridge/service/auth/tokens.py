"""The resource server's access-token check: who may call, for which organisation, with which scopes.

:class:`TokenVerifier` turns a bearer token into an :class:`AccessContext`, or refuses it with
:class:`InvalidToken` (a short ``reason``, never the token or a claim value), or raises
:class:`IssuerUnavailable` (a :class:`~bridge.errors.TransientError`) when the issuer that must vouch
for it cannot be reached.

* A JWT (three dot-separated parts) is verified with joserfc: the header's ``alg`` must be on
  :data:`ALGORITHMS` (never ``none``, never HMAC); the issuer is looked up by the token's ``iss`` among
  the configured ones and its key by ``kid``; then ``iss``, ``aud`` (the service's FHIR base URL, alone
  or in a list), ``exp`` (required), ``nbf`` and ``iat`` are checked with a leeway.
* Keys come from the issuer's JWKS (its ``jwks_uri``, else OpenID discovery), parsed once and cached
  as long as its ``Cache-Control: max-age`` says (bounded to 60 s .. 1 day, 5 min without one). An
  unknown ``kid`` fetches the JWKS again, at most once per cool-down (30 s) per issuer: a key rotation
  needs no restart, and a flood of made-up ``kid`` values cannot hammer the issuer. If a refresh fails,
  the keys already known stay in use. The embedded authorization server's keys are handed over
  in-process (``static_keys``: a key set, or a function returning the current one) and never fetched.
* Any other token is asked about at the issuer that has an ``introspection_url`` (RFC 7662, with
  client_secret_basic). Only one issuer may have one: an opaque token does not say who issued it, and
  sending it to several issuers would show each one the others' tokens. The answer is cached until the
  token's ``exp`` and for at most ``introspection_cache_seconds``.

The organisation of an :class:`AccessContext` is the one configured for the issuer (the ``[[issuer]]``
table of :func:`load_issuers`), never a claim: an issuer speaks for its organisation and no other.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import os
import re
import stat
import time
import tomllib
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus, urlsplit

import aiohttp
import orjson
from joserfc import jws
from joserfc.errors import (
    ClaimError,
    ExpiredTokenError,
    InvalidClaimError,
    JoseError,
    MissingClaimError,
    UnsupportedAlgorithmError,
)
from joserfc.jwa import JWSAlgModel
from joserfc.jwk import JWKRegistry, Key, KeySet, RSAKey
from joserfc.jws import JWSRegistry
from joserfc.jwt import JWTClaimsRegistry

from bridge.errors import ConfigError, FhirbridgeError, TransientError
from bridge.logging import get_logger
from bridge.service.auth.purpose import PurposeError, purposes_of
from bridge.service.auth.scopes import ScopeSet

log = get_logger(__name__)

#: the environment variable naming the issuers file
ISSUERS_ENV = "FHIRBRIDGE_AUTH_ISSUERS"
#: the signature algorithms accepted in a JWT header: asymmetric only (an HMAC key would have to be
#: shared with every resource server, and ``none`` is no signature). ``Ed25519`` is RFC 9864's name
#: for what ``EdDSA`` means with an Ed25519 key.
ALGORITHMS: frozenset[str] = frozenset({"RS256", "RS384", "PS256", "ES256", "ES384", "EdDSA", "Ed25519"})

MAX_TOKEN_LENGTH = 16 * 1024
#: JWKS, discovery and introspection answers larger than this are refused
MAX_RESPONSE_BYTES = 1024 * 1024
#: bounds of a JWKS's cache lifetime, and the lifetime without a ``Cache-Control: max-age``
JWKS_MIN_AGE, JWKS_MAX_AGE, JWKS_DEFAULT_AGE = 60.0, 86400.0, 300.0
#: at most one JWKS fetch per issuer within this many seconds, when a ``kid`` is unknown or a fetch failed
REFETCH_COOLDOWN = 30.0
#: a key source given in-process as a function is asked again at most this often for an unknown ``kid``
#: (it is cheap), and at least every JWKS_MIN_AGE seconds (so that retired keys go)
LOCAL_COOLDOWN = 1.0
#: cached introspection answers, at most
INTROSPECTION_CACHE_SIZE = 10_000

# RFC 6750 section 2.1: b64token
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
_MAX_AGE = re.compile(r"(?:^|,)\s*max-age\s*=\s*\"?(\d{1,12})\"?\s*(?:,|$)", re.IGNORECASE)
_LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})
# JWK members that hold private key material: a JWKS must not carry them, and if one does they are
# dropped before the key is imported, so that only its public half is ever kept
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth"})


class Reason(StrEnum):
    """Why a token was refused (:attr:`InvalidToken.reason`)."""

    MALFORMED = "malformed"
    ALGORITHM = "algorithm not allowed"
    UNKNOWN_ISSUER = "unknown issuer"
    WRONG_ISSUER = "wrong issuer"
    UNKNOWN_KEY = "unknown key"
    BAD_SIGNATURE = "bad signature"
    WRONG_AUDIENCE = "wrong audience"
    EXPIRED = "expired"
    NOT_YET_VALID = "not yet valid"
    MISSING_CLAIM = "missing claim"
    INVALID_CLAIM = "invalid claim"
    INACTIVE = "inactive"


class InvalidToken(FhirbridgeError):
    """The access token is refused. ``reason`` says why in a few words; ``claim`` names the claim at
    fault, if any; neither, nor the message, ever holds the token or a claim's value."""

    def __init__(self, reason: Reason, *, claim: str | None = None) -> None:
        super().__init__(f"invalid access token: {reason}" + (f" ({claim})" if claim else ""))
        self.reason = reason
        self.claim = claim


class IssuerUnavailable(TransientError):
    """The issuer that must vouch for a token could not be asked (down, slow, or answering nonsense):
    the request may succeed later. ``issuer`` is the configured issuer URL."""

    def __init__(self, issuer: str, reason: str) -> None:
        super().__init__(f"the access token's issuer is unavailable: {reason}")
        self.issuer = issuer
        self.reason = reason


class IssuersFileError(ConfigError):
    """The issuers file is unusable; ``file``, ``index`` (of the ``[[issuer]]`` table, from 0) and ``key``
    locate the fault when it has one."""

    def __init__(self, file: Path, problem: str, *, index: int | None = None, key: str | None = None) -> None:
        where = str(file)
        if index is not None:
            where += f": [[issuer]] table {index + 1}"
        if key is not None:
            where += f", key {key!r}"
        super().__init__(f"{where}: {problem}")
        self.file, self.index, self.key = file, index, key


@dataclass(frozen=True, slots=True)
class Issuer:
    """A trusted token issuer. ``url`` is its ``iss``; ``organization`` the one source organisation it
    speaks for. ``jwks_uri`` skips OpenID discovery; ``introspection_url`` with ``client_id`` and
    ``client_secret`` lets it vouch for opaque tokens."""

    url: str
    organization: str
    jwks_uri: str | None = None
    introspection_url: str | None = None
    client_id: str | None = None
    client_secret: str | None = field(default=None, repr=False)
    #: the issuer names each user's organisation in its tokens (IHE IUA's
    #: ``extensions.ihe_iua.subject_organization_id``): only the embedded issuer, whose users are
    #: registered with their organisation; the claim of any other issuer is never read
    user_organizations: bool = False

    @property
    def discovery_url(self) -> str:
        return self.url.rstrip("/") + "/.well-known/openid-configuration"


@dataclass(frozen=True, slots=True)
class AccessContext:
    """What a verified token says. ``organization`` comes from the issuer's configuration, never from
    the token (but for the embedded issuer's users: :attr:`Issuer.user_organizations`); ``patient`` and ``fhir_user`` are the SMART ``patient`` and ``fhirUser`` claims;
    ``expires_at`` is the ``exp`` in seconds since the epoch (None for an opaque token without one)."""

    issuer: str
    organization: str
    subject: str | None
    client_id: str | None
    scopes: ScopeSet
    patient: str | None
    fhir_user: str | None
    token_id: str | None
    expires_at: int | None
    #: the v3-ActReason purposes of use the token states (:mod:`bridge.service.auth.purpose`)
    purpose_of_use: tuple[str, ...] = ()


_ISSUER_KEYS = ("url", "organization", "jwks_uri", "introspection_url", "client_id", "client_secret_file")


def load_issuers(path: str | os.PathLike[str]) -> tuple[Issuer, ...]:
    """The issuers of a TOML file with one ``[[issuer]]`` table each: ``url`` and ``organization``
    (required), ``jwks_uri``, and ``introspection_url`` with ``client_id`` and ``client_secret_file``
    (the secret is read from that file, relative to the TOML file's folder; never from the TOML).
    URLs must be https (http only on a loopback host). Raises :class:`IssuersFileError`."""
    file = Path(path)
    try:
        text = file.read_bytes().decode("utf-8")
    except OSError as exc:
        raise IssuersFileError(file, f"cannot read the issuers file ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise IssuersFileError(file, "the issuers file is not UTF-8") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise IssuersFileError(file, f"not valid TOML: {exc}") from None
    for key in data:
        if key != "issuer":
            raise IssuersFileError(file, "unknown top-level key; the file holds [[issuer]] tables", key=key)
    tables = data.get("issuer")
    if not isinstance(tables, list) or not tables:
        raise IssuersFileError(file, "no [[issuer]] table (write one [[issuer]] table per trusted issuer)")
    issuers = []
    for index, table in enumerate(tables):
        if not isinstance(table, dict):
            raise IssuersFileError(file, "not a table", index=index)
        issuers.append(_issuer_from_table(file, index, table))
    try:
        check_issuers(issuers)
    except ConfigError as exc:
        raise IssuersFileError(file, str(exc)) from None
    return tuple(issuers)


def _issuer_from_table(file: Path, index: int, table: dict[str, Any]) -> Issuer:
    def fail(key: str | None, problem: str) -> IssuersFileError:
        return IssuersFileError(file, problem, index=index, key=key)

    for key in table:
        if key not in _ISSUER_KEYS:
            hint = " (put the secret in a file named by client_secret_file)" if key == "client_secret" else ""
            raise fail(key, f"unknown key; the keys are {', '.join(_ISSUER_KEYS)}{hint}")
    for key, value in table.items():
        if not isinstance(value, str) or not value.strip():
            raise fail(key, "must be a non-empty string")
    for key in ("url", "organization"):
        if key not in table:
            raise fail(key, "is required")
    for key in ("url", "jwks_uri", "introspection_url"):
        if key in table and (problem := _url_problem(table[key])):
            raise fail(key, problem)
    client_keys = [k for k in ("client_id", "client_secret_file") if k in table]
    if "introspection_url" in table and len(client_keys) < 2:
        missing = "client_id" if "client_id" not in table else "client_secret_file"
        raise fail(missing, "is required with introspection_url")
    if "introspection_url" not in table and client_keys:
        raise fail(client_keys[0], "is only used with introspection_url, which is missing")
    secret = None
    if "client_secret_file" in table:
        secret = _read_secret(file.parent / table["client_secret_file"], fail)
    return Issuer(
        url=table["url"],
        organization=table["organization"],
        jwks_uri=table.get("jwks_uri"),
        introspection_url=table.get("introspection_url"),
        client_id=table.get("client_id"),
        client_secret=secret,
    )


def _read_secret(path: Path, fail: Callable[[str | None, str], IssuersFileError]) -> str:
    try:
        secret = path.read_text(encoding="utf-8").strip()
        mode = path.stat().st_mode
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8"
        raise fail("client_secret_file", f"cannot read the secret file {path} ({reason})") from None
    if not secret:
        raise fail("client_secret_file", f"the secret file {path} is empty")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("auth.secret_file_open", file=str(path), mode=oct(stat.S_IMODE(mode)))
    return secret


def _url_problem(url: str) -> str | None:
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:
        return "is not a URL"
    if parts.scheme not in ("https", "http") or not host:
        return "must be an https URL"
    if parts.scheme == "http" and host not in _LOOPBACK:
        return "must be an https URL (http is accepted on a loopback host only)"
    if parts.query or parts.fragment:
        return "must have no query and no fragment"
    return None


def check_issuers(issuers: Iterable[Issuer]) -> None:
    """Raise ConfigError when two issuers share a URL, or more than one has an introspection URL."""
    seen: set[str] = set()
    introspecting = []
    for issuer in issuers:
        if issuer.url in seen:
            raise ConfigError(f"the issuer {issuer.url} is configured twice")
        seen.add(issuer.url)
        if issuer.introspection_url:
            if not (issuer.client_id and issuer.client_secret):
                raise ConfigError(
                    f"the issuer {issuer.url} has an introspection URL but no client credentials"
                )
            introspecting.append(issuer.url)
    if len(introspecting) > 1:
        raise ConfigError(
            "more than one issuer has an introspection_url; an opaque token does not say who issued it, "
            "and sending it to several issuers would show each one the others' tokens"
        )


class _Registry(JWSRegistry):
    """joserfc's JWS registry restricted to :data:`ALGORITHMS`. Unknown header parameters are allowed
    (issuers add their own; ``crit`` is still enforced), and ``get_alg`` does not warn about ``EdDSA``
    at every verification (RFC 9864 deprecates the name, not the algorithm)."""

    def __init__(self) -> None:
        super().__init__(algorithms=sorted(ALGORITHMS), strict_check_header=False)

    def get_alg(self, name: str) -> JWSAlgModel:
        if name not in ALGORITHMS or name not in self.algorithms:
            raise UnsupportedAlgorithmError("algorithm not allowed")
        return self.algorithms[name]


_REGISTRY = _Registry()


@dataclass(slots=True)
class _Keys:
    """An issuer's verification keys, parsed once: by ``kid``, and all of them (for a token without one)."""

    by_kid: dict[str, list[Key]]
    every: list[Key]
    #: (kid, alg) -> the key to verify with, or None: worked out once per pair
    chosen: dict[tuple[str | None, str], Key | None] = field(default_factory=dict)

    def find(self, kid: str | None, alg: str) -> Key | None:
        try:
            return self.chosen[kid, alg]
        except KeyError:
            pass
        model = _REGISTRY.algorithms[alg]
        candidates = self.every if kid is None else self.by_kid.get(kid, [])
        fitting = [k for k in candidates if _fits(model, k)]
        # without a kid, a key is chosen only when it is the one that fits
        key = fitting[0] if fitting and (kid is not None or len(fitting) == 1) else None
        if len(self.chosen) < 1024:
            self.chosen[kid, alg] = key
        return key


def _fits(model: JWSAlgModel, key: Key) -> bool:
    try:
        model.check_key(key)
    except JoseError:
        return False
    return True


def parse_jwks(document: Mapping[str, Any] | KeySet, *, source: str = "") -> _Keys:
    """The public signing keys of a JWKS (a dict, or a joserfc KeySet): RSA (2048 bits or more), EC
    and OKP keys whose ``use`` is ``sig`` or absent. Private members are dropped; a key that cannot be
    imported is skipped (and logged with its ``kid``)."""
    if isinstance(document, KeySet):
        document = document.as_dict(private=False)
    items = document.get("keys") if isinstance(document, Mapping) else None
    by_kid: dict[str, list[Key]] = {}
    every: list[Key] = []
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, dict):
            continue
        kid = item.get("kid")
        if item.get("kty") not in ("RSA", "EC", "OKP") or item.get("use", "sig") != "sig":
            continue
        public = {k: v for k, v in item.items() if k not in _PRIVATE_MEMBERS}
        try:
            with warnings.catch_warnings():  # a short RSA key warns; it is refused below
                warnings.simplefilter("ignore")
                key = JWKRegistry.import_key(public)
        except (JoseError, ValueError, TypeError, KeyError) as exc:
            log.warning("auth.jwk_skipped", source=source, kid=str(kid), error=type(exc).__name__)
            continue
        if isinstance(key, RSAKey) and key.public_key.key_size < 2048:
            log.warning("auth.jwk_skipped", source=source, kid=str(kid), error="rsa key under 2048 bits")
            continue
        every.append(key)
        if isinstance(kid, str):
            by_kid.setdefault(kid, []).append(key)
    return _Keys(by_kid, every)


#: keys given in-process: a joserfc KeySet, a JWKS dict, or a function returning either (called again
#: when a ``kid`` is unknown, and every JWKS_MIN_AGE seconds)
KeySource = KeySet | Mapping[str, Any] | Callable[[], KeySet | Mapping[str, Any]]


@dataclass(slots=True)
class _IssuerState:
    issuer: Issuer
    jwt_claims: JWTClaimsRegistry
    introspection_claims: JWTClaimsRegistry
    static: bool = False
    source: Callable[[], KeySet | Mapping[str, Any]] | None = None
    cooldown: float = REFETCH_COOLDOWN
    keys: _Keys | None = None
    #: when the keys must be fetched again, and when a fetch was last tried
    expires: float = 0.0
    fetched: float = float("-inf")
    #: bumped at every fetch, so that a coroutine that waited for another one's fetch does not repeat it
    generation: int = 0
    jwks_uri: str | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class TokenVerifier:
    """Verifies access tokens issued by ``issuers`` for ``audience`` (the service's FHIR base URL).

    ``static_keys`` maps an issuer URL (one of ``issuers``) to its keys, given in-process rather than
    fetched (:data:`KeySource`): a joserfc ``KeySet`` or a JWKS dict (``{"keys": [...]}``), or a
    function returning the current one (asked again for an unknown ``kid``, at most once a second, and
    every minute), so that a key rotated by another process is picked up; private members are dropped.
    This is how the embedded authorization server's keys are handed over; :meth:`set_static_keys`
    replaces them. ``session_factory`` makes the aiohttp session used to talk to the
    issuers (one, made on first use, closed by :meth:`close`); ``clock`` is ``time.time`` (tests pass
    their own). Raises ConfigError for an inconsistent configuration (see :func:`check_issuers`).
    """

    def __init__(
        self,
        issuers: Iterable[Issuer],
        audience: str,
        *,
        static_keys: Mapping[str, KeySource] | None = None,
        leeway: int = 30,
        session_factory: Callable[[], aiohttp.ClientSession] | None = None,
        clock: Callable[[], float] = time.time,
        http_timeout: float = 5.0,
        introspection_cache_seconds: float = 60.0,
    ) -> None:
        issuers = list(issuers)
        check_issuers(issuers)
        if not audience:
            raise ConfigError("the token audience (the service's FHIR base URL) is empty")
        self.audience = audience
        self._clock = clock
        self._leeway = leeway
        self._session_factory = session_factory or _default_session
        self._session: aiohttp.ClientSession | None = None
        self._timeout = aiohttp.ClientTimeout(total=http_timeout)
        self._introspection_ttl = introspection_cache_seconds
        self._introspected: dict[bytes, tuple[float, AccessContext]] = {}
        self._issuers: dict[str, _IssuerState] = {}
        for issuer in issuers:
            self._issuers[issuer.url] = _IssuerState(
                issuer,
                jwt_claims=self._claims_registry(issuer, essential=True),
                introspection_claims=self._claims_registry(issuer, essential=False),
                jwks_uri=issuer.jwks_uri,
            )
        self._introspector = next((s for s in self._issuers.values() if s.issuer.introspection_url), None)
        for url, keys in (static_keys or {}).items():
            self.set_static_keys(url, keys)

    def _claims_registry(self, issuer: Issuer, *, essential: bool) -> JWTClaimsRegistry:
        # ``aud`` is always required: an introspection answer without one (RFC 7662 makes it optional)
        # is a token minted for no resource in particular, which this service must not accept
        return JWTClaimsRegistry(
            now=lambda: int(self._clock()),
            leeway=self._leeway,
            iss={"essential": essential, "value": issuer.url},
            aud={"essential": True, "value": self.audience},
            exp={"essential": essential},
        )

    def set_static_keys(self, issuer_url: str, keys: KeySource) -> None:
        """Use ``keys`` (:data:`KeySource`) for ``issuer_url``, which must be configured, from now on,
        instead of fetching them. Raises ConfigError for an issuer that is not configured."""
        state = self._issuers.get(issuer_url)
        if state is None:
            raise ConfigError(f"static keys are given for {issuer_url}, which is not a configured issuer")
        if callable(keys):
            state.static, state.source, state.cooldown = False, keys, LOCAL_COOLDOWN
            state.keys, state.expires, state.fetched = None, 0.0, float("-inf")
        else:
            state.static, state.source = True, None
            state.keys, state.expires = parse_jwks(keys, source=issuer_url), float("inf")
        state.generation += 1

    async def close(self) -> None:
        """Close the HTTP session, if one was made."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def verify(self, token: str) -> AccessContext:
        """The access context of ``token`` (the bearer token, without ``Bearer``).

        Raises :class:`InvalidToken` when it is refused, :class:`IssuerUnavailable` when its issuer
        could not be asked for keys or introspection (retry later)."""
        if not isinstance(token, str) or len(token) > MAX_TOKEN_LENGTH or not _B64TOKEN.fullmatch(token):
            raise InvalidToken(Reason.MALFORMED)
        if token.count(".") == 2:
            try:
                signed = jws.extract_compact(token.encode("ascii"), registry=_REGISTRY)
            except JoseError:
                signed = None  # not a JWS: perhaps an opaque token with dots in it
            if signed is not None:
                return await self._verify_jwt(signed)
        if self._introspector is None:
            raise InvalidToken(Reason.MALFORMED)
        return await self._introspect(self._introspector, token)

    async def _verify_jwt(self, signed: jws.CompactSignature) -> AccessContext:
        header = signed.headers()
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in ALGORITHMS:
            raise InvalidToken(Reason.ALGORITHM)
        try:
            claims = orjson.loads(signed.payload)
        except orjson.JSONDecodeError:
            raise InvalidToken(Reason.MALFORMED) from None
        if not isinstance(claims, dict):
            raise InvalidToken(Reason.MALFORMED)
        iss = claims.get("iss")
        state = self._issuers.get(iss) if isinstance(iss, str) else None
        if state is None:
            raise InvalidToken(Reason.UNKNOWN_ISSUER)
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise InvalidToken(Reason.MALFORMED)
        key = await self._key(state, kid, alg)
        try:
            valid = jws.validate_compact(signed, key, registry=_REGISTRY)
        except JoseError:
            valid = False
        if not valid:
            raise InvalidToken(Reason.BAD_SIGNATURE)
        self._check_claims(state.jwt_claims, claims)
        return _context(state.issuer, claims)

    def _check_claims(self, registry: JWTClaimsRegistry, claims: dict[str, Any]) -> None:
        try:
            registry.validate(claims)
        except ExpiredTokenError:
            raise InvalidToken(Reason.EXPIRED) from None
        except MissingClaimError as exc:
            raise InvalidToken(Reason.MISSING_CLAIM, claim=exc.claim) from None
        except InvalidClaimError as exc:
            reason = {
                "aud": Reason.WRONG_AUDIENCE,
                "iss": Reason.WRONG_ISSUER,
                "nbf": Reason.NOT_YET_VALID,
                "iat": Reason.NOT_YET_VALID,
            }.get(exc.claim, Reason.INVALID_CLAIM)
            raise InvalidToken(reason, claim=exc.claim) from None
        except ClaimError as exc:
            raise InvalidToken(Reason.INVALID_CLAIM, claim=exc.claim) from None

    async def _key(self, state: _IssuerState, kid: str | None, alg: str) -> Key:
        if state.keys is None or self._clock() >= state.expires:
            await self._refresh(state, why="expired")
        if state.keys is None:  # the fetch another request waited for failed
            raise IssuerUnavailable(state.issuer.url, "no keys")
        key = state.keys.find(kid, alg)
        if key is None and not state.static and self._clock() - state.fetched >= state.cooldown:
            await self._refresh(state, why="unknown kid")
            key = state.keys.find(kid, alg)
        if key is None:
            raise InvalidToken(Reason.UNKNOWN_KEY)
        return key

    async def _refresh(self, state: _IssuerState, *, why: str) -> None:
        """Fetch the issuer's JWKS, once however many requests wait for it (they find the keys, or none,
        when it is done). When the fetch fails, the keys already known stay in use until the next try, one
        cool-down later; IssuerUnavailable is raised when there are none, or a ``kid`` was looked for."""
        generation = state.generation  # read before waiting: a change means another request fetched
        async with state.lock:
            if state.generation != generation:
                return
            now = self._clock()
            if state.keys is None and now - state.fetched < state.cooldown:
                raise IssuerUnavailable(state.issuer.url, "the last JWKS fetch failed")
            state.fetched = now
            document: KeySet | Mapping[str, Any]
            headers: Mapping[str, str] = {}
            try:
                if state.source is not None:
                    document = self._from_source(state)
                else:
                    uri = state.jwks_uri or await self._discover(state)
                    document, headers = await self._get_json(state.issuer.url, uri)
            except IssuerUnavailable:
                state.jwks_uri = state.issuer.jwks_uri  # discover again next time
                state.expires = now + state.cooldown
                if state.keys is None or why == "unknown kid":
                    raise
                log.warning("auth.jwks_stale", issuer=state.issuer.url)
                return
            finally:
                state.generation += 1
            state.keys = parse_jwks(document, source=state.issuer.url)
            age = JWKS_MIN_AGE if state.source is not None else cache_age(headers.get("Cache-Control"))
            state.expires = now + age
            report = log.debug if state.source is not None else log.info  # a local source: every minute
            report(
                "auth.jwks_fetched", issuer=state.issuer.url, keys=len(state.keys.every), max_age=age, why=why
            )

    def _from_source(self, state: _IssuerState) -> KeySet | Mapping[str, Any]:
        assert state.source is not None
        try:
            return state.source()
        except (FhirbridgeError, OSError, ValueError) as exc:  # a key file being rewritten, unreadable
            log.warning("auth.key_source_failed", issuer=state.issuer.url, error=type(exc).__name__)
            raise IssuerUnavailable(state.issuer.url, "its key source failed") from exc

    async def _discover(self, state: _IssuerState) -> str:
        doc, _ = await self._get_json(state.issuer.url, state.issuer.discovery_url)
        if doc.get("issuer") != state.issuer.url:
            log.error("auth.discovery_mismatch", issuer=state.issuer.url)
            raise IssuerUnavailable(state.issuer.url, "its discovery document names another issuer")
        uri = doc.get("jwks_uri")
        if not isinstance(uri, str) or _url_problem(uri):
            raise IssuerUnavailable(state.issuer.url, "its discovery document has no usable jwks_uri")
        state.jwks_uri = uri
        return uri

    async def _introspect(self, state: _IssuerState, token: str) -> AccessContext:
        digest = hashlib.sha256(token.encode("ascii")).digest()
        now = self._clock()
        cached = self._introspected.get(digest)
        if cached is not None:
            if now < cached[0]:
                return cached[1]
            del self._introspected[digest]
        issuer = state.issuer
        assert issuer.introspection_url and issuer.client_id and issuer.client_secret
        # client_secret_basic: the id and the secret are form-encoded, then joined for Basic (RFC 6749
        # section 2.3.1, RFC 7617)
        basic = f"{quote_plus(issuer.client_id)}:{quote_plus(issuer.client_secret)}".encode()
        claims, _ = await self._get_json(
            issuer.url,
            issuer.introspection_url,
            method="POST",
            data={"token": token, "token_type_hint": "access_token"},
            headers={
                "Accept": "application/json",
                "Authorization": "Basic " + base64.b64encode(basic).decode(),
            },
        )
        if claims.get("active") is not True:
            raise InvalidToken(Reason.INACTIVE)
        self._check_claims(state.introspection_claims, claims)
        context = _context(issuer, claims)
        until = now + self._introspection_ttl
        if context.expires_at is not None:
            until = min(until, float(context.expires_at))
        if until > now:
            if len(self._introspected) >= INTROSPECTION_CACHE_SIZE:
                self._evict(now)
            self._introspected[digest] = (until, context)
        return context

    def _evict(self, now: float) -> None:
        for digest in [d for d, (until, _) in self._introspected.items() if until <= now]:
            del self._introspected[digest]
        while len(self._introspected) >= INTROSPECTION_CACHE_SIZE:
            del self._introspected[next(iter(self._introspected))]  # the oldest

    async def _get_json(
        self, issuer_url: str, url: str, *, method: str = "GET", **kwargs: Any
    ) -> tuple[dict[str, Any], Mapping[str, str]]:
        if self._session is None:
            self._session = self._session_factory()
        try:
            async with self._session.request(
                method, url, timeout=self._timeout, allow_redirects=False, **kwargs
            ) as response:
                body = await response.content.read(MAX_RESPONSE_BYTES + 1)
                status, headers = response.status, response.headers
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            log.warning("auth.issuer_unreachable", issuer=issuer_url, url=url, error=type(exc).__name__)
            raise IssuerUnavailable(issuer_url, "unreachable") from exc
        problem = None
        document: Any = None
        if status != 200:
            problem = f"HTTP status {status}"
        elif len(body) > MAX_RESPONSE_BYTES:
            problem = "answer too large"
        else:
            try:
                document = orjson.loads(body)
            except orjson.JSONDecodeError:
                problem = "answer is not JSON"
            else:
                if not isinstance(document, dict):
                    problem = "answer is not a JSON object"
        if problem is not None:
            log.warning("auth.issuer_bad_answer", issuer=issuer_url, url=url, problem=problem)
            raise IssuerUnavailable(issuer_url, problem)
        return document, headers


def cache_age(cache_control: str | None) -> float:
    """How long to keep a JWKS: its ``max-age``, bounded to [JWKS_MIN_AGE, JWKS_MAX_AGE]; the minimum
    for ``no-store``/``no-cache``; JWKS_DEFAULT_AGE without either."""
    if not cache_control:
        return JWKS_DEFAULT_AGE
    m = _MAX_AGE.search(cache_control)
    if m is not None:
        return min(max(float(m.group(1)), JWKS_MIN_AGE), JWKS_MAX_AGE)
    lowered = cache_control.lower()
    if "no-store" in lowered or "no-cache" in lowered:
        return JWKS_MIN_AGE
    return JWKS_DEFAULT_AGE


def _context(issuer: Issuer, claims: Mapping[str, Any]) -> AccessContext:
    def text(name: str) -> str | None:
        value = claims.get(name)
        if value is not None and not isinstance(value, str):
            raise InvalidToken(Reason.INVALID_CLAIM, claim=name)
        return value

    exp = claims.get("exp")
    try:
        purposes = purposes_of(claims)
    except PurposeError as exc:
        raise InvalidToken(Reason.INVALID_CLAIM, claim=str(exc)) from None
    organization = issuer.organization
    if issuer.user_organizations:
        named = ((claims.get("extensions") or {}).get("ihe_iua") or {}).get("subject_organization_id")
        if named is not None and (not isinstance(named, str) or not named):
            raise InvalidToken(Reason.INVALID_CLAIM, claim="extensions.ihe_iua.subject_organization_id")
        organization = named or organization
    return AccessContext(
        issuer=issuer.url,
        organization=organization,
        subject=text("sub"),
        client_id=text("client_id") or text("azp"),
        scopes=_scopes(claims),
        patient=text("patient"),
        fhir_user=text("fhirUser"),
        token_id=text("jti"),
        expires_at=int(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else None,
        purpose_of_use=purposes,
    )


def _scopes(claims: Mapping[str, Any]) -> ScopeSet:
    """``scope`` (text), else ``scp`` (text or a list, as Okta and Entra ID write it)."""
    value = claims.get("scope")
    if value is not None and not isinstance(value, str):
        raise InvalidToken(Reason.INVALID_CLAIM, claim="scope")
    if value is None:
        value = claims.get("scp")
        if value is not None and not isinstance(value, str | list):
            raise InvalidToken(Reason.INVALID_CLAIM, claim="scp")
    if isinstance(value, str) and len(value) <= 2048:
        return _parse_scope_text(value)
    return ScopeSet.parse(value)


# a client's tokens carry the same few scope strings: each is parsed once (a ScopeSet is immutable)
_parse_scope_text = functools.lru_cache(maxsize=1024)(ScopeSet.parse)


def _default_session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(headers={"User-Agent": "fhirbridge"})
