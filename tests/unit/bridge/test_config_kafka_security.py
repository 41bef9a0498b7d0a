"""``FHIRBRIDGE_KAFKA_SECURITY_PROTOCOL``, ``FHIRBRIDGE_KAFKA_SSL_*``, ``FHIRBRIDGE_KAFKA_SASL_*``: parsed
into ``KafkaSettings.security``; a combination the broker would refuse, a missing file or a secret given
twice is a ConfigError naming the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge.config import KafkaSecurity, Settings
from bridge.errors import ConfigError

P = "FHIRBRIDGE_KAFKA_"


def _files(tmp_path: Path) -> dict[str, Path]:
    out = {}
    for name in ("ca.pem", "client.pem", "client.key", "crl.pem", "token", "password"):
        path = tmp_path / name
        path.write_text("s3cret-pass\n" if name == "password" else f"{name}\n")
        out[name] = path
    return out


def _security(env: dict[str, str]) -> KafkaSecurity:
    return Settings.from_env(env).kafka.security


def _error(env: dict[str, str]) -> str:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(env)
    return str(caught.value)


def test_default_is_plain_text_with_hostname_check() -> None:
    sec = _security({})
    assert sec == KafkaSecurity()
    assert sec.protocol == "PLAINTEXT" and sec.ssl_check_hostname and sec.sasl_mechanism is None
    assert Settings.from_env({}).kafka.bootstrap_timeout_ms == 15000


def test_sasl_ssl_scram_with_the_password_from_a_file(tmp_path: Path) -> None:
    f = _files(tmp_path)
    sec = _security(
        {
            f"{P}SECURITY_PROTOCOL": "sasl_ssl",
            f"{P}SSL_CAFILE": str(f["ca.pem"]),
            f"{P}SASL_MECHANISM": "scram-sha-512",
            f"{P}SASL_USERNAME": "alice",
            f"{P}SASL_PASSWORD_FILE": str(f["password"]),
        }
    )
    assert sec.protocol == "SASL_SSL" and sec.tls
    assert sec.sasl_mechanism == "SCRAM-SHA-512" and sec.sasl_username == "alice"
    assert sec.sasl_password == "s3cret-pass"  # the final newline is not part of it
    assert sec.ssl_cafile == f["ca.pem"]
    assert "s3cret" not in repr(sec) and "s3cret" not in sec.describe()
    assert sec.describe() == "SASL_SSL, SCRAM-SHA-512 as 'alice'"


def test_mutual_tls_with_key_password_from_the_environment(tmp_path: Path) -> None:
    f = _files(tmp_path)
    sec = _security(
        {
            f"{P}SECURITY_PROTOCOL": "SSL",
            f"{P}SSL_CAFILE": str(f["ca.pem"]),
            f"{P}SSL_CERTFILE": str(f["client.pem"]),
            f"{P}SSL_KEYFILE": str(f["client.key"]),
            f"{P}SSL_KEY_PASSWORD": "key-pass",
            f"{P}SSL_CRLFILE": str(f["crl.pem"]),
            f"{P}SSL_CHECK_HOSTNAME": "false",
        }
    )
    assert sec.ssl_certfile == f["client.pem"] and sec.ssl_keyfile == f["client.key"]
    assert sec.ssl_key_password == "key-pass" and sec.ssl_crlfile == f["crl.pem"]
    assert sec.ssl_check_hostname is False
    assert "key-pass" not in repr(sec)
    assert sec.describe() == "SSL, client certificate"


def test_oauthbearer_takes_a_token_file(tmp_path: Path) -> None:
    f = _files(tmp_path)
    sec = _security(
        {
            f"{P}SECURITY_PROTOCOL": "SASL_SSL",
            f"{P}SASL_MECHANISM": "OAUTHBEARER",
            f"{P}SASL_OAUTH_TOKEN_FILE": str(f["token"]),
        }
    )
    assert sec.sasl_oauth_token_file == f["token"]


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({f"{P}SECURITY_PROTOCOL": "TLS"}, f"{P}SECURITY_PROTOCOL must be one of"),
        ({f"{P}SASL_MECHANISM": "PLAIN"}, f"{P}SASL_MECHANISM=PLAIN needs {P}SECURITY_PROTOCOL SASL_SSL"),
        (
            {f"{P}SECURITY_PROTOCOL": "SSL", f"{P}SASL_MECHANISM": "PLAIN"},
            f"{P}SASL_MECHANISM=PLAIN needs",
        ),
        ({f"{P}SECURITY_PROTOCOL": "SASL_SSL"}, f"SASL_SSL needs {P}SASL_MECHANISM"),
        (
            {f"{P}SECURITY_PROTOCOL": "SASL_SSL", f"{P}SASL_MECHANISM": "GSSAPI"},
            f"{P}SASL_MECHANISM must be one of",
        ),
        (
            {f"{P}SECURITY_PROTOCOL": "SASL_SSL", f"{P}SASL_MECHANISM": "PLAIN", f"{P}SASL_USERNAME": "a"},
            f"needs {P}SASL_PASSWORD",
        ),
        (
            {f"{P}SECURITY_PROTOCOL": "SASL_SSL", f"{P}SASL_MECHANISM": "SCRAM-SHA-256"},
            f"needs {P}SASL_USERNAME",
        ),
        ({f"{P}SASL_USERNAME": "alice"}, f"{P}SASL_USERNAME is set, but"),
        (
            {f"{P}SECURITY_PROTOCOL": "SASL_SSL", f"{P}SASL_MECHANISM": "OAUTHBEARER"},
            f"needs {P}SASL_OAUTH_TOKEN_FILE",
        ),
        (
            {
                f"{P}SECURITY_PROTOCOL": "SASL_SSL",
                f"{P}SASL_MECHANISM": "OAUTHBEARER",
                f"{P}SASL_OAUTH_TOKEN_FILE": "/nonexistent/token",
            },
            f"{P}SASL_OAUTH_TOKEN_FILE: no such file",
        ),
        ({f"{P}SSL_CAFILE": "/etc/hostname"}, f"{P}SSL_CAFILE is set, but {P}SECURITY_PROTOCOL=PLAINTEXT"),
        (
            {f"{P}SECURITY_PROTOCOL": "SSL", f"{P}SSL_CAFILE": "/nonexistent/ca.pem"},
            f"{P}SSL_CAFILE: no such",
        ),
        ({f"{P}SECURITY_PROTOCOL": "SSL", f"{P}SSL_CHECK_HOSTNAME": "maybe"}, f"{P}SSL_CHECK_HOSTNAME must"),
        ({f"{P}BOOTSTRAP_TIMEOUT_MS": "0"}, f"{P}BOOTSTRAP_TIMEOUT_MS must be at least 1"),
    ],
)
def test_bad_combinations_name_the_variable(env: dict[str, str], names: str) -> None:
    assert names in _error(env)


def test_a_key_without_its_certificate_is_an_error(tmp_path: Path) -> None:
    f = _files(tmp_path)
    env = {f"{P}SECURITY_PROTOCOL": "SSL", f"{P}SSL_KEYFILE": str(f["client.key"])}
    assert f"{P}SSL_KEYFILE is set without {P}SSL_CERTFILE" in _error(env)
    env = {f"{P}SECURITY_PROTOCOL": "SSL", f"{P}SSL_KEY_PASSWORD": "x"}
    assert f"{P}SSL_KEY_PASSWORD is set without" in _error(env)


def test_a_secret_given_twice_or_in_a_missing_file_is_an_error(tmp_path: Path) -> None:
    f = _files(tmp_path)
    base = {
        f"{P}SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        f"{P}SASL_MECHANISM": "PLAIN",
        f"{P}SASL_USERNAME": "a",
    }
    both = {**base, f"{P}SASL_PASSWORD": "x", f"{P}SASL_PASSWORD_FILE": str(f["password"])}
    message = _error(both)
    assert f"set {P}SASL_PASSWORD_FILE or {P}SASL_PASSWORD, not both" in message
    assert "s3cret" not in message
    missing = _error({**base, f"{P}SASL_PASSWORD_FILE": str(tmp_path / "nope")})
    assert f"{P}SASL_PASSWORD_FILE: cannot read" in missing
    empty = tmp_path / "empty"
    empty.write_text("\n")
    assert f"{P}SASL_PASSWORD_FILE: {empty} is empty" in _error(
        {**base, f"{P}SASL_PASSWORD_FILE": str(empty)}
    )
    assert _security({**base, f"{P}SASL_PASSWORD": "from-env"}).sasl_password == "from-env"
