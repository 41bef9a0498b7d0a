"""``GET /.well-known/smart-configuration``: what a SMART client needs to know to get a token here.

JSON whatever the ``Accept`` header, absolute URLs (``FHIRBRIDGE_PUBLIC_URL`` when set), the embedded
authorization server's endpoints, and the capabilities SMART App Launch 2.2 defines that this server
supports. PKCE is S256 only: ``plain`` is never offered.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from bridge.service.auth.marks import public
from bridge.service.context import SETTINGS
from bridge.service.http import json_response

routes = web.RouteTableDef()

SCOPES_SUPPORTED = [
    "openid",
    "fhirUser",
    "launch/patient",
    "patient/*.rs",
    "patient/Patient.rs",
    "patient/Observation.rs",
    "patient/Condition.rs",
    "user/*.rs",
    "user/Person.rs",
    "user/Person.u",
    "system/*.rs",
]
CAPABILITIES = [
    "permission-v2",
    "permission-v1",
    "permission-patient",
    "permission-user",
    "client-confidential-asymmetric",
    "client-public",
    "launch-standalone",
    "context-standalone-patient",
    "sso-openid-connect",
]


def issuer_url(base: str) -> str:
    """The embedded authorization server's issuer: ``<FHIR base>/auth``."""
    return f"{base}/auth"


def smart_configuration(base: str) -> dict[str, Any]:
    issuer = issuer_url(base)
    return {
        "issuer": issuer,
        "jwks_uri": f"{issuer}/jwks",
        "authorization_endpoint": f"{issuer}/authorize",
        "token_endpoint": f"{issuer}/token",
        "grant_types_supported": ["authorization_code", "client_credentials"],
        "token_endpoint_auth_methods_supported": ["private_key_jwt", "none"],
        "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"],
        "response_types_supported": ["code"],
        "code_challenge_methods_supported": ["S256"],
        "scopes_supported": SCOPES_SUPPORTED,
        "capabilities": CAPABILITIES,
    }


@routes.get("/.well-known/smart-configuration")
@public
async def get_smart_configuration(request: web.Request) -> web.Response:
    """SMART App Launch discovery (always JSON)."""
    return json_response(smart_configuration(request.app[SETTINGS].http.fhir_base()))
