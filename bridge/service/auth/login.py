"""The sign-in page of the authorization endpoint: a plain server-rendered form, its CSRF token, and the
rate limit on failed sign-ins.

* Every value written into a page goes through :func:`html.escape` (:func:`_render` escapes each one;
  no value is written any other way), so a client id, scope or ``state`` cannot inject markup.
* CSRF: a signed double-submit token. The first ``GET`` sets a random cookie (``HttpOnly``,
  ``SameSite=Strict``, ``Secure`` over HTTPS, path ``/auth/authorize``); the form carries
  ``<issued>.<HMAC-SHA256(secret, cookie|issued)>``, good for :data:`CSRF_MAX_AGE` seconds. A ``POST``
  without the cookie, or with a token made for another cookie, is refused before any password is
  checked. The secret lives in the auth database, so every process behind one database shares it.
* Rate limit: :data:`MAX_FAILURES` failed sign-ins within :data:`FAILURE_WINDOW` seconds, per user id
  and per client address, and the next attempt is answered 429 without checking the password.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import secrets
from collections.abc import Iterable
from string import Template

CSRF_COOKIE = "fhirbridge_signin"
CSRF_FIELD = "csrf_token"
CSRF_MAX_AGE = 900
MAX_FAILURES = 5
FAILURE_WINDOW = 900
#: the form's own fields, never copied from (or into) the OAuth parameters it carries
FORM_FIELDS = frozenset({"username", "password", CSRF_FIELD})

#: the page's headers: not cached, not framed (clickjacking), no script, no referrer
PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}

_PAGE = Template(
    """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<title>$title</title>
<style>body{font-family:sans-serif;max-width:28em;margin:3em auto;padding:0 1em}
label{display:block;margin:.8em 0 .2em}input[type=text],input[type=password]{width:100%;padding:.4em}
button{margin-top:1.2em;padding:.5em 1.5em}.error{color:#a00}code{word-break:break-all}</style>
</head><body><h1>$title</h1>
$body
</body></html>
"""
)

_FORM = Template(
    """<p><b>$client_id</b> asks for access to:</p>
<ul>$scopes</ul>
$error<form method="post" action="$action" autocomplete="off">
$hidden<label for="username">User id</label>
<input type="text" id="username" name="username" value="$username" required autofocus>
<label for="password">Password</label>
<input type="password" id="password" name="password" required>
<button type="submit">Sign in</button>
</form>"""
)


def _render(template: Template, **values: str) -> str:
    """``template`` with each value HTML-escaped (quotes too: values also go into attributes)."""
    return template.substitute({k: html.escape(v, quote=True) for k, v in values.items()})


def _page(title: str, body_html: str) -> str:
    """A page around ``body_html``, which the caller built with :func:`_render` (escaped already)."""
    return _PAGE.substitute(title=html.escape(title), body=body_html)


def login_page(
    *,
    action: str,
    client_id: str,
    scopes: Iterable[str],
    params: Iterable[tuple[str, str]],
    csrf: str,
    username: str = "",
    error: str | None = None,
) -> str:
    """The sign-in form: it posts ``params`` (the authorization request) back, with the CSRF token."""
    hidden = "".join(
        _render(Template('<input type="hidden" name="$n" value="$v">\n'), n=name, v=value)
        for name, value in [*params, (CSRF_FIELD, csrf)]
    )
    items = "".join(_render(Template("<li><code>$s</code></li>"), s=s) for s in scopes)
    error_html = _render(Template('<p class="error" role="alert">$e</p>\n'), e=error) if error else ""
    form = _FORM.substitute(
        client_id=html.escape(client_id),
        scopes=items,
        error=error_html,
        action=html.escape(action, quote=True),
        hidden=hidden,
        username=html.escape(username, quote=True),
    )
    return _page("Sign in", form)


def message_page(title: str, message: str) -> str:
    return _page(title, _render(Template("<p>$m</p>"), m=message))


# -- CSRF -----------------------------------------------------------------------------------------
def new_cookie() -> str:
    return secrets.token_urlsafe(32)


def csrf_token(secret: bytes, cookie: str, now: int) -> str:
    """The form's token for ``cookie``, issued at ``now``."""
    return f"{now}.{_mac(secret, cookie, now)}"


def csrf_valid(secret: bytes, cookie: str, token: str, now: int) -> bool:
    """Whether ``token`` was made for ``cookie`` with ``secret`` less than :data:`CSRF_MAX_AGE` ago."""
    issued, _, mac = token.partition(".")
    if not cookie or not mac.isascii() or not issued.isascii() or not issued.isdigit() or len(issued) > 12:
        return False
    if not 0 <= now - int(issued) <= CSRF_MAX_AGE:
        return False
    return hmac.compare_digest(mac, _mac(secret, cookie, int(issued)))


def _mac(secret: bytes, cookie: str, issued: int) -> str:
    return hmac.new(secret, f"{cookie}|{issued}".encode(), hashlib.sha256).hexdigest()
