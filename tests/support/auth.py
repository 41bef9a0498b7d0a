"""Access tokens for tests: signed with the embedded authorization server's own key, with its claims.

The service under test verifies them exactly as it verifies the tokens its token endpoint issues (the
same issuer, key and audience); only the OAuth exchange is skipped. Tests of the exchange itself are in
tests/unit/bridge/service/auth/test_server.py.
"""

from __future__ import annotations

import time
import uuid

from joserfc import jwt

from bridge.config import Settings
from bridge.service.auth.discovery import issuer_url
from bridge.service.auth.keys import signing_keys
from bridge.service.auth.purpose import iua_claims

#: what most service tests need: every resource, read and searched, as a clinician would
READ_ALL = "user/*.rs"


def token(
    settings: Settings,
    scope: str = READ_ALL,
    *,
    patient: str | None = None,
    subject: str = "test-user",
    fhir_user: str | None = None,
    lifetime: int = 300,
    issued_at: int | None = None,
    audience: str | None = None,
    organization: str | None = None,
    purpose: str | tuple[str, ...] | None = None,
) -> str:
    """A signed access token of the embedded issuer for ``settings``' service; ``organization`` and
    ``purpose`` go into its IHE IUA claims, as the embedded issuer writes them."""
    base = settings.http.fhir_base()
    now = int(time.time()) if issued_at is None else issued_at
    claims = {
        "iss": issuer_url(base),
        "aud": audience or base,
        "sub": subject,
        "client_id": "test-client",
        "scope": scope,
        "iat": now,
        "exp": now + lifetime,
        "jti": uuid.uuid4().hex,
    }
    if patient is not None:
        claims["patient"] = patient
    if fhir_user is not None:
        claims["fhirUser"] = fhir_user
    purposes = (purpose,) if isinstance(purpose, str) else tuple(purpose or ())
    claims.update(iua_claims(purposes, organization))
    ring = signing_keys(settings)
    return jwt.encode({"alg": "ES256", "kid": ring.kid, "typ": "at+jwt"}, claims, ring.signing_set())


def bearer(settings: Settings, scope: str = READ_ALL, **kwargs: object) -> dict[str, str]:
    """The ``Authorization`` header of :func:`token` (same arguments)."""
    return {"Authorization": f"Bearer {token(settings, scope, **kwargs)}"}  # type: ignore[arg-type]
