"""The query service (aiohttp): merged, de-duplicated, provable patient histories.

:func:`create_app` builds the application: one middleware chain (the ``Host`` check, then errors
rendered as OperationOutcomes from :data:`bridge.service.http.ERRORS`), and every route module's
``routes`` table added in one block. Handlers are module-level functions; what they need comes from
:mod:`bridge.service.context`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from bridge.config import Settings
from bridge.logging import get_logger
from bridge.service import ledger as ledger_routes
from bridge.service import mpi as mpi_routes
from bridge.service import openapi
from bridge.service.audit.middleware import audit_middleware
from bridge.service.auth import discovery
from bridge.service.auth import server as auth_server
from bridge.service.auth.discovery import issuer_url
from bridge.service.auth.keys import current_jwks
from bridge.service.auth.marks import authenticated, public
from bridge.service.auth.middleware import AUTHORIZATION, Authorization, auth_middleware
from bridge.service.auth.tokens import Issuer, TokenVerifier, load_issuers
from bridge.service.context import ALLOWED_HOSTS, BACKEND, SETTINGS, Backend, base_url
from bridge.service.fhir import access, bulk, consent, everything, read, search
from bridge.service.fhir.capability import capability_statement
from bridge.service.fhir.consent import CONSENT_WRITER, ConsentWriter
from bridge.service.http import error_response, fhir_response, operation_outcome, outcome_response
from bridge.service.ui import install as install_ui
from bridge.stores.ledger import open_configured_ledger
from bridge.stores.mpi import PersonIndex
from bridge.tls import server_context, warn_if_plaintext

log = get_logger(__name__)
routes = web.RouteTableDef()

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def host_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse a ``Host`` the service was not configured to answer for (the links it builds use it)."""
    allowed = request.app[ALLOWED_HOSTS]
    if allowed is not None and _host_name(request.host) not in allowed:
        return outcome_response(
            400,
            "invalid",
            "this service does not answer for the host named in the Host header "
            "(FHIRBRIDGE_ALLOWED_HOSTS, FHIRBRIDGE_PUBLIC_URL)",
        )
    return await handler(request)


def _host_name(host: str) -> str:
    """The name part of a ``Host`` header value: ``[::1]:8080`` -> ``::1``, ``Example.org:80`` -> ``example.org``."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error as an OperationOutcome: the known ones from the error table, aiohttp's own (404,
    405, ...) with their status, anything else a 500 that names no more than the error's class."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not-found", 405: "not-supported", 400: "invalid"}.get(exc.status, "processing")
        return outcome_response(exc.status, code, exc.reason or str(exc))
    except Exception as exc:
        known = error_response(exc)
        if known is not None:
            return known
        log.exception("http.unhandled", path=request.path)
        return fhir_response(
            operation_outcome(
                "fatal", "exception", f"internal error ({type(exc).__name__}); see the server log"
            ),
            status=500,
        )


@routes.get("/metadata")
@public
async def metadata(request: web.Request) -> web.Response:
    """The R4 CapabilityStatement."""
    base = base_url(request)
    return fhir_response(capability_statement(base, issuer_url(request.app[SETTINGS].http.fhir_base())))


@routes.get("/metrics")
@authenticated
async def metrics(request: web.Request) -> web.Response:
    """Prometheus metrics."""
    return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})


@routes.get("/")
@public
async def home(request: web.Request) -> web.Response:
    base = base_url(request)
    links = [
        ("Capability statement", f"{base}/metadata"),
        ("Signed ledger checkpoint", f"{base}/ledger/checkpoint"),
        ("OpenAPI document", f"{base}/openapi.json"),
        ("Prometheus metrics", f"{base}/metrics"),
        ("Search patients by identifier", f"{base}/Patient?identifier=SYSTEM|VALUE"),
    ]
    items = "".join(f'<li><a href="{u}">{t}</a> <code>{u}</code></li>' for t, u in links)
    html = f"<!doctype html><title>fhirbridge</title><h1>fhirbridge</h1><ul>{items}</ul>"
    return web.Response(text=html, content_type="text/html")


def create_app(
    settings: Settings,
    backend: Backend | None = None,
    authorization: Authorization | None = None,
    consent_writer: ConsentWriter | None = None,
) -> web.Application:
    """The application over ``backend`` (default: the configured index, ledger and MPI) and
    ``authorization`` (default: tokens of the embedded issuer and of the trusted issuers file); the
    ledger's and the MPI's routes are mounted only when the backend has them."""
    app = web.Application(
        middlewares=[host_middleware, errors_middleware, audit_middleware, auth_middleware],
        client_max_size=16 * 1024 * 1024,
    )
    app[SETTINGS] = settings
    app[ALLOWED_HOSTS] = settings.http.allowed_host_names()
    be = backend or default_backend(settings)
    app[BACKEND] = be
    auth = authorization or default_authorization(settings)
    app[AUTHORIZATION] = auth
    app.add_routes(routes)
    app.add_routes(openapi.routes)
    app.add_routes(discovery.routes)
    app.add_routes(auth_server.routes)
    app.add_routes(everything.routes)
    app.add_routes(consent.routes)
    app.add_routes(access.routes)
    bulk.install(app)  # its routes, and its tasks' start-up and clean-up (before the backend closes)
    writer = app[CONSENT_WRITER] = consent_writer or ConsentWriter()
    if be.has_ledger:
        app.add_routes(ledger_routes.routes)
    if be.has_mpi:
        app.add_routes(mpi_routes.routes)
    install_ui(app)  # the web app under /app (before search and read, whose patterns are wider)
    app.add_routes(search.routes)  # last, with read: their patterns would also match the paths above
    app.add_routes(read.routes)

    async def _close(_: web.Application) -> None:
        if auth.verifier is not None:
            await auth.verifier.close()
        await asyncio.get_running_loop().run_in_executor(None, writer.close)
        be.close()

    app.on_cleanup.append(_close)
    return app


def default_authorization(settings: Settings) -> Authorization:
    """Tokens of the embedded authorization server (its keys read in-process, rotations included) and
    of every issuer in ``FHIRBRIDGE_AUTH_ISSUERS`` when that file exists, for this service's FHIR base."""
    base = settings.http.fhir_base()
    embedded = Issuer(url=issuer_url(base), organization=settings.auth.organization, user_organizations=True)
    issuers: list[Issuer] = [embedded]
    if settings.auth.issuers_file.is_file():
        issuers += [i for i in load_issuers(settings.auth.issuers_file) if i.url != embedded.url]
    verifier = TokenVerifier(issuers, base, static_keys={embedded.url: lambda: current_jwks(settings)})
    return Authorization(verifier)


def default_backend(settings: Settings) -> Backend:
    """The configured stores: the index, the ledger (read only) and the MPI."""

    def ledger_factory() -> Any:
        return open_configured_ledger(settings)

    def mpi_factory() -> Any:
        return PersonIndex.open(settings.stores.mpi_url)

    return Backend(settings, ledger_factory=ledger_factory, mpi_factory=mpi_factory)


def run(settings: Settings) -> None:
    """Serve until interrupted: HTTPS when ``settings.http.tls`` names a certificate (checked first, a
    :class:`~bridge.errors.ConfigError` before anything opens), with mutual TLS when it names a client
    CA; plain HTTP otherwise, logged as ``http.plaintext_bind`` on an address other than loopback."""
    http = settings.http
    ssl_context = server_context(http.tls, env_prefix="FHIRBRIDGE_TLS") if http.tls.enabled else None
    warn_if_plaintext("http.plaintext_bind", http.host, http.port, tls=ssl_context is not None)
    app = create_app(settings)
    scheme = "https" if ssl_context is not None else "http"
    log.info(
        "http.start",
        url=f"{scheme}://{http.host}:{http.port}/",
        mutual_tls=ssl_context is not None and http.tls.client_ca_file is not None,
    )
    web.run_app(app, host=http.host, port=http.port, ssl_context=ssl_context, print=None, access_log=None)
