"""The authorization server's store, run against SQLite and PostgreSQL alike."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from argon2 import PasswordHasher

from bridge.stores.auth import (
    AuthClient,
    AuthCode,
    AuthConflict,
    AuthInputError,
    AuthNotFound,
    AuthStore,
    AuthUser,
)

JWKS = {"keys": [{"kty": "EC", "crv": "P-384", "x": "AAAA", "y": "BBBB", "kid": "k1"}]}
NOW = 1_800_000_000


@pytest.fixture(params=["sqlite", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite://{tmp_path / 'auth.db'}"
    return str(request.getfixturevalue("pg_dsn"))


@pytest.fixture
def store(url: str) -> Iterator[AuthStore]:
    s = AuthStore.open(url)
    yield s
    s.close()


def _backend(cid: str = "bulk", **kw: object) -> AuthClient:
    return AuthClient(cid, "confidential-asymmetric", ("system/*.rs",), jwks=JWKS, **kw)  # type: ignore[arg-type]


def _app(cid: str = "app") -> AuthClient:
    return AuthClient(
        cid, "public", ("openid", "fhirUser", "launch/patient", "patient/*.rs"), ("https://app.example/cb",)
    )


def _code(**kw: object) -> AuthCode:
    fields: dict[str, object] = {
        "client_id": "app",
        "redirect_uri": "https://app.example/cb",
        "scope": "openid patient/*.rs",
        "user_id": "u1",
        "code_challenge": "c" * 43,
        "code_challenge_method": "S256",
        "nonce": "n1",
        "auth_time": NOW,
        "expires_at": NOW + 120,
    }
    fields.update(kw)
    return AuthCode(**fields)  # type: ignore[arg-type]


# -- clients --------------------------------------------------------------------------------------
def test_clients_round_trip_and_list(store: AuthStore) -> None:
    store.add_client(_backend())
    store.add_client(_app())
    store.add_client(
        AuthClient("remote", "confidential-asymmetric", ("system/Patient.rs",), jwks_uri="https://x/jwks")
    )
    assert store.client("bulk") == _backend()
    assert store.client("app") == _app()
    assert store.client("remote") is not None and store.client("remote").jwks_uri == "https://x/jwks"  # type: ignore[union-attr]
    assert store.client("nobody") is None
    assert [c.client_id for c in store.clients()] == ["app", "bulk", "remote"]


def test_client_id_taken_is_a_conflict(store: AuthStore) -> None:
    store.add_client(_backend())
    with pytest.raises(AuthConflict):
        store.add_client(_backend())


def test_remove_client(store: AuthStore) -> None:
    store.add_client(_app())
    store.save_code("abc", _code(), now=NOW)
    store.remove_client("app")
    assert store.client("app") is None
    assert store.take_code("abc", now=NOW) is None  # its codes went with it
    with pytest.raises(AuthNotFound):
        store.remove_client("app")


@pytest.mark.parametrize(
    ("client", "problem"),
    [
        (AuthClient("a b", "public", ("openid",), ("https://a/cb",)), "without spaces"),
        (AuthClient("a", "robot", ("openid",), ("https://a/cb",)), "kind"),
        (AuthClient("a", "public", (), ("https://a/cb",)), "at least one scope"),
        (AuthClient("a", "public", ("openid",)), "redirect URI"),
        (AuthClient("a", "public", ("system/*.rs",), ("https://a/cb",)), "system/"),
        (AuthClient("a", "public", ("openid",), ("https://a/cb",), jwks=JWKS), "no keys"),
        (AuthClient("a", "confidential-asymmetric", ("system/*.rs",)), "JWKS or a JWKS URI"),
        (
            AuthClient("a", "confidential-asymmetric", ("system/*.rs",), jwks=JWKS, jwks_uri="https://x"),
            "one of",
        ),
        (AuthClient("a", "confidential-asymmetric", ("system/*.rs",), jwks={"keys": []}), "non-empty"),
        (
            AuthClient(
                "a",
                "confidential-asymmetric",
                ("system/*.rs",),
                jwks={"keys": [{**JWKS["keys"][0], "d": "x"}]},
            ),
            "private key material",
        ),
        (AuthClient("a", "confidential-asymmetric", ("user/*.rs",), jwks=JWKS), "system/ scopes only"),
        (AuthClient("a", "public", ("openid",), ("https://a/cb#frag",)), "fragment"),
        (AuthClient("a", "public", ("openid",), ("http://app.example/cb",)), "loopback"),
        (AuthClient("a", "public", ('open"id',), ("https://a/cb",)), "quotes"),
    ],
)
def test_inconsistent_client_is_refused(store: AuthStore, client: AuthClient, problem: str) -> None:
    with pytest.raises(AuthInputError, match=problem):
        store.add_client(client)
    assert store.clients() == []


def test_loopback_http_redirect_is_allowed(store: AuthStore) -> None:
    store.add_client(
        AuthClient("cli", "public", ("openid",), ("http://127.0.0.1:8765/cb", "http://localhost/cb"))
    )
    assert store.client("cli") is not None


# -- users ----------------------------------------------------------------------------------------
def test_password_is_hashed_with_argon2id_and_checked(store: AuthStore) -> None:
    store.add_user(AuthUser("dr-who", "clinician", "st-mary", "Practitioner/7"), "correct horse battery")
    digest = store.db.query("SELECT password_hash FROM auth_users WHERE user_id = ?", ["dr-who"])[0][0]
    assert digest.startswith("$argon2id$") and "correct horse" not in digest
    user = store.check_password("dr-who", "correct horse battery")
    assert user == AuthUser("dr-who", "clinician", "st-mary", "Practitioner/7")
    assert store.check_password("dr-who", "correct horse batterY") is None
    assert store.check_password("nobody", "correct horse battery") is None


def test_patient_user_gets_their_patient_as_fhir_user(store: AuthStore) -> None:
    store.add_user(AuthUser("jane", "patient", patient_id="p123"), "s3cret-enough")
    assert store.user("jane") == AuthUser("jane", "patient", None, "Patient/p123", "p123")


def test_weaker_hash_is_replaced_on_sign_in(store: AuthStore) -> None:
    store.add_user(AuthUser("st", "steward", "local"), "s3cret-enough")
    weak = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1).hash("s3cret-enough")
    store.db.execute("UPDATE auth_users SET password_hash = ? WHERE user_id = ?", [weak, "st"])
    assert store.check_password("st", "s3cret-enough") is not None
    digest = store.db.query("SELECT password_hash FROM auth_users WHERE user_id = ?", ["st"])[0][0]
    assert digest != weak and not PasswordHasher().check_needs_rehash(digest)


@pytest.mark.parametrize(
    ("user", "password", "problem"),
    [
        (AuthUser("p", "patient"), "long enough!", "Patient resource"),
        (AuthUser("p", "patient", fhir_user="Patient/other", patient_id="p1"), "long enough!", "own Patient"),
        (AuthUser("c", "clinician", None, "Practitioner/1"), "long enough!", "organisation"),
        (AuthUser("c", "clinician", "org", "Patient/1"), "long enough!", "Practitioner"),
        (AuthUser("s", "steward", "org", patient_id="p1"), "long enough!", "only a patient"),
        (AuthUser("s", "steward", "org", fhir_user="nonsense"), "long enough!", "relative reference"),
        (AuthUser("s", "admin", "org"), "long enough!", "kind"),
        (AuthUser("s", "steward", "org"), "short", "8 characters"),
    ],
)
def test_inconsistent_user_is_refused(store: AuthStore, user: AuthUser, password: str, problem: str) -> None:
    with pytest.raises(AuthInputError, match=problem):
        store.add_user(user, password)


def test_user_conflict_and_removal(store: AuthStore) -> None:
    store.add_user(AuthUser("st", "steward", "local"), "s3cret-enough")
    with pytest.raises(AuthConflict):
        store.add_user(AuthUser("st", "steward", "local"), "another-one!")
    assert [u.user_id for u in store.users()] == ["st"]
    store.remove_user("st")
    assert store.user("st") is None and store.check_password("st", "s3cret-enough") is None
    with pytest.raises(AuthNotFound):
        store.remove_user("st")


# -- single-use records ---------------------------------------------------------------------------
def test_assertion_id_is_accepted_once_until_it_expires(store: AuthStore) -> None:
    assert store.remember_assertion("bulk", "j1", NOW + 300, now=NOW)
    assert not store.remember_assertion("bulk", "j1", NOW + 300, now=NOW + 10)
    assert store.remember_assertion("other", "j1", NOW + 300, now=NOW)  # per client
    # kept until its expiry, forgotten after it (an expired assertion is refused for its exp anyway)
    assert not store.remember_assertion("bulk", "j1", NOW + 900, now=NOW + 300)
    assert store.remember_assertion("bulk", "j1", NOW + 900, now=NOW + 301)


def test_code_is_taken_once(store: AuthStore) -> None:
    store.save_code("the-code", _code(), now=NOW)
    stored = store.db.query("SELECT code_sha256 FROM auth_codes")[0][0]
    assert stored != "the-code" and len(stored) == 64  # only its digest is kept
    assert store.take_code("the-code", now=NOW + 5) == _code()
    assert store.take_code("the-code", now=NOW + 6) is None


def test_expired_code_is_refused(store: AuthStore) -> None:
    store.save_code("old", _code(expires_at=NOW + 120), now=NOW)
    assert store.take_code("old", now=NOW + 121) is None
    assert store.take_code("unknown", now=NOW) is None


def test_nonce_of_a_live_code(store: AuthStore) -> None:
    store.save_code("c1", _code(nonce="n-1"), now=NOW)
    assert store.nonce_used("app", "n-1") and not store.nonce_used("app", "n-2")
    assert not store.nonce_used("other", "n-1")


def test_login_failures_count_per_subject_within_the_window(store: AuthStore) -> None:
    for i in range(3):
        store.record_login_failure(["user:a", "address:1.2.3.4"], now=NOW + i)
    store.record_login_failure(["user:b", "address:1.2.3.4"], now=NOW + 10)
    got = store.login_failures(["user:a", "user:b", "address:1.2.3.4", "user:c"], since=NOW)
    assert got == {"user:a": (3, NOW), "user:b": (1, NOW + 10), "address:1.2.3.4": (4, NOW)}
    assert store.login_failures(["user:a"], since=NOW + 2) == {"user:a": (1, NOW + 2)}
    store.clear_login_failures("user:a")
    assert "user:a" not in store.login_failures(["user:a"], since=NOW)
    assert store.login_failures(["address:1.2.3.4"], since=NOW)["address:1.2.3.4"][0] == 4


def test_secret_is_made_once_and_shared(url: str, store: AuthStore) -> None:
    first = store.secret("csrf")
    assert len(first) == 32
    other = AuthStore.open(url)
    try:
        assert other.secret("csrf") == first
        assert other.secret("another") != first
    finally:
        other.close()
