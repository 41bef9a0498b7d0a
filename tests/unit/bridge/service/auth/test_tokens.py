"""The resource server's token check against a local identity provider (aiohttp): OpenID discovery,
a JWKS with Cache-Control, RFC 7662 introspection. Keys are made here; the clock is the test's."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import stat
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

import aiohttp
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from joserfc import jwt
from joserfc.jwk import ECKey, JWKRegistry, Key, KeySet, OctKey, OKPKey, RSAKey

from bridge.errors import ConfigError, TransientError
from bridge.service.auth import tokens
from bridge.service.auth.tokens import (
    AccessContext,
    InvalidToken,
    Issuer,
    IssuersFileError,
    IssuerUnavailable,
    Reason,
    TokenVerifier,
    cache_age,
    load_issuers,
    parse_jwks,
)

AUDIENCE = "https://fhir.example.org/fhir"
NOW = 1_900_000_000
SUBJECT = "subject-7f3a-do-not-log"

RSA_1 = RSAKey.generate_key(2048, parameters={"kid": "rsa-1"})
RSA_2 = RSAKey.generate_key(2048, parameters={"kid": "rsa-2"})
EC_1 = ECKey.generate_key("P-256", parameters={"kid": "ec-1"})
ED_1 = OKPKey.generate_key("Ed25519", parameters={"kid": "ed-1"})


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class IdP:
    """A local identity provider: what it serves is set by the test, what it was asked is counted."""

    def __init__(self) -> None:
        self.url = ""
        self.keys: list[Key] = [RSA_1, EC_1, ED_1]
        self.cache_control: str | None = "public, max-age=300"
        self.jwks_status = 200
        self.discovery_issuer: str | None = None
        self.hits: Counter[str] = Counter()
        self.client = ("fhirbridge", "s3cret:&")
        self.answers: dict[str, dict[str, Any]] = {}
        self.forms: list[dict[str, str]] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", self.discovery)
        app.router.add_get("/keys", self.jwks)
        app.router.add_post("/introspect", self.introspect)
        return app

    async def discovery(self, request: web.Request) -> web.Response:
        self.hits["discovery"] += 1
        issuer = self.discovery_issuer or self.url
        return web.json_response({"issuer": issuer, "jwks_uri": f"{self.url}/keys"})

    async def jwks(self, request: web.Request) -> web.Response:
        self.hits["jwks"] += 1
        if self.jwks_status != 200:
            return web.Response(status=self.jwks_status)
        headers = {"Cache-Control": self.cache_control} if self.cache_control else {}
        return web.json_response(KeySet(self.keys).as_dict(private=False), headers=headers)

    async def introspect(self, request: web.Request) -> web.Response:
        self.hits["introspect"] += 1
        # client_secret_basic: id and secret form-encoded, then Basic (RFC 6749 section 2.3.1)
        expected = "Basic " + base64.b64encode(":".join(_form(v) for v in self.client).encode()).decode()
        if request.headers.get("Authorization") != expected:
            return web.json_response({"error": "invalid_client"}, status=401)
        form = dict(await request.post())
        self.forms.append({k: str(v) for k, v in form.items()})
        return web.json_response(self.answers.get(str(form.get("token")), {"active": False}))


def _form(value: str) -> str:
    return quote_plus(value)


@pytest.fixture
async def idp(aiohttp_server: Any) -> IdP:
    provider = IdP()
    server = await aiohttp_server(provider.app())
    provider.url = str(server.make_url("")).rstrip("/")
    return provider


@pytest.fixture
async def make_verifier() -> AsyncIterator[Callable[..., TokenVerifier]]:
    made: list[TokenVerifier] = []

    def make(issuers: list[Issuer], **kwargs: Any) -> TokenVerifier:
        kwargs.setdefault("clock", Clock())
        verifier = TokenVerifier(issuers, AUDIENCE, **kwargs)
        made.append(verifier)
        return verifier

    yield make
    for verifier in made:
        await verifier.close()


def issuer_of(idp: IdP, **kwargs: Any) -> Issuer:
    return Issuer(url=idp.url, organization="org-a", **kwargs)


def claims_for(iss: str, **extra: Any) -> dict[str, Any]:
    claims = {
        "iss": iss,
        "aud": AUDIENCE,
        "sub": SUBJECT,
        "client_id": "app-1",
        "scope": "openid fhirUser patient/Observation.rs launch/patient",
        "iat": NOW - 10,
        "exp": NOW + 290,
        "jti": "jti-1",
        "patient": "pat-123",
        "fhirUser": "Practitioner/9",
    }
    claims.update(extra)
    return {k: v for k, v in claims.items() if v is not None}


def sign(key: Key, claims: dict[str, Any], *, alg: str | None = None, **header: Any) -> str:
    alg = alg or {"RSA": "RS256", "EC": "ES256", "OKP": "EdDSA"}[key.key_type]
    head = {"alg": alg, "kid": key.kid, **header}
    head = {k: v for k, v in head.items() if v is not None}
    return jwt.encode(head, claims, key, algorithms=[alg])


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


async def refused(verifier: TokenVerifier, token: str) -> InvalidToken:
    with pytest.raises(InvalidToken) as info:
        await verifier.verify(token)
    return info.value


# -- valid tokens ------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:EdDSA is deprecated")
@pytest.mark.parametrize(
    ("key", "alg"), [(RSA_1, "RS256"), (EC_1, "ES256"), (ED_1, "EdDSA"), (RSA_1, "PS256")]
)
async def test_valid_token_gives_its_context(idp: IdP, make_verifier: Any, key: Key, alg: str) -> None:
    verifier = make_verifier([issuer_of(idp)])
    context = await verifier.verify(sign(key, claims_for(idp.url), alg=alg))
    assert context == AccessContext(
        issuer=idp.url,
        organization="org-a",
        subject=SUBJECT,
        client_id="app-1",
        scopes=context.scopes,
        patient="pat-123",
        fhir_user="Practitioner/9",
        token_id="jti-1",
        expires_at=NOW + 290,
    )
    assert [str(s) for s in context.scopes.scopes] == ["patient/Observation.rs"]
    assert context.scopes.other == {"openid", "fhirUser", "launch/patient"}
    assert idp.hits == {"discovery": 1, "jwks": 1}


IUA = "http://terminology.hl7.org/CodeSystem/v3-ActReason"


@pytest.mark.parametrize(
    ("extra", "purposes"),
    [
        ({"extensions": {"ihe_iua": {"purpose_of_use": [{"system": IUA, "code": "PUBHLTH"}]}}}, ("PUBHLTH",)),
        ({"extensions": {"ihe_iua": {"purpose_of_use": {"system": IUA, "code": "ETREAT"}}}}, ("ETREAT",)),
        ({"purpose_of_use": "HRESCH"}, ("HRESCH",)),
        ({"purpose_of_use": ["TREAT", {"code": "BTG"}, "TREAT"]}, ("TREAT", "BTG")),
        ({}, ()),
    ],
)
async def test_purpose_of_use_is_read_from_the_iua_or_top_level_claim(
    idp: IdP, make_verifier: Any, extra: dict[str, Any], purposes: tuple[str, ...]
) -> None:
    verifier = make_verifier([issuer_of(idp)])
    context = await verifier.verify(sign(RSA_1, claims_for(idp.url, **extra)))
    assert context.purpose_of_use == purposes


@pytest.mark.parametrize(
    "extra",
    [
        {"purpose_of_use": "NOSUCH"},
        {"purpose_of_use": []},
        {"purpose_of_use": 7},
        {
            "extensions": {
                "ihe_iua": {"purpose_of_use": [{"system": "http://example.org/x", "code": "TREAT"}]}
            }
        },
        {"extensions": "ihe_iua"},
    ],
)
async def test_unreadable_purpose_of_use_refuses_the_token(
    idp: IdP, make_verifier: Any, extra: dict[str, Any]
) -> None:
    """A purpose the consent rules could not read must not pass for no purpose at all."""
    verifier = make_verifier([issuer_of(idp)])
    error = await refused(verifier, sign(RSA_1, claims_for(idp.url, **extra)))
    assert error.reason == Reason.INVALID_CLAIM
    assert "NOSUCH" not in str(error)


async def test_only_the_embedded_issuer_names_its_users_organisations(idp: IdP, make_verifier: Any) -> None:
    claims = claims_for(idp.url, extensions={"ihe_iua": {"subject_organization_id": "riverside"}})
    external = await make_verifier([issuer_of(idp)]).verify(sign(RSA_1, claims))
    assert external.organization == "org-a"  # an issuer speaks for its organisation and no other
    embedded = await make_verifier([issuer_of(idp, user_organizations=True)]).verify(sign(RSA_1, claims))
    assert embedded.organization == "riverside"
    without = await make_verifier([issuer_of(idp, user_organizations=True)]).verify(
        sign(RSA_1, claims_for(idp.url))
    )
    assert without.organization == "org-a"


async def test_keys_are_fetched_once_and_parsed_once(
    idp: IdP, make_verifier: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    imported = Counter[str]()
    real_import = JWKRegistry.import_key

    def counting(data: Any, *args: Any, **kwargs: Any) -> Key:
        imported[data["kid"]] += 1
        return real_import(data, *args, **kwargs)

    monkeypatch.setattr(JWKRegistry, "import_key", counting)
    verifier = make_verifier([issuer_of(idp)])
    for key in (RSA_1, EC_1, RSA_1, EC_1, RSA_1):
        await verifier.verify(sign(key, claims_for(idp.url)))
    assert idp.hits == {"discovery": 1, "jwks": 1}
    assert imported == {"rsa-1": 1, "ec-1": 1, "ed-1": 1}


async def test_configured_jwks_uri_skips_discovery(idp: IdP, make_verifier: Any) -> None:
    verifier = make_verifier([issuer_of(idp, jwks_uri=f"{idp.url}/keys")])
    await verifier.verify(sign(EC_1, claims_for(idp.url)))
    assert idp.hits == {"jwks": 1}


async def test_concurrent_first_requests_fetch_the_keys_once(idp: IdP, make_verifier: Any) -> None:
    verifier = make_verifier([issuer_of(idp)])
    token = sign(EC_1, claims_for(idp.url))
    contexts = await asyncio.gather(*(verifier.verify(token) for _ in range(20)))
    assert {c.subject for c in contexts} == {SUBJECT}
    assert idp.hits == {"discovery": 1, "jwks": 1}


async def test_aud_may_be_a_list_holding_the_audience(idp: IdP, make_verifier: Any) -> None:
    verifier = make_verifier([issuer_of(idp)])
    token = sign(RSA_1, claims_for(idp.url, aud=["https://other.example", AUDIENCE]))
    assert (await verifier.verify(token)).subject == SUBJECT


async def test_scp_claim_as_a_list_or_text(idp: IdP, make_verifier: Any) -> None:
    verifier = make_verifier([issuer_of(idp)])
    as_list = claims_for(idp.url, scope=None, scp=["user/Patient.rs", "openid", "bogus"])
    context = await verifier.verify(sign(RSA_1, as_list))
    assert [str(s) for s in context.scopes.scopes] == ["user/Patient.rs"]
    assert context.scopes.other == {"openid"} and context.scopes.ignored == ("bogus",)
    as_text = claims_for(idp.url, scope=None, scp="system/*.rs")
    assert [str(s) for s in (await verifier.verify(sign(RSA_1, as_text))).scopes.scopes] == ["system/*.rs"]
    no_scope = claims_for(idp.url, scope=None)
    assert (await verifier.verify(sign(RSA_1, no_scope))).scopes.scopes == ()


async def test_organization_comes_from_the_issuers_table_not_a_claim(idp: IdP, make_verifier: Any) -> None:
    verifier = make_verifier([issuer_of(idp)])
    token = sign(RSA_1, claims_for(idp.url, organization="org-b", org="org-b", tenant="org-b"))
    assert (await verifier.verify(token)).organization == "org-a"


async def test_token_without_kid_uses_the_one_fitting_key(idp: IdP, make_verifier: Any) -> None:
    idp.keys = [RSA_1, EC_1]
    verifier = make_verifier([issuer_of(idp)])
    assert (await verifier.verify(sign(EC_1, claims_for(idp.url), kid=None))).subject == SUBJECT
    idp.keys = [RSA_1, RSA_2]  # two RSA keys: which one is meant cannot be told
    other = make_verifier([issuer_of(idp)])
    assert (await refused(other, sign(RSA_1, claims_for(idp.url), kid=None))).reason is Reason.UNKNOWN_KEY


# -- refused tokens ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"exp": NOW - 31}, Reason.EXPIRED),  # beyond the 30 s leeway
        ({"nbf": NOW + 31}, Reason.NOT_YET_VALID),
        ({"iat": NOW + 31}, Reason.NOT_YET_VALID),
        ({"exp": None}, Reason.MISSING_CLAIM),
        ({"exp": "tomorrow"}, Reason.INVALID_CLAIM),
        ({"aud": "https://other.example/fhir"}, Reason.WRONG_AUDIENCE),
        ({"aud": AUDIENCE + "/"}, Reason.WRONG_AUDIENCE),
        ({"aud": ["https://other.example/fhir"]}, Reason.WRONG_AUDIENCE),
        ({"aud": None}, Reason.MISSING_CLAIM),
        ({"patient": 123}, Reason.INVALID_CLAIM),
        ({"scope": ["patient/*.rs"]}, Reason.INVALID_CLAIM),
    ],
)
async def test_claims_refused(idp: IdP, make_verifier: Any, changes: dict[str, Any], reason: Reason) -> None:
    verifier = make_verifier([issuer_of(idp)])
    error = await refused(verifier, sign(EC_1, claims_for(idp.url, **changes)))
    assert error.reason is reason


@pytest.mark.parametrize(("changes"), [{"exp": NOW - 29}, {"nbf": NOW + 29}, {"iat": NOW + 29}])
async def test_within_the_leeway_is_accepted(idp: IdP, make_verifier: Any, changes: dict[str, Any]) -> None:
    verifier = make_verifier([issuer_of(idp)])
    assert (await verifier.verify(sign(EC_1, claims_for(idp.url, **changes)))).subject == SUBJECT


async def test_unknown_issuer_is_refused_without_asking_anyone(idp: IdP, make_verifier: Any) -> None:
    verifier = make_verifier([issuer_of(idp)])
    for iss in ("https://evil.example", idp.url + "/", None, ["x"], 42):
        error = await refused(verifier, sign(RSA_1, {**claims_for(idp.url), "iss": iss}))
        assert error.reason is Reason.UNKNOWN_ISSUER
    assert idp.hits == {}


async def test_wrong_issuer_a_token_signed_by_another_issuers_key(idp: IdP, make_verifier: Any) -> None:
    """Issuer B has a key with the same kid as issuer A's: a token A signed that claims to come from
    B is checked with B's key, and refused."""
    b_url = "https://b.example.org"
    b_key = RSAKey.generate_key(2048, parameters={"kid": "rsa-1"})
    verifier = make_verifier(
        [issuer_of(idp), Issuer(b_url, "org-b")], static_keys={b_url: KeySet([b_key]).as_dict()}
    )
    assert (await verifier.verify(sign(b_key, claims_for(b_url)))).organization == "org-b"
    forged = sign(RSA_1, claims_for(b_url))  # A's key, B's name
    assert (await refused(verifier, forged)).reason is Reason.BAD_SIGNATURE
    assert (await verifier.verify(sign(RSA_1, claims_for(idp.url)))).organization == "org-a"


async def test_alg_none_is_refused(idp: IdP, make_verifier: Any) -> None:
    verifier = make_verifier([issuer_of(idp)])
    payload = b64(json.dumps(claims_for(idp.url)).encode())
    for header in ({"alg": "none"}, {"alg": "none", "kid": "rsa-1"}, {"alg": "None"}):
        token = f"{b64(json.dumps(header).encode())}.{payload}."
        assert (await refused(verifier, token)).reason is Reason.ALGORITHM
    assert idp.hits == {}


async def test_hs256_signed_with_the_rsa_public_key_is_refused(idp: IdP, make_verifier: Any) -> None:
    verifier = make_verifier([issuer_of(idp)])
    pem = RSA_1.public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    jwk_json = json.dumps(RSA_1.as_dict(private=False)).encode()
    for alg, secret in (("HS256", pem), ("HS256", jwk_json), ("HS384", pem), ("HS512", pem)):
        signing_input = f"{b64(json.dumps({'alg': alg, 'kid': 'rsa-1'}).encode())}.{b64(json.dumps(claims_for(idp.url)).encode())}"
        digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
        token = f"{signing_input}.{b64(hmac.new(secret, signing_input.encode(), digest).digest())}"
        assert (await refused(verifier, token)).reason is Reason.ALGORITHM


def test_hs256_key_in_a_jwks_is_never_used() -> None:
    secret = OctKey.generate_key(256, parameters={"kid": "oct-1"})
    keys = parse_jwks({"keys": [secret.as_dict(private=True), *KeySet([RSA_1]).as_dict()["keys"]]})
    assert keys.by_kid.keys() == {"rsa-1"}


async def test_tampered_payload_is_refused(idp: IdP, make_verifier: Any) -> None:
    verifier = make_verifier([issuer_of(idp)])
    header, _, signature = sign(EC_1, claims_for(idp.url)).split(".")
    other = b64(json.dumps(claims_for(idp.url, patient="pat-999")).encode())
    assert (await refused(verifier, f"{header}.{other}.{signature}")).reason is Reason.BAD_SIGNATURE


async def test_key_of_another_type_than_the_alg_is_not_used(idp: IdP, make_verifier: Any) -> None:
    verifier = make_verifier([issuer_of(idp)])
    token = sign(EC_1, claims_for(idp.url), kid="rsa-1")  # ES256, but the kid names an RSA key
    assert (await refused(verifier, token)).reason is Reason.UNKNOWN_KEY


@pytest.mark.parametrize(
    "token",
    ["", "abc def", "é.b.c", "a" * (tokens.MAX_TOKEN_LENGTH + 1), "a.b.c", "eyJhbGciOiJSUzI1NiJ9.%%.x"],
)
async def test_malformed_tokens(idp: IdP, make_verifier: Any, token: str) -> None:
    verifier = make_verifier([issuer_of(idp)])
    assert (await refused(verifier, token)).reason is Reason.MALFORMED
    assert idp.hits == {}


async def test_error_messages_hold_neither_token_nor_claim_values(idp: IdP, make_verifier: Any) -> None:
    verifier = make_verifier([issuer_of(idp)])
    cases = [
        claims_for(idp.url, exp=NOW - 100),
        claims_for(idp.url, aud="https://aud.secret.example"),
        claims_for(idp.url, patient=["pat-secret"]),
        claims_for("https://iss.secret.example"),
    ]
    for claims in cases:
        token = sign(EC_1, claims)
        error = await refused(verifier, token)
        text = f"{error} {error.args} {error.reason} {error.claim}"
        for secret in (token, SUBJECT, "secret", "pat-123"):
            assert secret not in text


# -- the key cache -----------------------------------------------------------------------------------
async def test_unknown_kid_refetches_once_then_waits_for_the_cooldown(idp: IdP, make_verifier: Any) -> None:
    clock = Clock()
    idp.keys = [RSA_1]
    verifier = make_verifier([issuer_of(idp)], clock=clock)
    await verifier.verify(sign(RSA_1, claims_for(idp.url)))
    assert idp.hits["jwks"] == 1
    idp.keys = [RSA_1, RSA_2]  # the issuer rotates
    clock.now += 40
    assert (await verifier.verify(sign(RSA_2, claims_for(idp.url)))).subject == SUBJECT
    assert idp.hits["jwks"] == 2
    bogus = sign(RSA_2, claims_for(idp.url), kid="made-up")
    assert (await refused(verifier, bogus)).reason is Reason.UNKNOWN_KEY
    assert idp.hits["jwks"] == 2  # within the cool-down: not fetched again
    clock.now += tokens.REFETCH_COOLDOWN - 1
    await refused(verifier, bogus)
    assert idp.hits["jwks"] == 2
    clock.now += 1
    await refused(verifier, bogus)
    assert idp.hits["jwks"] == 3
    assert idp.hits["discovery"] == 1


async def test_rotated_key_right_after_the_first_fetch_waits_for_the_cooldown(
    idp: IdP, make_verifier: Any
) -> None:
    clock = Clock()
    idp.keys = [RSA_1]
    verifier = make_verifier([issuer_of(idp)], clock=clock)
    await verifier.verify(sign(RSA_1, claims_for(idp.url)))
    idp.keys = [RSA_2]
    assert (await refused(verifier, sign(RSA_2, claims_for(idp.url)))).reason is Reason.UNKNOWN_KEY
    clock.now += tokens.REFETCH_COOLDOWN
    assert (await verifier.verify(sign(RSA_2, claims_for(idp.url)))).subject == SUBJECT
    assert (await refused(verifier, sign(RSA_1, claims_for(idp.url)))).reason is Reason.UNKNOWN_KEY


async def test_cache_control_max_age_is_honoured(idp: IdP, make_verifier: Any) -> None:
    clock = Clock()
    idp.cache_control = "max-age=120, must-revalidate"
    verifier = make_verifier([issuer_of(idp)], clock=clock)
    token = sign(EC_1, claims_for(idp.url, exp=NOW + 10_000))
    await verifier.verify(token)
    clock.now += 119
    await verifier.verify(token)
    assert idp.hits["jwks"] == 1
    clock.now += 1
    await verifier.verify(token)
    assert idp.hits["jwks"] == 2


@pytest.mark.parametrize(
    ("header", "age"),
    [
        (None, 300),
        ("", 300),
        ("public, max-age=600", 600),
        ('max-age="900"', 900),
        ("MAX-AGE=700", 700),
        ("max-age=0", 60),
        ("max-age=5", 60),
        ("max-age=999999999", 86400),
        ("s-maxage=5000", 300),
        ("no-store", 60),
        ("no-cache, public", 60),
        ("max-age=abc", 300),
        ("private", 300),
    ],
)
def test_cache_age(header: str | None, age: float) -> None:
    assert cache_age(header) == age


async def test_failed_refresh_keeps_the_known_keys(idp: IdP, make_verifier: Any) -> None:
    clock = Clock()
    verifier = make_verifier([issuer_of(idp)], clock=clock)
    token = sign(EC_1, claims_for(idp.url, exp=NOW + 10_000))
    await verifier.verify(token)
    idp.jwks_status = 503
    clock.now += 301  # the cache expired, the issuer fails
    assert (await verifier.verify(token)).subject == SUBJECT
    assert idp.hits["jwks"] == 2
    clock.now += 10
    await verifier.verify(token)
    assert idp.hits["jwks"] == 2  # not asked again within the cool-down
    idp.jwks_status = 200
    clock.now += tokens.REFETCH_COOLDOWN
    await verifier.verify(token)
    assert idp.hits["jwks"] == 3


async def test_unreachable_issuer_is_transient(idp: IdP, make_verifier: Any) -> None:
    clock = Clock()
    idp.jwks_status = 500
    verifier = make_verifier([issuer_of(idp)], clock=clock)
    token = sign(EC_1, claims_for(idp.url))
    with pytest.raises(IssuerUnavailable) as info:
        await verifier.verify(token)
    assert isinstance(info.value, TransientError) and info.value.issuer == idp.url
    with pytest.raises(IssuerUnavailable):
        await verifier.verify(token)
    assert idp.hits["jwks"] == 1  # within the cool-down: failed fast, not asked again
    idp.jwks_status = 200
    clock.now += tokens.REFETCH_COOLDOWN
    assert (await verifier.verify(token)).subject == SUBJECT


async def test_closed_port_is_transient(make_verifier: Any, unused_tcp_port: int) -> None:
    url = f"http://127.0.0.1:{unused_tcp_port}"
    verifier = make_verifier([Issuer(url, "org-a")])
    with pytest.raises(IssuerUnavailable):
        await verifier.verify(sign(EC_1, claims_for(url)))


async def test_discovery_naming_another_issuer_is_not_trusted(idp: IdP, make_verifier: Any) -> None:
    idp.discovery_issuer = "https://impostor.example"
    verifier = make_verifier([issuer_of(idp)])
    with pytest.raises(IssuerUnavailable):
        await verifier.verify(sign(EC_1, claims_for(idp.url)))
    assert idp.hits == {"discovery": 1}


def test_parse_jwks_keeps_public_signing_keys_only() -> None:
    small = {
        "kty": "RSA",
        "kid": "small",
        "n": b64((2**1023 + 1).to_bytes(128, "big")),
        "e": "AQAB",
    }
    document = {
        "keys": [
            RSA_1.as_dict(private=True),  # private members are dropped
            {**EC_1.as_dict(private=False), "use": "enc"},
            ED_1.as_dict(private=False),
            small,
            {"kty": "EC", "kid": "broken", "crv": "P-256", "x": "AA", "y": "AA"},
            "not a key",
        ]
    }
    keys = parse_jwks(document)
    assert keys.by_kid.keys() == {"rsa-1", "ed-1"}
    assert not any(k.is_private for k in keys.every)
    assert parse_jwks({"keys": "x"}).every == [] and parse_jwks({}).every == []


# -- static keys: the embedded authorization server --------------------------------------------------
async def test_embedded_issuer_contract_with_static_jwks(make_verifier: Any) -> None:
    """ES256 with kid; iss <base>/auth, aud <base>, sub, client_id, scope, exp 300 s after iat, jti,
    patient, fhirUser; the keys handed over in-process as a JWKS dict, never fetched."""
    embedded = AUDIENCE + "/auth"
    signing = KeySet([ECKey.generate_key("P-256", parameters={"kid": "as-1"})])

    def no_http() -> aiohttp.ClientSession:
        raise AssertionError("the embedded issuer's keys must not be fetched")

    verifier = make_verifier(
        [Issuer(embedded, "org-local")],
        static_keys={embedded: signing.as_dict(private=True)},
        session_factory=no_http,
    )
    claims = {
        "iss": embedded,
        "aud": AUDIENCE,
        "sub": "user-1",
        "client_id": "app-2",
        "scope": "launch/patient patient/*.rs",
        "iat": NOW,
        "exp": NOW + 300,
        "jti": "0c4f",
        "patient": "pat-1",
        "fhirUser": "Patient/pat-1",
    }
    token = jwt.encode({"alg": "ES256", "kid": "as-1"}, claims, signing, algorithms=["ES256"])
    context = await verifier.verify(token)
    assert (context.issuer, context.organization, context.patient, context.client_id) == (
        embedded,
        "org-local",
        "pat-1",
        "app-2",
    )
    assert context.scopes.allows({"patient"}, "Observation", "r")
    unknown = jwt.encode({"alg": "ES256", "kid": "as-2"}, claims, signing.keys[0], algorithms=["ES256"])
    assert (await refused(verifier, unknown)).reason is Reason.UNKNOWN_KEY


async def test_set_static_keys_rotates(make_verifier: Any) -> None:
    url = "https://embedded.example/auth"
    old, new = (
        ECKey.generate_key("P-256", parameters={"kid": "old"}),
        ECKey.generate_key("P-256", parameters={"kid": "new"}),
    )
    verifier = make_verifier([Issuer(url, "org-a")], static_keys={url: KeySet([old])})
    await verifier.verify(sign(old, claims_for(url)))
    verifier.set_static_keys(url, KeySet([old, new]))
    await verifier.verify(sign(new, claims_for(url)))
    verifier.set_static_keys(url, {"keys": [new.as_dict()]})
    assert (await refused(verifier, sign(old, claims_for(url)))).reason is Reason.UNKNOWN_KEY


async def test_key_source_function_is_asked_again_for_a_rotated_key(make_verifier: Any) -> None:
    """The embedded server's keys as a function (its key file, rotated by another process): asked on
    first use, again for an unknown kid (at most once a second), and every minute (retired keys go)."""
    url = "https://embedded.example/auth"
    old, new = (
        ECKey.generate_key("P-256", parameters={"kid": "old"}),
        ECKey.generate_key("P-256", parameters={"kid": "new"}),
    )
    published = [old]
    calls = []

    def current() -> dict[str, Any]:
        calls.append(1)
        return KeySet(published).as_dict(private=True)

    clock = Clock()
    verifier = make_verifier([Issuer(url, "org-a")], static_keys={url: current}, clock=clock)
    await verifier.verify(sign(old, claims_for(url)))
    await verifier.verify(sign(old, claims_for(url)))
    assert len(calls) == 1
    published.append(new)  # rotated elsewhere
    assert (await refused(verifier, sign(new, claims_for(url)))).reason is Reason.UNKNOWN_KEY  # same second
    clock.now += tokens.LOCAL_COOLDOWN
    await verifier.verify(sign(new, claims_for(url)))
    assert len(calls) == 2
    published.remove(old)  # retired
    await verifier.verify(sign(old, claims_for(url)))  # still cached
    clock.now += tokens.JWKS_MIN_AGE
    assert (await refused(verifier, sign(old, claims_for(url)))).reason is Reason.UNKNOWN_KEY
    assert len(calls) == 3


async def test_key_source_function_failing_is_transient(make_verifier: Any) -> None:
    url = "https://embedded.example/auth"

    def broken() -> dict[str, Any]:
        raise OSError("the key file is being rewritten")

    verifier = make_verifier([Issuer(url, "org-a")], static_keys={url: broken})
    with pytest.raises(IssuerUnavailable):
        await verifier.verify(sign(EC_1, claims_for(url)))


def test_static_keys_for_an_issuer_not_configured() -> None:
    with pytest.raises(ConfigError):
        TokenVerifier([Issuer("https://a.example", "org-a")], AUDIENCE, static_keys={"https://b.example": {}})


def test_verifier_refuses_an_inconsistent_configuration() -> None:
    a = Issuer(
        "https://a.example",
        "org-a",
        introspection_url="https://a.example/i",
        client_id="c",
        client_secret="s",
    )
    b = Issuer(
        "https://b.example",
        "org-b",
        introspection_url="https://b.example/i",
        client_id="c",
        client_secret="s",
    )
    with pytest.raises(ConfigError, match="more than one issuer"):
        TokenVerifier([a, b], AUDIENCE)
    with pytest.raises(ConfigError, match="twice"):
        TokenVerifier([a, Issuer("https://a.example", "org-c")], AUDIENCE)
    with pytest.raises(ConfigError, match="audience"):
        TokenVerifier([a], "")


# -- opaque tokens: introspection --------------------------------------------------------------------
def introspecting(idp: IdP) -> Issuer:
    return issuer_of(
        idp, introspection_url=f"{idp.url}/introspect", client_id=idp.client[0], client_secret=idp.client[1]
    )


def answer(idp: IdP, **changes: Any) -> dict[str, Any]:
    body = {"active": True, **claims_for(idp.url), "token_type": "Bearer", "username": "someone"}
    body.update(changes)
    return {k: v for k, v in body.items() if v is not None}


async def test_opaque_token_accepted_through_introspection(idp: IdP, make_verifier: Any) -> None:
    verifier = make_verifier([introspecting(idp)])
    idp.answers["opaque-1"] = answer(idp, organization="org-b")
    context = await verifier.verify("opaque-1")
    assert (context.organization, context.subject, context.patient, context.expires_at) == (
        "org-a",
        SUBJECT,
        "pat-123",
        NOW + 290,
    )
    assert [str(s) for s in context.scopes.scopes] == ["patient/Observation.rs"]
    assert idp.forms == [{"token": "opaque-1", "token_type_hint": "access_token"}]
    await verifier.verify("opaque-1")
    assert idp.hits["introspect"] == 1  # cached


async def test_inactive_opaque_token_refused(idp: IdP, make_verifier: Any) -> None:
    verifier = make_verifier([introspecting(idp)])
    idp.answers["opaque-2"] = {"active": False}
    assert (await refused(verifier, "opaque-2")).reason is Reason.INACTIVE
    idp.answers["opaque-3"] = {**answer(idp), "active": "true"}  # only JSON true is active
    assert (await refused(verifier, "opaque-3")).reason is Reason.INACTIVE
    assert (await refused(verifier, "never-issued")).reason is Reason.INACTIVE


async def test_introspection_cache_is_bounded_by_exp(idp: IdP, make_verifier: Any) -> None:
    clock = Clock()
    verifier = make_verifier([introspecting(idp)], clock=clock)
    idp.answers["opaque-4"] = answer(idp, exp=NOW + 10)
    await verifier.verify("opaque-4")
    clock.now += 9
    await verifier.verify("opaque-4")
    assert idp.hits["introspect"] == 1
    idp.answers["opaque-4"] = {"active": False}  # revoked, or expired at the issuer
    clock.now += 1
    assert (await refused(verifier, "opaque-4")).reason is Reason.INACTIVE
    assert idp.hits["introspect"] == 2


async def test_introspection_cache_is_bounded_in_time(idp: IdP, make_verifier: Any) -> None:
    clock = Clock()
    verifier = make_verifier([introspecting(idp)], clock=clock, introspection_cache_seconds=60)
    idp.answers["opaque-5"] = answer(idp, exp=NOW + 3600)
    await verifier.verify("opaque-5")
    clock.now += 59
    await verifier.verify("opaque-5")
    assert idp.hits["introspect"] == 1
    clock.now += 1
    await verifier.verify("opaque-5")
    assert idp.hits["introspect"] == 2
    idp.answers["opaque-6"] = answer(idp, exp=None)  # no exp: the time bound alone
    await verifier.verify("opaque-6")
    clock.now += 59
    await verifier.verify("opaque-6")
    assert idp.hits["introspect"] == 3


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"iss": "https://other.example"}, Reason.WRONG_ISSUER),
        ({"aud": "https://other.example/fhir"}, Reason.WRONG_AUDIENCE),
        ({"exp": NOW - 31}, Reason.EXPIRED),
        ({"nbf": NOW + 31}, Reason.NOT_YET_VALID),
        ({"scope": 7}, Reason.INVALID_CLAIM),
    ],
)
async def test_introspection_claims_checked_when_present(
    idp: IdP, make_verifier: Any, changes: dict[str, Any], reason: Reason
) -> None:
    verifier = make_verifier([introspecting(idp)])
    idp.answers["opaque-7"] = answer(idp, **changes)
    assert (await refused(verifier, "opaque-7")).reason is reason


async def test_introspection_without_iss_and_exp_is_accepted_but_not_without_aud(
    idp: IdP, make_verifier: Any
) -> None:
    """RFC 7662 makes every claim optional; an answer without ``aud`` is a token minted for no resource
    in particular (oidc-provider issues one when no resource indicator is asked for): refused."""
    verifier = make_verifier([introspecting(idp)])
    idp.answers["opaque-8"] = {"active": True, "scope": "system/*.rs", "client_id": "svc", "aud": AUDIENCE}
    context = await verifier.verify("opaque-8")
    assert (context.client_id, context.expires_at, context.organization) == ("svc", None, "org-a")
    idp.answers["opaque-8b"] = {"active": True, "scope": "system/*.rs", "client_id": "svc"}
    assert (await refused(verifier, "opaque-8b")).reason in (Reason.MISSING_CLAIM, Reason.WRONG_AUDIENCE)


async def test_introspection_with_wrong_client_secret_is_transient(idp: IdP, make_verifier: Any) -> None:
    issuer = Issuer(
        idp.url,
        "org-a",
        introspection_url=f"{idp.url}/introspect",
        client_id="fhirbridge",
        client_secret="wrong",
    )
    verifier = make_verifier([issuer])
    with pytest.raises(IssuerUnavailable):
        await verifier.verify("opaque-9")


async def test_opaque_token_without_introspection_is_malformed(idp: IdP, make_verifier: Any) -> None:
    verifier = make_verifier([issuer_of(idp)])
    assert (await refused(verifier, "opaque-10")).reason is Reason.MALFORMED
    assert idp.hits == {}


async def test_jwt_not_sent_to_introspection(idp: IdP, make_verifier: Any) -> None:
    verifier = make_verifier([introspecting(idp)])
    await verifier.verify(sign(EC_1, claims_for(idp.url)))
    assert idp.hits["introspect"] == 0


# -- the issuers file --------------------------------------------------------------------------------
def write(tmp_path: Path, text: str, secret: str | None = "s3cret\n") -> Path:
    if secret is not None:
        (tmp_path / "secret").write_text(secret)
        os.chmod(tmp_path / "secret", stat.S_IRUSR | stat.S_IWUSR)
    path = tmp_path / "issuers.toml"
    path.write_text(text)
    return path


GOOD = """
[[issuer]]
url = "https://idp.hospital-a.example/realms/a"
organization = "hospital-a"

[[issuer]]
url = "https://login.hospital-b.example"
organization = "hospital-b"
jwks_uri = "https://login.hospital-b.example/keys"
introspection_url = "https://login.hospital-b.example/introspect"
client_id = "fhirbridge"
client_secret_file = "secret"

[[issuer]]
url = "http://127.0.0.1:8081/auth"
organization = "local"
"""


def test_load_issuers(tmp_path: Path) -> None:
    a, b, local = load_issuers(write(tmp_path, GOOD))
    assert a == Issuer("https://idp.hospital-a.example/realms/a", "hospital-a")
    assert a.discovery_url == "https://idp.hospital-a.example/realms/a/.well-known/openid-configuration"
    assert (b.organization, b.jwks_uri, b.client_id, b.client_secret) == (
        "hospital-b",
        "https://login.hospital-b.example/keys",
        "fhirbridge",
        "s3cret",
    )
    assert "s3cret" not in repr(b)
    assert local.url == "http://127.0.0.1:8081/auth"


@pytest.mark.parametrize(
    ("text", "index", "key", "words"),
    [
        ('[[issuer]]\norganization = "a"\n', 0, "url", "required"),
        ('[[issuer]]\nurl = "https://a.example"\n', 0, "organization", "required"),
        (GOOD + '[[issuer]]\nurl = "https://c.example"\norganization = ""\n', 3, "organization", "non-empty"),
        (GOOD + '[[issuer]]\nurl = "https://c.example"\norganization = 7\n', 3, "organization", "string"),
        ('[[issuer]]\nurl = "http://idp.example"\norganization = "a"\n', 0, "url", "https"),
        ('[[issuer]]\nurl = "ftp://idp.example"\norganization = "a"\n', 0, "url", "https"),
        ('[[issuer]]\nurl = "https://idp.example?x=1"\norganization = "a"\n', 0, "url", "query"),
        ('[[issuer]]\nurl = "https://a.example"\norganization = "a"\norg = "b"\n', 0, "org", "unknown key"),
        (
            '[[issuer]]\nurl = "https://a.example"\norganization = "a"\nclient_secret = "x"\n',
            0,
            "client_secret",
            "client_secret_file",
        ),
        (
            '[[issuer]]\nurl = "https://a.example"\norganization = "a"\nintrospection_url = "https://a.example/i"\n'
            'client_secret_file = "secret"\n',
            0,
            "client_id",
            "required with introspection_url",
        ),
        (
            '[[issuer]]\nurl = "https://a.example"\norganization = "a"\nclient_id = "c"\n',
            0,
            "client_id",
            "introspection_url",
        ),
        (
            '[[issuer]]\nurl = "https://a.example"\norganization = "a"\nintrospection_url = "https://a.example/i"\n'
            'client_id = "c"\nclient_secret_file = "missing"\n',
            0,
            "client_secret_file",
            "cannot read",
        ),
    ],
)
def test_load_issuers_located_errors(tmp_path: Path, text: str, index: int, key: str, words: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(IssuersFileError) as info:
        load_issuers(path)
    error = info.value
    assert isinstance(error, ConfigError)
    assert (error.file, error.index, error.key) == (path, index, key)
    assert (
        str(path) in str(error) and f"[[issuer]] table {index + 1}" in str(error) and repr(key) in str(error)
    )
    assert words in str(error)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("[[issuer]\n", "not valid TOML"),
        ("", "no [[issuer]] table"),
        ('issuer = "x"\n', "no [[issuer]] table"),
        ('[issuer]\nurl = "https://a.example"\norganization = "a"\n', "no [[issuer]] table"),
        (
            'trusted = true\n[[issuer]]\nurl = "https://a.example"\norganization = "a"\n',
            "unknown top-level key",
        ),
        (
            '[[issuer]]\nurl = "https://a.example"\norganization = "a"\n'
            '[[issuer]]\nurl = "https://a.example"\norganization = "b"\n',
            "configured twice",
        ),
        (
            GOOD
            + 'introspection_url = "http://127.0.0.1:8081/i"\nclient_id = "c"\nclient_secret_file = "secret"\n',
            "more than one issuer",
        ),
    ],
)
def test_load_issuers_file_errors(tmp_path: Path, text: str, words: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(IssuersFileError, match=words.replace("[", r"\[").replace("]", r"\]")) as info:
        load_issuers(path)
    assert str(path) in str(info.value)


def test_load_issuers_empty_secret_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(IssuersFileError, match="is empty"):
        load_issuers(write(tmp_path, GOOD, secret=" \n"))
    with pytest.raises(IssuersFileError, match="cannot read the issuers file"):
        load_issuers(tmp_path / "nowhere.toml")
