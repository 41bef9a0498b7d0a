"""The embedded authorization server's store: clients, users, and the short-lived single-use records.

Five kinds of rows, on SQLite or PostgreSQL (one SQL text, through :class:`bridge.stores.db.Database`):

* **clients**: a public SMART app (``public``: redirect URIs, no credentials) or a client that signs
  its own assertions (``confidential-asymmetric``: a JWKS, or the URL of one; redirect URIs only when
  it also uses the authorization code grant), each with the scopes it may be granted;
* **users**: a clinician (an organisation and a ``fhirUser``), a data steward, or a patient bound to a
  Patient id, each with an argon2id password hash (never the password);
* **assertion ids**: the ``jti`` of every client assertion accepted, kept until the assertion expires,
  so that one is never accepted twice;
* **authorization codes**: stored by their SHA-256 only (a copy of the database holds no usable code),
  bound to the client, redirect URI, PKCE challenge, user and scopes; :meth:`AuthStore.take_code`
  deletes the code in the statement that reads it, so two requests racing with one code get it once;
* **login failures**: one row per failed sign-in, per user id and per client address, for the rate limit.

Times are integer seconds since the epoch; methods that depend on the time take ``now``.
"""

from __future__ import annotations

import functools
import hashlib
import secrets
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlsplit

import orjson
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from bridge.errors import FhirbridgeError
from bridge.logging import get_logger
from bridge.stores.db import Database, SqliteTuning

log = get_logger(__name__)

CLIENT_KINDS = ("public", "confidential-asymmetric")
USER_KINDS = ("clinician", "steward", "patient")

SCHEMA = """
CREATE TABLE IF NOT EXISTS auth_clients (
    client_id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    jwks TEXT,
    jwks_uri TEXT,
    redirect_uris TEXT NOT NULL,
    scopes TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS auth_users (
    user_id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    organization TEXT,
    fhir_user TEXT,
    patient_id TEXT,
    password_hash TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS auth_assertion_ids (
    client_id TEXT NOT NULL,
    jti TEXT NOT NULL,
    expires_at BIGINT NOT NULL,
    PRIMARY KEY (client_id, jti)
);
CREATE INDEX IF NOT EXISTS auth_assertion_ids_expiry ON auth_assertion_ids (expires_at);
CREATE TABLE IF NOT EXISTS auth_codes (
    code_sha256 TEXT PRIMARY KEY,
    client_id TEXT NOT NULL,
    redirect_uri TEXT NOT NULL,
    scope TEXT NOT NULL,
    user_id TEXT NOT NULL,
    code_challenge TEXT NOT NULL,
    code_challenge_method TEXT NOT NULL,
    nonce TEXT,
    auth_time BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS auth_codes_expiry ON auth_codes (expires_at);
CREATE TABLE IF NOT EXISTS auth_login_failures (
    subject TEXT NOT NULL,
    failed_at BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS auth_login_failures_subject ON auth_login_failures (subject, failed_at);
CREATE TABLE IF NOT EXISTS auth_meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
)
"""

#: ``synchronous=FULL``: an accepted assertion id or a used code must survive a power cut, or the
#: assertion or code could be replayed after it; the auth database sees a few writes per token.
AUTH_TUNING = SqliteTuning(synchronous="FULL", busy_timeout_ms=30_000)

#: argon2id with argon2-cffi's defaults (RFC 9106's second recommendation: 64 MiB, 3 passes, 4 lanes)
_HASHER = PasswordHasher()


@functools.cache
def _dummy_hash() -> str:
    """Verified against when the user does not exist, so that an unknown id costs as long as a wrong
    password (made on first use: a hash costs tens of milliseconds, too much for every import)."""
    return _HASHER.hash(secrets.token_urlsafe(16))


class AuthError(FhirbridgeError):
    """An authorization store or server error; the message names no secret and no password."""


class AuthInputError(AuthError):
    """A client or user definition that cannot be stored (the message says which field)."""


class AuthConflict(AuthError):
    """A client or user with this id exists already."""


class AuthNotFound(AuthError):
    """No client or user with this id."""


@dataclass(frozen=True, slots=True)
class AuthClient:
    """A registered client. ``jwks`` (a public JWKS) or ``jwks_uri`` for ``confidential-asymmetric``
    clients; ``redirect_uris`` matched exactly; ``scopes`` the most it may be granted."""

    client_id: str
    kind: str
    scopes: tuple[str, ...]
    redirect_uris: tuple[str, ...] = ()
    jwks: dict[str, Any] | None = None
    jwks_uri: str | None = None

    @property
    def public(self) -> bool:
        return self.kind == "public"


@dataclass(frozen=True, slots=True)
class AuthUser:
    """A person who signs in on the login form. ``fhir_user`` is a relative reference
    (``Practitioner/1``, ``Patient/7``); ``patient_id`` is set for patients only."""

    user_id: str
    kind: str
    organization: str | None = None
    fhir_user: str | None = None
    patient_id: str | None = None


@dataclass(frozen=True, slots=True)
class AuthCode:
    """An authorization code as stored (the code itself is not: only its SHA-256)."""

    client_id: str
    redirect_uri: str
    scope: str
    user_id: str
    code_challenge: str
    code_challenge_method: str
    nonce: str | None
    auth_time: int
    expires_at: int


def code_digest(code: str) -> str:
    return hashlib.sha256(code.encode("utf-8")).hexdigest()


def _now(now: int | None) -> int:
    return int(time.time()) if now is None else now


class AuthStore:
    """One connection (per thread) to the authorization server's database."""

    def __init__(self, url: str) -> None:
        self.db = Database(url, AUTH_TUNING)
        self.db.script(SCHEMA)

    @classmethod
    def open(cls, url: str) -> AuthStore:
        return cls(url)

    def close(self) -> None:
        self.db.close()

    # -- clients --------------------------------------------------------------------------------
    def add_client(self, client: AuthClient, *, now: int | None = None) -> None:
        """Register ``client``. Raises :class:`AuthInputError` for an inconsistent definition and
        :class:`AuthConflict` when the id is taken."""
        _check_client(client)
        with self.db.transaction() as tx:
            if tx.query("SELECT 1 FROM auth_clients WHERE client_id = ?", [client.client_id]):
                raise AuthConflict(f"a client with id {client.client_id!r} exists")
            tx.execute(
                "INSERT INTO auth_clients (client_id, kind, jwks, jwks_uri, redirect_uris, scopes, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    client.client_id,
                    client.kind,
                    orjson.dumps(client.jwks).decode() if client.jwks is not None else None,
                    client.jwks_uri,
                    orjson.dumps(list(client.redirect_uris)).decode(),
                    " ".join(client.scopes),
                    _now(now),
                ],
            )

    def client(self, client_id: str) -> AuthClient | None:
        rows = self.db.query(
            "SELECT client_id, kind, jwks, jwks_uri, redirect_uris, scopes FROM auth_clients WHERE client_id = ?",
            [client_id],
        )
        if not rows:
            return None
        cid, kind, jwks, jwks_uri, redirect_uris, scopes = rows[0]
        return AuthClient(
            client_id=cid,
            kind=kind,
            scopes=tuple(scopes.split()),
            redirect_uris=tuple(orjson.loads(redirect_uris)),
            jwks=orjson.loads(jwks) if jwks else None,
            jwks_uri=jwks_uri,
        )

    def clients(self) -> list[AuthClient]:
        ids = [r[0] for r in self.db.query("SELECT client_id FROM auth_clients ORDER BY client_id")]
        return [c for c in (self.client(i) for i in ids) if c is not None]

    def remove_client(self, client_id: str) -> None:
        """Raises :class:`AuthNotFound` for an unknown id."""
        with self.db.transaction() as tx:
            if not tx.query("SELECT 1 FROM auth_clients WHERE client_id = ?", [client_id]):
                raise AuthNotFound(f"no client with id {client_id!r}")
            tx.execute("DELETE FROM auth_clients WHERE client_id = ?", [client_id])
            tx.execute("DELETE FROM auth_codes WHERE client_id = ?", [client_id])

    # -- users ----------------------------------------------------------------------------------
    def add_user(self, user: AuthUser, password: str, *, now: int | None = None) -> None:
        """Register ``user`` with an argon2id hash of ``password``. Raises :class:`AuthInputError`
        (an inconsistent definition, a password shorter than 8 characters) or :class:`AuthConflict`."""
        if user.kind == "patient" and user.patient_id and not user.fhir_user:
            user = replace(user, fhir_user=f"Patient/{user.patient_id}")
        _check_user(user)
        if len(password) < 8:
            raise AuthInputError("the password must be at least 8 characters long")
        digest = _HASHER.hash(password)
        with self.db.transaction() as tx:
            if tx.query("SELECT 1 FROM auth_users WHERE user_id = ?", [user.user_id]):
                raise AuthConflict(f"a user with id {user.user_id!r} exists")
            tx.execute(
                "INSERT INTO auth_users (user_id, kind, organization, fhir_user, patient_id, password_hash, "
                "created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    user.user_id,
                    user.kind,
                    user.organization,
                    user.fhir_user,
                    user.patient_id,
                    digest,
                    _now(now),
                ],
            )

    def user(self, user_id: str) -> AuthUser | None:
        row = self._user_row(user_id)
        return row[0] if row else None

    def users(self) -> list[AuthUser]:
        ids = [r[0] for r in self.db.query("SELECT user_id FROM auth_users ORDER BY user_id")]
        return [u for u in (self.user(i) for i in ids) if u is not None]

    def remove_user(self, user_id: str) -> None:
        """Raises :class:`AuthNotFound` for an unknown id."""
        with self.db.transaction() as tx:
            if not tx.query("SELECT 1 FROM auth_users WHERE user_id = ?", [user_id]):
                raise AuthNotFound(f"no user with id {user_id!r}")
            tx.execute("DELETE FROM auth_users WHERE user_id = ?", [user_id])
            tx.execute("DELETE FROM auth_codes WHERE user_id = ?", [user_id])

    def check_password(self, user_id: str, password: str) -> AuthUser | None:
        """The user when ``password`` is theirs, else None (an unknown user too, after as long a check).
        A hash made with weaker parameters than the current ones is replaced on success."""
        row = self._user_row(user_id)
        digest = row[1] if row else _dummy_hash()
        try:
            _HASHER.verify(digest, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return None
        if row is None:
            return None
        if _HASHER.check_needs_rehash(digest):
            self.db.execute(
                "UPDATE auth_users SET password_hash = ? WHERE user_id = ?", [_HASHER.hash(password), user_id]
            )
        return row[0]

    def _user_row(self, user_id: str) -> tuple[AuthUser, str] | None:
        rows = self.db.query(
            "SELECT user_id, kind, organization, fhir_user, patient_id, password_hash FROM auth_users "
            "WHERE user_id = ?",
            [user_id],
        )
        if not rows:
            return None
        uid, kind, org, fhir_user, patient_id, digest = rows[0]
        return AuthUser(uid, kind, org, fhir_user, patient_id), digest

    # -- client assertion ids -------------------------------------------------------------------
    def remember_assertion(
        self, client_id: str, jti: str, expires_at: int, *, now: int | None = None
    ) -> bool:
        """Record that ``client_id`` used assertion ``jti``, kept until ``expires_at``. False when it
        was recorded before and has not expired (a replay): the caller refuses the assertion."""
        t = _now(now)
        with self.db.transaction() as tx:
            tx.execute("DELETE FROM auth_assertion_ids WHERE expires_at < ?", [t])
            cur = tx.execute(
                "INSERT INTO auth_assertion_ids (client_id, jti, expires_at) VALUES (?, ?, ?) "
                "ON CONFLICT (client_id, jti) DO NOTHING",
                [client_id, jti, expires_at],
            )
            return bool(cur.rowcount == 1)

    # -- authorization codes --------------------------------------------------------------------
    def save_code(self, code: str, record: AuthCode, *, now: int | None = None) -> None:
        """Store ``code`` (by its SHA-256) with what it was issued for; expired codes go."""
        with self.db.transaction() as tx:
            tx.execute("DELETE FROM auth_codes WHERE expires_at < ?", [_now(now)])
            tx.execute(
                "INSERT INTO auth_codes (code_sha256, client_id, redirect_uri, scope, user_id, code_challenge, "
                "code_challenge_method, nonce, auth_time, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    code_digest(code),
                    record.client_id,
                    record.redirect_uri,
                    record.scope,
                    record.user_id,
                    record.code_challenge,
                    record.code_challenge_method,
                    record.nonce,
                    record.auth_time,
                    record.expires_at,
                ],
            )

    def take_code(self, code: str, *, now: int | None = None) -> AuthCode | None:
        """The record of ``code``, deleted in the same statement: a second call, or a concurrent one,
        gets None. None too when the code is unknown or expired."""
        rows = self.db.query(
            "DELETE FROM auth_codes WHERE code_sha256 = ? RETURNING client_id, redirect_uri, scope, user_id, "
            "code_challenge, code_challenge_method, nonce, auth_time, expires_at",
            [code_digest(code)],
        )
        if not rows:
            return None
        record = AuthCode(*rows[0])
        return record if record.expires_at >= _now(now) else None

    def nonce_used(self, client_id: str, nonce: str) -> bool:
        """Whether a live code of ``client_id`` was issued with this OpenID Connect ``nonce``."""
        return bool(
            self.db.query("SELECT 1 FROM auth_codes WHERE client_id = ? AND nonce = ?", [client_id, nonce])
        )

    # -- login failures -------------------------------------------------------------------------
    def login_failures(self, subjects: Sequence[str], since: int) -> dict[str, tuple[int, int]]:
        """Per subject, the number of failures at or after ``since`` and the time of the oldest of them."""
        out: dict[str, tuple[int, int]] = {}
        for subject in subjects:
            rows = self.db.query(
                "SELECT COUNT(*), MIN(failed_at) FROM auth_login_failures WHERE subject = ? AND failed_at >= ?",
                [subject, since],
            )
            count, oldest = rows[0]
            if count:
                out[subject] = (int(count), int(oldest))
        return out

    def record_login_failure(
        self, subjects: Iterable[str], *, now: int | None = None, keep: int = 86_400
    ) -> None:
        """One failure for each of ``subjects``; failures older than ``keep`` seconds go."""
        t = _now(now)
        with self.db.transaction() as tx:
            tx.execute("DELETE FROM auth_login_failures WHERE failed_at < ?", [t - keep])
            for subject in subjects:
                tx.execute("INSERT INTO auth_login_failures (subject, failed_at) VALUES (?, ?)", [subject, t])

    def clear_login_failures(self, subject: str) -> None:
        self.db.execute("DELETE FROM auth_login_failures WHERE subject = ?", [subject])

    # -- server secrets -------------------------------------------------------------------------
    def secret(self, name: str) -> bytes:
        """A random 32-byte secret named ``name``, made on first use and the same for every process
        sharing the database (the login form's CSRF key)."""
        key = f"secret:{name}"
        rows = self.db.query("SELECT value FROM auth_meta WHERE key = ?", [key])
        if not rows:  # the first process to get here makes it; the others read that one
            self.db.execute(
                "INSERT INTO auth_meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING",
                [key, secrets.token_hex(32)],
            )
            rows = self.db.query("SELECT value FROM auth_meta WHERE key = ?", [key])
        return bytes.fromhex(rows[0][0])


# -- definitions ----------------------------------------------------------------------------------
_LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})
_PRIVATE_JWK_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})


def _check_client(client: AuthClient) -> None:
    if not client.client_id or not client.client_id.isprintable() or " " in client.client_id:
        raise AuthInputError("the client id must be printable text without spaces")
    if client.kind not in CLIENT_KINDS:
        raise AuthInputError(f"the client kind must be one of {', '.join(CLIENT_KINDS)}")
    if not client.scopes:
        raise AuthInputError("a client needs at least one scope")
    if client.public:
        if client.jwks is not None or client.jwks_uri:
            raise AuthInputError("a public client has no keys (no JWKS, no JWKS URI)")
        if not client.redirect_uris:
            raise AuthInputError("a public client needs at least one redirect URI")
        if any(s.startswith("system/") for s in client.scopes):
            raise AuthInputError("a public client cannot be given system/ scopes")
    else:
        if (client.jwks is None) == (not client.jwks_uri):
            raise AuthInputError("a confidential-asymmetric client needs a JWKS or a JWKS URI (one of them)")
        if client.jwks is not None:
            keys = client.jwks.get("keys")
            if not isinstance(keys, list) or not keys or not all(isinstance(k, dict) for k in keys):
                raise AuthInputError("the JWKS must hold a non-empty list 'keys'")
            if any(_PRIVATE_JWK_MEMBERS & k.keys() for k in keys):
                raise AuthInputError("the JWKS holds private key material: register the public keys only")
        if not client.redirect_uris and any(not s.startswith("system/") for s in client.scopes):
            raise AuthInputError(
                "a backend service (no redirect URI) can be given system/ scopes only; "
                "add a redirect URI for an app that users sign in to"
            )
    for uri in client.redirect_uris:
        if "#" in uri or not uri.isprintable() or " " in uri or ":" not in uri:
            raise AuthInputError("a redirect URI must be an absolute URI without a fragment")
        parts = urlsplit(uri)
        if parts.scheme == "http" and parts.hostname not in _LOOPBACK:
            raise AuthInputError("a redirect URI uses https, or http to a loopback address (RFC 8252)")
    for scope in client.scopes:
        if not scope.isprintable() or not scope.isascii() or '"' in scope or "\\" in scope:
            raise AuthInputError("a scope is printable ASCII without quotes or backslashes (RFC 6749 3.3)")


def _check_user(user: AuthUser) -> None:
    if not user.user_id or not user.user_id.isprintable() or " " in user.user_id:
        raise AuthInputError("the user id must be printable text without spaces")
    if user.kind not in USER_KINDS:
        raise AuthInputError(f"the user kind must be one of {', '.join(USER_KINDS)}")
    if user.kind == "patient":
        if not user.patient_id:
            raise AuthInputError("a patient user needs the id of their Patient resource")
        if user.fhir_user and user.fhir_user != f"Patient/{user.patient_id}":
            raise AuthInputError("a patient user's fhirUser is their own Patient")
    elif user.patient_id:
        raise AuthInputError("only a patient user is bound to a Patient")
    if user.kind == "clinician":
        if not user.organization:
            raise AuthInputError("a clinician needs an organisation")
        if not user.fhir_user or not user.fhir_user.startswith(("Practitioner/", "PractitionerRole/")):
            raise AuthInputError("a clinician's fhirUser is a Practitioner/ or PractitionerRole/ reference")
    if user.fhir_user is not None:
        rtype, _, rid = user.fhir_user.partition("/")
        if not rtype or not rid or "/" in rid or not user.fhir_user.isprintable():
            raise AuthInputError("fhirUser must be a relative reference such as Practitioner/123")
