"""The clinician web app under ``/app`` (docs/ui.md): server-rendered pages (Jinja2, autoescaping on)
with htmx for partial updates, signed in by the SMART authorization-code flow with PKCE, reading every
datum through the service's own FHIR API with the user's token.

:func:`install` adds its routes, its session store, its HTTP client and its security headers to the
service's application.
"""

from __future__ import annotations

import aiohttp_jinja2
import jinja2
from aiohttp import web

from bridge.service.auth.marks import public
from bridge.service.ui import login, verify, views
from bridge.service.ui.api import close_client, start_client
from bridge.service.ui.review import install as install_review
from bridge.service.ui.security import add_headers
from bridge.service.ui.session import SessionStore

routes = web.RouteTableDef()


@routes.get("/app")
@public
async def app_root(request: web.Request) -> web.StreamResponse:
    raise web.HTTPFound("/app/")


def install(app: web.Application) -> None:
    """The app's routes (add them before the FHIR routes whose patterns are wider), templates, session
    store, API client and headers."""
    aiohttp_jinja2.setup(
        app,
        loader=jinja2.PackageLoader("bridge.service.ui", "templates"),
        autoescape=True,  # every value is HTML-escaped; nothing is marked safe
        undefined=jinja2.StrictUndefined,
    )
    app[login.SESSIONS] = SessionStore()
    app.on_startup.append(start_client)
    app.on_cleanup.append(close_client)
    app.on_response_prepare.append(add_headers)
    app.add_routes(routes)
    app.add_routes(login.routes)
    app.add_routes(views.routes)
    app.add_routes(verify.routes)  # in-browser verification of the ledger proofs (docs/ui.md)
    install_review(app)  # the data steward's desk under /app/review (docs/ui.md)
