"""The resource server against an identity provider we did not write (issue 21).

The issuer is oidc-provider, the OpenID-certified npm package (tests/services/oidc/provider.mjs,
started by tests/services/oidc.py), trusted through an issuers file as a hospital's identity provider:
``organization = "st-mary"``, found by OpenID discovery, with its introspection endpoint. The service is
the one ``create_app(settings)`` builds, its embedded issuer trusted too. Tokens are fetched from the
issuer by client credentials (client_secret_basic) with a resource indicator (RFC 8707): JWT access
tokens (RFC 9068) for one client, opaque ones for another.

What a request's token grants is observed with a probe middleware placed after the service's own, which
records the organisation of each request's :class:`~bridge.service.auth.policy.Access`, and through the
MPI: a manual link records the token's ``issuer|subject`` as its actor.
"""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from bridge.config import Settings
from bridge.service.app import create_app
from bridge.service.auth import tokens
from bridge.service.auth.middleware import AUTHORIZATION, access_of
from bridge.stores.index.store import IncomingBundle, IndexStore
from bridge.stores.mpi import PersonIndex
from tests.services.oidc import (
    JWT_CLIENT,
    OPAQUE_CLIENT,
    OTHER_RESOURCE,
    RESOURCE_SERVER,
    NodeMissing,
    OidcProvider,
)
from tests.support.auth import bearer

ORGANIZATION = "st-mary"


def _patient(pid: str, ssn: str | None, street: str, city: str, postal: str) -> dict[str, Any]:
    p: dict[str, Any] = {
        "resourceType": "Patient",
        "id": pid,
        "name": [{"family": "Andersen", "given": ["Alice"]}],
        "birthDate": "1980-04-12",
        "gender": "female",
        "address": [{"line": [street], "city": city, "postalCode": postal}],
    }
    if ssn:
        p["identifier"] = [{"system": "http://hl7.org/fhir/sid/us-ssn", "value": ssn}]
    return p


# a1 and b1 are one person (MPI MATCH); c2 is another record of the same name
A = _patient("a1", "123456789", "12 Elm Street", "Metro", "12345")
B = _patient("b1", "123456789", "12 Elm St", "Metro", "12345")
C = {k: v for k, v in _patient("c2", None, "400 Harbour View", "Portside", "99999").items() if k != "gender"}
RESOURCES = [
    A,
    B,
    C,
    {
        "resourceType": "Observation",
        "id": "lab-a",
        "status": "final",
        "subject": {"reference": "Patient/a1"},
        "code": {"coding": [{"system": "http://loinc.org", "code": "2345-7"}]},
        "effectiveDateTime": "2026-01-10T08:00:00Z",
    },
    {"resourceType": "Condition", "id": "cond-b", "subject": {"reference": "Patient/b1"}},
]
EVERYTHING_A1 = {"a1", "b1", "lab-a", "cond-b"}


def _fhir_base() -> str:
    return Settings.from_env({}).http.fhir_base()


def _started(fhir_base: str) -> OidcProvider:
    """A running issuer. Without Node.js the test is skipped on a workstation, and fails on CI."""
    issuer = OidcProvider(fhir_base)
    try:
        issuer.start()
    except NodeMissing as exc:
        issuer.destroy()
        if os.environ.get("CI") == "true":
            pytest.fail(f"the OpenID Connect interoperability test cannot run: {exc}")
        pytest.skip(str(exc))
    except BaseException:
        issuer.destroy()
        raise
    return issuer


@pytest.fixture(scope="module")
def issuer() -> Iterator[OidcProvider]:
    issuer = _started(_fhir_base())
    yield issuer
    issuer.destroy()


@pytest.fixture
def rotating_issuer() -> Iterator[OidcProvider]:
    """An issuer of the test's own, whose keys it rotates."""
    issuer = _started(_fhir_base())
    yield issuer
    issuer.destroy()


@dataclass
class Service:
    client: TestClient
    settings: Settings
    #: the organisation of each authenticated request, in order
    organizations: list[str]
    #: seconds added to the token verifier's clock (the cool-downs and cache lifetimes pass in no time)
    skew: list[float]

    async def get(self, path: str, token: str, **params: str) -> aiohttp.ClientResponse:
        return await self.client.get(path, params=params, headers={"Authorization": f"Bearer {token}"})


def _write_issuers(directory: Path, issuer: OidcProvider) -> Path:
    directory.mkdir(mode=0o700)
    secret = directory / "st-mary.secret"
    secret.touch(mode=0o600)
    secret.write_text(issuer.secrets[RESOURCE_SERVER] + "\n")
    assert secret.stat().st_mode & 0o777 == 0o600
    path = directory / "issuers.toml"
    path.write_text(
        "[[issuer]]\n"
        f'url = "{issuer.url}"\n'
        f'organization = "{ORGANIZATION}"\n'
        f'introspection_url = "{issuer.discovery["introspection_endpoint"]}"\n'
        f'client_id = "{RESOURCE_SERVER}"\n'
        'client_secret_file = "st-mary.secret"\n'
    )
    return path


@asynccontextmanager
async def _service(tmp_path: Path, issuer: OidcProvider) -> AsyncIterator[Service]:
    issuers = _write_issuers(tmp_path / "auth", issuer)
    settings = Settings.from_env(
        {"FHIRBRIDGE_DATA_DIR": str(tmp_path / "data"), "FHIRBRIDGE_AUTH_ISSUERS": str(issuers)}
    )
    assert settings.http.fhir_base() == issuer.fhir_base
    store = IndexStore.open(settings.stores.index_url)
    bundle = {"resourceType": "Bundle", "entry": [{"resource": r} for r in RESOURCES]}
    store.apply([IncomingBundle(bundle, "h1", ORGANIZATION, "a1", "t", 0, 0, "2026-01-11T00:00:00.000Z")])
    store.close()
    mpi = PersonIndex.open(settings.stores.mpi_url)
    mpi.upsert_patients([("org-a", A), ("org-b", B), ("org-c", C)])
    assert mpi.linked_patient_ids("a1") == ["a1", "b1"] and mpi.linked_patient_ids("c2") == ["c2"]
    mpi.close()

    app = create_app(settings)
    organizations: list[str] = []

    @web.middleware
    async def probe(request: web.Request, handler: Any) -> web.StreamResponse:
        access = access_of(request)  # set by the service's auth middleware, which runs first
        if access is not None:
            organizations.append(access.context.organization)
        return await handler(request)

    app.middlewares.append(probe)
    skew = [0.0]
    verifier = app[AUTHORIZATION].verifier
    assert verifier is not None
    # the verifier's clock (TokenVerifier(clock=...)); create_app takes none, so it is set here
    verifier._clock = lambda: time.time() + skew[0]
    async with TestClient(TestServer(app)) as client:
        yield Service(client, settings, organizations, skew)


@pytest.fixture
async def service(tmp_path: Path, issuer: OidcProvider) -> AsyncIterator[Service]:
    async with _service(tmp_path, issuer) as svc:
        yield svc


async def _token(issuer: OidcProvider, client_id: str, *, resource: str | None, scope: str) -> str:
    """An access token from the issuer's token endpoint: client credentials, client_secret_basic."""
    basic = f"{quote_plus(client_id)}:{quote_plus(issuer.secrets[client_id])}"  # RFC 6749 section 2.3.1
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            issuer.discovery["token_endpoint"],
            data={
                "grant_type": "client_credentials",
                "scope": scope,
                **({"resource": resource} if resource is not None else {}),
            },
            headers={"Authorization": "Basic " + base64.b64encode(basic.encode()).decode()},
        ) as r,
    ):
        body = await r.json()
        assert r.status == 200, body
        assert body["token_type"] == "Bearer" and body["scope"] == scope
        token: str = body["access_token"]
        return token


def _peek(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A JWT's header and claims, unverified."""

    def part(text: str) -> dict[str, Any]:
        decoded: dict[str, Any] = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
        return decoded

    header, claims, _ = token.split(".")
    return part(header), part(claims)


async def _ids(r: aiohttp.ClientResponse) -> set[str]:
    assert r.status == 200, await r.text()
    bundle = await r.json()
    return {
        e["resource"]["id"] for e in bundle.get("entry", []) if e.get("search", {}).get("mode") == "match"
    }


async def _refusal(r: aiohttp.ClientResponse) -> str:
    """The reason of a 401 invalid_token answer."""
    assert r.status == 401, await r.text()
    assert r.headers["WWW-Authenticate"].startswith('Bearer realm="fhirbridge", error="invalid_token"')
    diagnostics: str = (await r.json())["issue"][0]["diagnostics"]
    return diagnostics


async def test_a_jwt_of_the_external_issuer_is_accepted_for_its_organization(
    issuer: OidcProvider, service: Service
) -> None:
    token = await _token(issuer, JWT_CLIENT, resource=issuer.fhir_base, scope="system/*.rs")
    header, claims = _peek(token)
    assert header == {"alg": "RS256", "typ": "at+jwt", "kid": issuer.kids[0]}
    assert claims["iss"] == issuer.url and claims["aud"] == issuer.fhir_base
    assert claims["sub"] == claims["client_id"] == JWT_CLIENT and claims["scope"] == "system/*.rs"
    # the purpose of use the IHE IUA way: a system/ token must state one (docs/consent.md)
    assert claims["extensions"]["ihe_iua"]["purpose_of_use"][0]["code"] == "TREAT"

    assert await _ids(await service.get("/Patient", token, name="andersen")) == {"a1", "b1", "c2"}
    assert await _ids(await service.get("/Patient/a1/$everything", token)) == EVERYTHING_A1
    assert service.organizations == [ORGANIZATION, ORGANIZATION]
    # the embedded issuer stays trusted, and speaks for the service's own organisation
    r = await service.client.get("/Patient", params={"name": "andersen"}, headers=bearer(service.settings))
    assert r.status == 200
    assert service.organizations[-1] == service.settings.auth.organization != ORGANIZATION


async def test_the_external_tokens_scopes_are_what_is_granted(issuer: OidcProvider, service: Service) -> None:
    link = {"patientA": "a1", "patientB": "c2", "actor": "someone-else", "reason": "same person, checked"}
    reader = await _token(issuer, JWT_CLIENT, resource=issuer.fhir_base, scope="system/*.rs")
    r = await service.client.post(
        "/Person/$mpi-link", json=link, headers={"Authorization": f"Bearer {reader}"}
    )
    assert r.status == 403 and 'error="insufficient_scope"' in r.headers["WWW-Authenticate"]
    decider = await _token(issuer, JWT_CLIENT, resource=issuer.fhir_base, scope="user/Person.u")
    r = await service.client.post(
        "/Person/$mpi-link", json=link, headers={"Authorization": f"Bearer {decider}"}
    )
    assert r.status == 200, await r.text()
    mpi = PersonIndex.open(service.settings.stores.mpi_url)
    try:
        actors = {e.get("actor") for e in mpi.history("c2")}
    finally:
        mpi.close()
    # the decision names the external issuer and the token's subject (the client), not the body's actor
    assert f"{issuer.url}|{JWT_CLIENT}" in actors and "someone-else" not in actors
    assert service.organizations == [ORGANIZATION]  # the refused request never reached the probe


async def test_a_token_for_another_resource_server_is_refused(issuer: OidcProvider, service: Service) -> None:
    ours = await _token(issuer, JWT_CLIENT, resource=issuer.fhir_base, scope="system/*.rs")
    theirs = await _token(issuer, JWT_CLIENT, resource=OTHER_RESOURCE, scope="system/*.rs")
    assert _peek(theirs)[1]["aud"] == OTHER_RESOURCE
    assert (await service.get("/Patient", ours, name="andersen")).status == 200
    assert "wrong audience" in await _refusal(await service.get("/Patient", theirs, name="andersen"))
    # the same for an opaque token: the introspection answer names the other audience
    opaque = await _token(issuer, OPAQUE_CLIENT, resource=OTHER_RESOURCE, scope="system/*.rs")
    assert "wrong audience" in await _refusal(await service.get("/Patient", opaque, name="andersen"))
    # and a token asked for without a resource: opaque, and for no audience at all, so for nobody
    unbound = await _token(issuer, JWT_CLIENT, resource=None, scope="system/*.rs")
    assert (await service.get("/Patient", unbound, name="andersen")).status == 401
    assert service.organizations == [ORGANIZATION]


async def test_an_opaque_token_is_accepted_through_introspection(
    issuer: OidcProvider, service: Service
) -> None:
    token = await _token(issuer, OPAQUE_CLIENT, resource=issuer.fhir_base, scope="system/Patient.rs")
    assert token.count(".") != 2  # not a JWT: only the issuer can say what it is
    assert await _ids(await service.get("/Patient", token, name="andersen")) == {"a1", "b1", "c2"}
    assert service.organizations == [ORGANIZATION]
    # its scope came from the introspection answer: Patient only
    r = await service.get("/Observation/lab-a", token)
    assert r.status == 403 and 'error="insufficient_scope"' in r.headers["WWW-Authenticate"]
    # a token the issuer never issued is inactive
    made_up = "x" * len(token)
    assert "inactive" in await _refusal(await service.get("/Patient", made_up, name="andersen"))


async def test_the_issuers_key_rotation_is_picked_up_without_a_restart(
    rotating_issuer: OidcProvider, tmp_path: Path
) -> None:
    issuer = rotating_issuer
    node_pid = issuer.pid
    async with _service(tmp_path, issuer) as service:
        first = issuer.kids[0]
        old = await _token(issuer, JWT_CLIENT, resource=issuer.fhir_base, scope="system/*.rs")
        assert (await service.get("/Patient", old, name="andersen")).status == 200  # the JWKS is fetched

        second = issuer.rotate_keys()
        new = await _token(issuer, JWT_CLIENT, resource=issuer.fhir_base, scope="system/*.rs")
        assert _peek(new)[0]["kid"] == second != first and issuer.kids == [second, first]
        # within the cool-down after a fetch, an unknown kid does not make the verifier fetch again
        assert "unknown key" in await _refusal(await service.get("/Patient", new, name="andersen"))
        service.skew[0] += tokens.REFETCH_COOLDOWN + 1
        assert (await service.get("/Patient", new, name="andersen")).status == 200
        assert (await service.get("/Patient", old, name="andersen")).status == 200  # still published

        assert issuer.retire_keys() == [first]
        # the verifier keeps the JWKS it fetched for as long as the issuer's Cache-Control says
        async with aiohttp.ClientSession() as session, session.get(issuer.discovery["jwks_uri"]) as r:
            age = tokens.cache_age(r.headers.get("Cache-Control"))
        assert (await service.get("/Patient", old, name="andersen")).status == 200
        service.skew[0] += age + 1
        assert _peek(old)[1]["exp"] > time.time() + service.skew[0] + 60  # refused for its key alone
        assert "unknown key" in await _refusal(await service.get("/Patient", old, name="andersen"))
        assert (await service.get("/Patient", new, name="andersen")).status == 200
        assert service.organizations == [ORGANIZATION] * 5
    assert issuer.pid == node_pid  # the issuer was not restarted either
