"""``fhirbridge auth``: clients, users (the password never on the command line), key rotation, client
key pairs, and a real client-credentials exchange against a running service."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from joserfc import jwt
from joserfc.jwk import KeySet

from bridge.cli import main
from bridge.config import Settings
from bridge.service.auth import keys, server
from bridge.service.context import ALLOWED_HOSTS, BACKEND, SETTINGS, Backend
from bridge.stores.auth import AuthClient, AuthStore, AuthUser
from bridge.stream.broker import free_port


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FHIRBRIDGE_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("FHIRBRIDGE_AUTH_URL", raising=False)
    monkeypatch.delenv("FHIRBRIDGE_AUTH_PASSWORD", raising=False)
    monkeypatch.delenv("FHIRBRIDGE_PUBLIC_URL", raising=False)
    return tmp_path


def _store() -> AuthStore:
    return AuthStore.open(Settings.from_env().auth.url)


def test_keygen_then_register_a_backend_service(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["auth", "keygen", "--name", "bulk", "--out", str(data_dir / "client")]) == 0
    private, public = data_dir / "client" / "bulk.jwk", data_dir / "client" / "bulk.jwks.json"
    assert private.stat().st_mode & 0o777 == 0o600
    assert "d" in orjson.loads(private.read_bytes())
    assert all("d" not in k for k in orjson.loads(public.read_bytes())["keys"])
    assert main(["auth", "keygen", "--name", "bulk", "--out", str(data_dir / "client")]) == 1  # no overwrite

    argv = ["auth", "clients", "add", "--id", "bulk", "--jwks-file", str(public), "--scope", "system/*.rs"]
    assert main(argv) == 0
    assert main(["auth", "clients", "add", "--id", "app", "--public", "--redirect-uri", "http://127.0.0.1:9/cb",
                 "--scope", "openid launch/patient", "--scope", "patient/*.rs"]) == 0  # fmt: skip
    store = _store()
    try:
        assert store.client("bulk").scopes == ("system/*.rs",)  # type: ignore[union-attr]
        assert store.client("app").scopes == ("openid", "launch/patient", "patient/*.rs")  # type: ignore[union-attr]
    finally:
        store.close()
    capsys.readouterr()
    assert main(["auth", "clients", "list"]) == 0
    out = capsys.readouterr().out
    assert "bulk\tconfidential-asymmetric" in out and "app\tpublic" in out
    assert main(["auth", "clients", "remove", "--id", "app"]) == 0
    assert main(["auth", "clients", "remove", "--id", "app"]) == 1


def test_client_registration_errors_are_one_line(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = data_dir / "bad.json"
    bad.write_text("not json")
    assert (
        main(["auth", "clients", "add", "--id", "x", "--jwks-file", str(bad), "--scope", "system/*.rs"]) == 1
    )
    assert main(["auth", "clients", "add", "--id", "x", "--public", "--scope", "openid"]) == 1
    err = capsys.readouterr().err
    assert "not JSON" in err and "redirect URI" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as exc:  # one of --jwks-file, --jwks-uri, --public is required
        main(["auth", "clients", "add", "--id", "x", "--scope", "openid"])
    assert exc.value.code == 2


def test_user_password_from_a_file_or_the_environment(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = data_dir / "pw"
    secret.write_text("correct horse battery\n")
    argv = ["auth", "users", "add", "--id", "dr-who", "--kind", "clinician", "--fhir-user", "Practitioner/7"]
    assert main([*argv, "--password-file", str(secret)]) == 0
    monkeypatch.setenv("FHIRBRIDGE_AUTH_PASSWORD", "another fine one")
    assert main(["auth", "users", "add", "--id", "jane", "--kind", "patient", "--patient", "p123"]) == 0
    store = _store()
    try:
        # the file's final newline is not part of the password; the default organisation applies
        assert store.check_password("dr-who", "correct horse battery") == AuthUser(
            "dr-who", "clinician", "local", "Practitioner/7"
        )
        assert store.check_password("jane", "another fine one") is not None
    finally:
        store.close()
    capsys.readouterr()
    assert main(["auth", "users", "list"]) == 0
    out = capsys.readouterr().out
    assert "dr-who\tclinician" in out and "argon2" not in out
    with pytest.raises(SystemExit):  # no --password option exists
        main(["auth", "users", "add", "--id", "x", "--kind", "steward", "--password", "on-the-command-line"])


def test_user_without_a_password_is_a_usage_error(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["auth", "users", "add", "--id", "st", "--kind", "steward"]) == 2
    assert "FHIRBRIDGE_AUTH_PASSWORD" in capsys.readouterr().err


def test_rotate_key(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings = Settings.from_env()
    first = keys.load_or_create(settings.auth.keys_dir).kid
    assert main(["auth", "rotate-key"]) == 0
    now = keys.signing_keys(settings)
    assert now.kid != first and now.kid in capsys.readouterr().out
    assert {k["kid"] for k in keys.current_jwks(settings)["keys"]} == {first, now.kid}


async def test_token_command_exchanges_client_credentials(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["auth", "keygen", "--name", "bulk", "--out", str(data_dir)]) == 0
    jwks_file = str(data_dir / "bulk.jwks.json")
    assert (
        main(["auth", "clients", "add", "--id", "bulk", "--jwks-file", jwks_file, "--scope", "system/*.rs"])
        == 0
    )
    settings = Settings.from_env()
    app = web.Application()
    app[SETTINGS], app[ALLOWED_HOSTS], app[BACKEND] = settings, None, Backend(settings)
    app.add_routes(server.routes)
    async with TestServer(app) as service:
        url = str(service.make_url("/auth/token"))
        capsys.readouterr()
        argv = ["auth", "token", "--client", "bulk", "--key-file", str(data_dir / "bulk.jwk"), "--url", url]
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(None, main, [*argv, "--scope", "system/*.rs"]) == 0
        printed = capsys.readouterr().out.strip()
        claims = jwt.decode(printed, KeySet.import_key_set(keys.current_jwks(settings))).claims
        assert claims["sub"] == "bulk" and claims["scope"] == "system/*.rs"
        assert "extensions" not in claims  # no purpose stated
        argv_purpose = [*argv, "--scope", "system/*.rs", "--purpose", "PUBHLTH"]
        assert await loop.run_in_executor(None, main, argv_purpose) == 0
        printed = capsys.readouterr().out.strip()
        claims = jwt.decode(printed, KeySet.import_key_set(keys.current_jwks(settings))).claims
        assert [c["code"] for c in claims["extensions"]["ihe_iua"]["purpose_of_use"]] == ["PUBHLTH"]
        # a refusal is one line with the server's error code
        assert await loop.run_in_executor(None, main, [*argv, "--scope", "system/*.cruds"]) == 1
        assert "invalid_scope" in capsys.readouterr().err
    app[BACKEND].close()


async def test_login_command_signs_in_with_pkce_and_states_the_purpose(
    data_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    redirect = "http://127.0.0.1:9/callback"
    store = _store()
    store.add_client(AuthClient("term", "public", ("user/*.rs", "openid", "fhirUser"), (redirect,)))
    store.add_user(AuthUser("dr-who", "clinician", "st-mary", "Practitioner/7"), "correct horse battery")
    store.close()
    port = free_port()
    monkeypatch.setenv(
        "FHIRBRIDGE_PUBLIC_URL", f"http://127.0.0.1:{port}"
    )  # the tokens' aud, and where to go
    settings = Settings.from_env()
    app = web.Application()
    app[SETTINGS], app[ALLOWED_HOSTS], app[BACKEND] = settings, None, Backend(settings)
    app.add_routes(server.routes)
    async with TestServer(app, host="127.0.0.1", port=port):
        argv = ["auth", "login", "--client", "term", "--redirect-uri", redirect, "--user", "dr-who"]
        argv += ["--scope", "user/*.rs", "--purpose", "ETREAT"]
        loop = asyncio.get_running_loop()
        monkeypatch.setenv("FHIRBRIDGE_AUTH_PASSWORD", "correct horse battery")
        capsys.readouterr()
        assert await loop.run_in_executor(None, main, argv) == 0
        printed = capsys.readouterr().out.strip()
        claims = jwt.decode(printed, KeySet.import_key_set(keys.current_jwks(Settings.from_env()))).claims
        assert claims["sub"] == "dr-who" and claims["scope"] == "user/*.rs"
        iua = claims["extensions"]["ihe_iua"]
        assert iua["subject_organization_id"] == "st-mary" and iua["purpose_of_use"][0]["code"] == "ETREAT"
        monkeypatch.setenv("FHIRBRIDGE_AUTH_PASSWORD", "wrong")
        assert await loop.run_in_executor(None, main, argv) == 1
        err = capsys.readouterr().err
        assert "access_denied" in err and "wrong" not in err
    app[BACKEND].close()
