"""The headers every response under ``/app`` carries, set in ``on_response_prepare`` so that redirects,
errors and static files get them too.

* ``Cache-Control: no-store``: pages hold patient data; no cache, shared or private, keeps them.
* A Content-Security-Policy that allows only this origin's own scripts, styles and images: no inline
  script or style, no ``eval``, no framing, forms only to this origin. htmx is configured not to add
  its inline indicator style nor to evaluate attributes (``templates/base.html``).
* ``Referrer-Policy: no-referrer``: URLs name patients; they must not travel to another site.
"""

from __future__ import annotations

from aiohttp import web

PREFIX = "/app"

CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "connect-src 'self'",
        "font-src 'self'",
        "form-action 'self'",
        "frame-ancestors 'none'",
        "base-uri 'none'",
        "object-src 'none'",
    )
)

HEADERS = {
    "Cache-Control": "no-store",
    "Pragma": "no-cache",
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
}


def in_app(path: str) -> bool:
    return path == PREFIX or path.startswith(PREFIX + "/")


async def add_headers(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: :data:`HEADERS` on every response to a path under ``/app``."""
    if in_app(request.path):
        response.headers.update(HEADERS)
