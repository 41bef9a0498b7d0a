"""How the web app reads data: HTTP requests to this service's own FHIR API with the session's bearer
token, over a loopback connection to the socket the page's request came in on.

Why HTTP and not a call into the handlers: every rule of the API (the token's verification and scopes,
the consent gate, break-the-glass, the audit middleware that records the token's user as the actor and
refuses to release anything it could not record) runs unchanged, in the one place it is written. A call
into the same functions would have to rebuild that middleware chain around them and keep it in step.
The cost is one loopback request per API call.

The base is ``FHIRBRIDGE_UI_API_URL`` when set, else ``<scheme>://<the socket's address>:<port>``. A
request carries the page's own ``Host`` (which the host check already accepted), so the links the API
writes are those the browser would see. Over TLS the certificate of our own socket is not verified
(the connection does not leave this process's host); with mutual TLS, set ``FHIRBRIDGE_UI_API_URL`` to
a listener the app can reach without a client certificate.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import ClientSession, ClientTimeout, web
from yarl import URL

from bridge.service.context import SETTINGS

HTTP_CLIENT = web.AppKey("ui_http_client", ClientSession)
TIMEOUT = ClientTimeout(total=60)


@dataclass(frozen=True, slots=True)
class ApiAnswer:
    """An API answer: its status and its JSON body (an OperationOutcome on errors, ``{}`` when none)."""

    status: int
    body: dict[str, Any]

    def diagnostics(self) -> str:
        """The OperationOutcome's first diagnostics (or the OAuth error description), for a page."""
        issues = self.body.get("issue") or [{}]
        first = issues[0] if isinstance(issues[0], dict) else {}
        text = first.get("diagnostics") or self.body.get("error_description") or self.body.get("error")
        return str(text or f"HTTP {self.status}")


async def start_client(app: web.Application) -> None:
    app[HTTP_CLIENT] = ClientSession(timeout=TIMEOUT, auto_decompress=True)


async def close_client(app: web.Application) -> None:
    client = app.get(HTTP_CLIENT)
    if client is not None:
        await client.close()


def api_base(request: web.Request) -> str:
    """The base URL of this service's API as this process reaches it (module docstring)."""
    configured: str = request.app[SETTINGS].ui.api_url
    if configured:
        return configured
    transport = request.transport
    sockname = transport.get_extra_info("sockname") if transport is not None else None
    if not isinstance(sockname, tuple) or len(sockname) < 2:
        raise web.HTTPInternalServerError(
            reason="the app cannot tell its own address; set FHIRBRIDGE_UI_API_URL"
        )
    host, port = str(sockname[0]), int(sockname[1])
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    host = f"[{host}]" if ":" in host else host
    tls = transport is not None and transport.get_extra_info("sslcontext") is not None
    return f"{'https' if tls else 'http'}://{host}:{port}"


def _ssl(url: str) -> bool:
    """Over TLS, our own socket's certificate is not verified (module docstring)."""
    return not url.startswith("https:")


async def fhir_get(
    request: web.Request, token: str, path_qs: str, *, headers: Mapping[str, str] | None = None
) -> ApiAnswer:
    """``GET <api base><path_qs>`` with ``token`` as the bearer token (and ``headers``, such as the
    break-the-glass reason)."""
    url = api_base(request) + path_qs
    headers = {
        **(headers or {}),
        "Authorization": f"Bearer {token}",
        "Accept": "application/fhir+json",
        "Host": request.host,
    }
    async with request.app[HTTP_CLIENT].get(
        url, headers=headers, ssl=_ssl(url), allow_redirects=False
    ) as resp:
        raw = await resp.read()
        return ApiAnswer(resp.status, _json(raw))


async def public_text(request: web.Request, path_qs: str) -> tuple[int, str]:
    """``GET <api base><path_qs>`` of a public text resource (the ledger's signed checkpoint)."""
    url = api_base(request) + path_qs
    async with request.app[HTTP_CLIENT].get(
        url, headers={"Host": request.host}, ssl=_ssl(url), allow_redirects=False
    ) as resp:
        return resp.status, (await resp.read()).decode("utf-8", "replace")


async def token_request(request: web.Request, form: dict[str, str]) -> ApiAnswer:
    """``POST <api base>/auth/token`` with ``form`` (the authorization-code exchange)."""
    url = api_base(request) + "/auth/token"
    async with request.app[HTTP_CLIENT].post(
        url, data=form, headers={"Host": request.host, "Accept": "application/json"}, ssl=_ssl(url)
    ) as resp:
        return ApiAnswer(resp.status, _json(await resp.read()))


def path_of(link: str) -> str:
    """The path and query of an absolute link the API wrote (a paging link), to request it again here."""
    return URL(link).path_qs


def _json(raw: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(raw) if raw else {}
    except orjson.JSONDecodeError:
        return {}
    return body if isinstance(body, dict) else {}
