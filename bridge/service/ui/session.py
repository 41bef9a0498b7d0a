"""The web app's server-side state: sessions (the access token never reaches the browser) and the sign-ins
in flight (state and PKCE verifier), both in this process's memory, keyed by random ids.

* A session lives as long as its access token (``exp``): the embedded issuer grants no refresh tokens,
  so when the token expires the clinician signs in again.
* A sign-in in flight lives :data:`PENDING_MAX_AGE` seconds and is used once.
* Each store keeps at most ``limit`` entries, dropping expired ones first and then the oldest, so a
  flood of unauthenticated ``/app/login`` requests cannot grow memory without bound.
* CSRF: each session carries a random token; a form posts it back, and :func:`csrf_ok` compares it in
  constant time.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Generic, TypeVar

SESSION_COOKIE = "fhirbridge_ui"
LOGIN_COOKIE = "fhirbridge_ui_login"
CSRF_FIELD = "csrf_token"
PENDING_MAX_AGE = 600
MAX_SESSIONS = 10_000
MAX_PENDING = 10_000


@dataclass(frozen=True, slots=True)
class Session:
    """A signed-in user: the bearer token the app reads the API with, when it expires (epoch seconds),
    who it names (``sub``, ``fhirUser``) and the session's CSRF token."""

    id: str
    access_token: str
    expires_at: float
    subject: str
    fhir_user: str | None
    csrf: str


@dataclass(frozen=True, slots=True)
class PendingLogin:
    """An authorization request sent and not answered yet: its ``state``, PKCE verifier, and where to
    return after the sign-in."""

    state: str
    verifier: str
    expires_at: float
    next_path: str
    #: the purpose of use the token request states (``ETREAT``: an emergency sign-in), or ""
    purpose: str = ""


T = TypeVar("T", Session, PendingLogin)


class _Expiring(Generic[T]):
    def __init__(self, limit: int) -> None:
        self._items: OrderedDict[str, T] = OrderedDict()
        self._limit = limit

    def put(self, key: str, item: T, now: float) -> None:
        for k in [k for k, v in self._items.items() if v.expires_at <= now]:
            del self._items[k]
        while len(self._items) >= self._limit:
            self._items.popitem(last=False)
        self._items[key] = item

    def get(self, key: str, now: float) -> T | None:
        item = self._items.get(key)
        if item is not None and item.expires_at <= now:
            del self._items[key]
            return None
        return item

    def pop(self, key: str) -> T | None:
        return self._items.pop(key, None)

    def __len__(self) -> int:
        return len(self._items)


class SessionStore:
    """Sessions and sign-ins in flight of one process (docs/ui.md: one ``serve`` process per store)."""

    def __init__(self, max_sessions: int = MAX_SESSIONS, max_pending: int = MAX_PENDING) -> None:
        self._sessions: _Expiring[Session] = _Expiring(max_sessions)
        self._pending: _Expiring[PendingLogin] = _Expiring(max_pending)

    def begin_login(
        self, next_path: str, *, purpose: str = "", now: float | None = None
    ) -> tuple[str, PendingLogin]:
        """A new sign-in in flight: its cookie value and its state and verifier (43 random characters
        each, as RFC 7636 asks of a verifier)."""
        now = time.time() if now is None else now
        key = secrets.token_urlsafe(32)
        pending = PendingLogin(
            secrets.token_urlsafe(32), secrets.token_urlsafe(48), now + PENDING_MAX_AGE, next_path, purpose
        )
        self._pending.put(key, pending, now)
        return key, pending

    def take_login(self, key: str, *, now: float | None = None) -> PendingLogin | None:
        """The sign-in in flight of ``key``, removed (one use), or None when unknown or expired."""
        pending = self._pending.pop(key)
        if pending is None or pending.expires_at <= (time.time() if now is None else now):
            return None
        return pending

    def create(
        self,
        access_token: str,
        expires_at: float,
        subject: str,
        fhir_user: str | None,
        *,
        now: float | None = None,
    ) -> Session:
        """A new session (a new random id: a session id is never reused across sign-ins)."""
        now = time.time() if now is None else now
        session = Session(
            secrets.token_urlsafe(32), access_token, expires_at, subject, fhir_user, secrets.token_urlsafe(32)
        )
        self._sessions.put(session.id, session, now)
        return session

    def get(self, session_id: str, *, now: float | None = None) -> Session | None:
        """The live session of ``session_id``, or None (unknown, or its token has expired)."""
        return self._sessions.get(session_id, time.time() if now is None else now) if session_id else None

    def end(self, session_id: str) -> None:
        self._sessions.pop(session_id)

    def __len__(self) -> int:
        return len(self._sessions)


def csrf_ok(session: Session, submitted: str) -> bool:
    """Whether a form's ``submitted`` token is the session's."""
    return bool(submitted) and hmac.compare_digest(submitted.encode(), session.csrf.encode())
