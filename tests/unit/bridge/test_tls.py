"""Transport security (bridge/tls.py): the server context, its located errors, client identities, the
plaintext-bind warning, the settings and options that configure it, and the MLLP listener over TLS.

Certificates come from a throw-away CA made in each test (tests/support/pki.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from kafka.future import Future

from adapters.base import SourceInfo
from adapters.hl7v2 import HL7v2Adapter
from bridge.config import Settings, TlsSettings
from bridge.errors import ConfigError
from bridge.ingest.mllp import END, MllpServer, frame
from bridge.logging import configure_logging
from bridge.tls import client_identity, is_loopback, server_context, warn_if_plaintext
from tests.support.pki import CLIENT_CN, CLIENT_URI, Pki


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki.create(tmp_path / "pki")


@pytest.fixture
def events(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Iterator[Any]:
    """JSON logging to this test's stderr; calling the fixture's value returns the events so far."""
    saved = logging.root.handlers[:], logging.root.level
    monkeypatch.setenv("FHIRBRIDGE_LOG_FORMAT", "json")
    configure_logging(force=True)

    def read() -> list[dict[str, Any]]:
        err = capsys.readouterr().err
        return [json.loads(line) for line in err.splitlines() if line.startswith("{")]

    yield read
    logging.root.handlers[:] = saved[0]
    logging.root.setLevel(saved[1])


def tls(pki: Pki, *, mutual: bool = False) -> TlsSettings:
    return TlsSettings(pki.server.cert_file, pki.server.key_file, pki.ca_file if mutual else None)


# -- the context -------------------------------------------------------------------------------------


def test_the_context_is_tls_12_or_newer_and_asks_for_no_client_certificate_without_a_ca(pki: Pki) -> None:
    ctx = server_context(tls(pki))
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.verify_mode == ssl.CERT_NONE
    assert ctx.options & ssl.OP_NO_RENEGOTIATION
    tls12 = [c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"]
    assert tls12 and all(("ECDHE" in c) and ("GCM" in c or "CHACHA20" in c) for c in tls12)
    assert server_context(tls(pki, mutual=True)).verify_mode == ssl.CERT_REQUIRED


async def _echo_server(ctx: ssl.SSLContext) -> tuple[asyncio.Server, int, list[Any]]:
    """An asyncio server with ``ctx`` that echoes 5 bytes and records each client's identity."""
    seen: list[Any] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(client_identity(writer))
        try:
            writer.write(await reader.read(5))
            await writer.drain()
        except OSError:
            pass
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
    return server, server.sockets[0].getsockname()[1], seen


async def _echo(port: int, client: ssl.SSLContext) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client, server_hostname="localhost")
    try:
        writer.write(b"hello")
        await writer.drain()
        return await asyncio.wait_for(reader.read(5), 10)
    finally:
        writer.close()


def _tls11_client(pki: Pki) -> ssl.SSLContext:
    """A client that offers TLS 1.0 and 1.1 only (OpenSSL 3 needs security level 0 for them)."""
    ctx = pki.client_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1
    ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    return ctx


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
async def test_a_tls_11_handshake_fails_and_a_tls_12_one_succeeds(pki: Pki) -> None:
    server, port, _ = await _echo_server(server_context(tls(pki)))
    try:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await _echo(port, _tls11_client(pki))
        tls12 = pki.client_context()
        tls12.maximum_version = ssl.TLSVersion.TLSv1_2
        assert await _echo(port, tls12) == b"hello"
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
async def test_the_tls_11_probe_does_offer_tls_11(pki: Pki) -> None:
    """The test above can fail: a server that allows TLS 1.1 completes the probe's handshake."""
    weak = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    weak.minimum_version = ssl.TLSVersion.TLSv1
    weak.set_ciphers("DEFAULT:@SECLEVEL=0")
    weak.load_cert_chain(pki.server.cert_file, pki.server.key_file)
    server, port, _ = await _echo_server(weak)
    try:
        assert await _echo(port, _tls11_client(pki)) == b"hello"
    finally:
        server.close()
        await server.wait_closed()


async def test_mutual_tls_refuses_a_client_without_a_certificate_and_names_one_with(pki: Pki) -> None:
    server, port, seen = await _echo_server(server_context(tls(pki, mutual=True)))
    other = Pki(pki.directory / "other", ca_cn="another CA")
    stranger = other.issue("stranger", "stranger.example", client=True)
    try:
        for client in (pki.client_context(), pki.client_context(cert=stranger)):
            # TLS 1.3: the client may finish its side of the handshake before the server's alert, and
            # then reads the end of the connection instead of an error
            with contextlib.suppress(ssl.SSLError, ConnectionError):
                assert await _echo(port, client) == b""
        assert seen == []  # the handler never ran for either
        assert await _echo(port, pki.client_context(cert=pki.client)) == b"hello"
    finally:
        server.close()
        await server.wait_closed()
    (identity,) = seen
    assert identity.common_name == CLIENT_CN
    assert identity.subject == f"CN={CLIENT_CN}"
    assert identity.alt_names == (f"URI:{CLIENT_URI}",)
    assert identity.issuer == "CN=fhirbridge test CA"
    # OpenSSL's hex form, padded to whole bytes (a leading 0 about half the time)
    assert int(identity.serial, 16) == pki.client.cert.serial_number
    assert len(identity.serial) % 2 == 0
    assert identity.log_fields() == {"client_subject": f"CN={CLIENT_CN}", "client_san": [f"URI:{CLIENT_URI}"]}


async def test_without_mutual_tls_a_connection_has_no_client_identity(pki: Pki) -> None:
    server, port, seen = await _echo_server(server_context(tls(pki)))
    try:
        assert await _echo(port, pki.client_context(cert=pki.client)) == b"hello"
    finally:
        server.close()
        await server.wait_closed()
    assert seen == [None]
    assert client_identity(None) is None


# -- located errors ------------------------------------------------------------------------------


def test_a_key_that_does_not_match_the_certificate_is_a_clear_error(pki: Pki) -> None:
    with pytest.raises(ConfigError) as err:
        server_context(
            TlsSettings(pki.server.cert_file, pki.client.key_file), env_prefix="FHIRBRIDGE_MLLP_TLS"
        )
    message = str(err.value)
    assert "does not belong to the certificate" in message
    assert str(pki.client.key_file) in message and "FHIRBRIDGE_MLLP_TLS_KEY_FILE or --tls-key" in message
    assert "PRIVATE KEY" not in message and pki.client.key_file.read_text()[40:80] not in message


@pytest.mark.parametrize(
    ("which", "expected"),
    [
        ("cert", "TLS certificate {path} (FHIRBRIDGE_TLS_CERT_FILE or --tls-cert): no such file"),
        ("key", "TLS key {path} (FHIRBRIDGE_TLS_KEY_FILE or --tls-key): no such file"),
        ("ca", "TLS client CA {path} (FHIRBRIDGE_TLS_CLIENT_CA_FILE or --tls-client-ca): no such file"),
    ],
)
def test_a_missing_file_is_named_with_its_setting(pki: Pki, which: str, expected: str) -> None:
    missing = pki.directory / "nowhere.pem"
    settings = tls(pki, mutual=True)
    settings = TlsSettings(
        missing if which == "cert" else settings.cert_file,
        missing if which == "key" else settings.key_file,
        missing if which == "ca" else settings.client_ca_file,
    )
    with pytest.raises(ConfigError) as err:
        server_context(settings)
    assert str(err.value) == expected.format(path=missing)


def test_a_directory_or_an_unreadable_file_is_a_clear_error(pki: Pki) -> None:
    with pytest.raises(ConfigError, match="is a directory"):
        server_context(TlsSettings(pki.directory, pki.server.key_file))
    unreadable = pki.directory / "locked.pem"
    unreadable.write_bytes(pki.server.cert_file.read_bytes())
    unreadable.chmod(0)
    try:
        unreadable.read_bytes()
    except PermissionError:
        with pytest.raises(ConfigError, match="cannot be read"):
            server_context(TlsSettings(unreadable, pki.server.key_file))
    else:
        pass  # as root every file is readable: the directory case above stands for it


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o620])
def test_a_key_readable_or_writable_by_group_or_others_is_refused(pki: Pki, mode: int) -> None:
    pki.server.key_file.chmod(mode)
    with pytest.raises(ConfigError) as err:
        server_context(tls(pki))
    assert f"mode {mode:04o}" in str(err.value) and f"chmod 600 {pki.server.key_file}" in str(err.value)
    pki.server.key_file.chmod(0o400)
    server_context(tls(pki))  # owner-only is fine, read-only too


def test_an_expired_or_not_yet_valid_certificate_is_refused(pki: Pki) -> None:
    now = dt.datetime.now(dt.UTC)
    old = pki.issue(
        "old", "localhost", not_before=now - dt.timedelta(days=400), not_after=now - dt.timedelta(days=2)
    )
    with pytest.raises(ConfigError, match=r"expired on \d{4}-\d\d-\d\d"):
        server_context(TlsSettings(old.cert_file, old.key_file))
    future = pki.issue("future", "localhost", not_before=now + dt.timedelta(days=2))
    with pytest.raises(ConfigError, match="not valid before"):
        server_context(TlsSettings(future.cert_file, future.key_file))


def test_a_certificate_expiring_within_30_days_is_a_warning(pki: Pki, events: Any) -> None:
    now = dt.datetime.now(dt.UTC)
    soon = pki.issue("soon", "localhost", not_after=now + dt.timedelta(days=10, hours=1))
    server_context(TlsSettings(soon.cert_file, soon.key_file))
    server_context(tls(pki))  # a year left: nothing said
    (warning,) = [e for e in events() if e["event"] == "tls.cert_expires_soon"]
    assert warning["level"] == "warning" and warning["days_left"] == 10
    assert str(soon.cert_file) in warning["certificate"]


def test_an_encrypted_key_or_a_file_without_a_key_is_a_clear_error(pki: Pki) -> None:
    key = serialization.load_pem_private_key(pki.server.key_file.read_bytes(), password=None)
    locked = pki.directory / "locked.key"
    locked.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    locked.chmod(0o600)
    with pytest.raises(ConfigError, match="is encrypted"):
        server_context(TlsSettings(pki.server.cert_file, locked))
    not_a_key = pki.directory / "cert-as-key.pem"
    not_a_key.write_bytes(pki.server.cert_file.read_bytes())
    not_a_key.chmod(0o600)
    with pytest.raises(ConfigError, match="holds no PEM private key"):
        server_context(TlsSettings(pki.server.cert_file, not_a_key))
    with pytest.raises(ConfigError, match="holds no PEM certificate"):
        server_context(TlsSettings(pki.server.key_file, pki.server.key_file))
    with pytest.raises(ConfigError, match=r"TLS client CA .* holds no PEM certificate"):
        server_context(TlsSettings(pki.server.cert_file, pki.server.key_file, pki.server.key_file))


@pytest.mark.parametrize(
    ("cert", "key", "ca", "expected"),
    [
        (
            True,
            False,
            False,
            "a certificate is configured but no key; set FHIRBRIDGE_TLS_KEY_FILE or --tls-key",
        ),
        (False, True, False, "a key is configured but no certificate"),
        (False, False, True, "a client CA (mutual TLS needs TLS) is configured but no certificate"),
    ],
)
def test_half_a_configuration_is_refused(pki: Pki, cert: bool, key: bool, ca: bool, expected: str) -> None:
    settings = TlsSettings(
        pki.server.cert_file if cert else None,
        pki.server.key_file if key else None,
        pki.ca_file if ca else None,
    )
    assert settings.enabled
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        server_context(settings)


# -- settings and options -----------------------------------------------------------------------------


def test_settings_read_both_listeners_tls_from_the_environment() -> None:
    s = Settings.from_env(
        {
            "FHIRBRIDGE_TLS_CERT_FILE": "/etc/fb/http.pem",
            "FHIRBRIDGE_TLS_KEY_FILE": "/etc/fb/http.key",
            "FHIRBRIDGE_MLLP_TLS_CERT_FILE": "/etc/fb/mllp.pem",
            "FHIRBRIDGE_MLLP_TLS_KEY_FILE": "/etc/fb/mllp.key",
            "FHIRBRIDGE_MLLP_TLS_CLIENT_CA_FILE": "/etc/fb/engines-ca.pem",
        }
    )
    assert s.http.tls == TlsSettings(Path("/etc/fb/http.pem"), Path("/etc/fb/http.key"), None)
    assert s.mllp.tls == TlsSettings(
        Path("/etc/fb/mllp.pem"), Path("/etc/fb/mllp.key"), Path("/etc/fb/engines-ca.pem")
    )
    assert not Settings.from_env({"FHIRBRIDGE_TLS_CERT_FILE": " "}).http.tls.enabled
    assert not Settings.from_env({}).mllp.tls.enabled
    cli = s.http.tls.with_paths(Path("other.pem"), None, Path("ca.pem"))
    assert cli == TlsSettings(Path("other.pem"), Path("/etc/fb/http.key"), Path("ca.pem"))


@pytest.mark.parametrize("command", [["serve"], ["mllp", "--port", "2575", "--source", "st-mary"]])
def test_serve_and_mllp_bind_loopback_by_default_and_take_tls_paths(command: list[str]) -> None:
    from bridge.cli import build_parser

    args = build_parser().parse_args(command)
    host = args.host or Settings.from_env({}).http.host
    assert host == "127.0.0.1"
    assert (args.tls_cert, args.tls_key, args.tls_client_ca) == (None, None, None)
    args = build_parser().parse_args(
        [*command, "--tls-cert", "c.pem", "--tls-key", "k.pem", "--tls-client-ca", "ca.pem"]
    )
    assert (args.tls_cert, args.tls_key, args.tls_client_ca) == (Path("c.pem"), Path("k.pem"), Path("ca.pem"))


# -- the plaintext-bind warning -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("", False),
        ("10.0.0.5", False),
        ("fhir.example.org", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_plaintext_on_a_reachable_address_is_a_warning(events: Any) -> None:
    assert warn_if_plaintext("http.plaintext_bind", "0.0.0.0", 8080, tls=False)
    assert not warn_if_plaintext("http.plaintext_bind", "0.0.0.0", 8080, tls=True)
    assert not warn_if_plaintext("mllp.plaintext_bind", "127.0.0.1", 2575, tls=False)
    (event,) = [e for e in events() if e["event"].endswith("plaintext_bind")]
    assert event["event"] == "http.plaintext_bind" and event["level"] == "warning"
    assert (event["host"], event["port"]) == ("0.0.0.0", 8080)


def test_serve_run_passes_the_context_to_aiohttp_and_warns_about_plaintext(
    tmp_path: Path, pki: Pki, events: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dataclasses import replace

    from aiohttp import web

    from bridge.service import app as service_app

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(web, "run_app", lambda app, **kw: calls.append(kw))
    base = Settings.from_env({"FHIRBRIDGE_DATA_DIR": str(tmp_path / "data")})
    service_app.run(
        replace(base, http=replace(base.http, host="0.0.0.0", port=8443, tls=tls(pki, mutual=True)))
    )
    service_app.run(replace(base, http=replace(base.http, host="0.0.0.0", port=8080)))
    with_tls, without = calls
    assert isinstance(with_tls["ssl_context"], ssl.SSLContext)
    assert with_tls["ssl_context"].verify_mode == ssl.CERT_REQUIRED
    assert without["ssl_context"] is None
    logged = [(e["event"], e.get("port"), e.get("url")) for e in events() if e["event"].startswith("http.")]
    assert logged == [
        ("http.start", None, "https://0.0.0.0:8443/"),
        ("http.plaintext_bind", 8080, None),
        ("http.start", None, "http://0.0.0.0:8080/"),
    ]


def test_serve_with_a_mismatched_key_exits_1_with_one_line(
    pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from aiohttp import web

    from bridge.cli import main

    monkeypatch.setattr(web, "run_app", lambda *a, **kw: pytest.fail("the service must not start"))
    monkeypatch.setenv("FHIRBRIDGE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("FHIRBRIDGE_TLS_CERT_FILE", str(pki.server.cert_file))
    assert main(["serve", "--tls-key", str(pki.client.key_file)]) == 1
    err = capsys.readouterr().err
    assert "does not belong to the certificate" in err and "Traceback" not in err


# -- MLLP over TLS --------------------------------------------------------------------------------

SRC = SourceInfo("st-mary")
BAD = b"MSH|^~\\&|EPIC|STM|FB|FB|20240101120000||ADT^A01|T101|P|2.5.1\rPID|1||M1\rpv1|oops\r"


class _DeadLetters:
    """A publisher double that keeps dead letters: enough for the AE path, which needs no broker."""

    def __init__(self) -> None:
        self.dead: list[bytes] = []

    def dead_letter(self, value: bytes, **_: Any) -> Any:
        self.dead.append(value)
        return Future().success(None)

    def close(self, timeout: float = 10) -> None:
        pass


async def _mllp_roundtrip(port: int, client: ssl.SSLContext, message: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client, server_hostname="localhost")
    try:
        writer.write(frame(message))
        await writer.drain()
        return (await asyncio.wait_for(reader.readuntil(END), 30))[1:-2]
    finally:
        writer.close()


async def test_mllp_over_mutual_tls_answers_and_logs_the_client(pki: Pki, events: Any) -> None:
    publisher = _DeadLetters()
    server = MllpServer(HL7v2Adapter(), SRC, lambda: publisher)
    await server.start("127.0.0.1", 0, ssl=server_context(tls(pki, mutual=True)))
    try:
        ack = await _mllp_roundtrip(server.port, pki.client_context(cert=pki.client), BAD)
        with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
            await _mllp_roundtrip(server.port, pki.client_context(), BAD)
    finally:
        await server.close()
    msa = next(line for line in ack.decode().split("\r") if line.startswith("MSA|")).split("|")
    assert msa[1:3] == ["AE", "T101"]
    assert publisher.dead == [BAD] and server.stats["received"] == 1
    (client,) = [e for e in events() if e["event"] == "mllp.client"]
    assert client["client_subject"] == f"CN={CLIENT_CN}" and client["client_san"] == [f"URI:{CLIENT_URI}"]
    assert set(client) <= {"event", "level", "timestamp", "peer", "client_subject", "client_san", "logger"}


async def test_mllp_without_tls_on_every_interface_warns(events: Any) -> None:
    server = MllpServer(HL7v2Adapter(), SRC, _DeadLetters)
    await server.start("0.0.0.0", 0)
    await server.close()
    server = MllpServer(HL7v2Adapter(), SRC, _DeadLetters)
    await server.start("127.0.0.1", 0)
    await server.close()
    warned = [e for e in events() if e["event"] == "mllp.plaintext_bind"]
    assert [(e["host"], e["level"]) for e in warned] == [("0.0.0.0", "warning")]


async def test_mllp_serve_forever_refuses_a_bad_tls_configuration_before_listening(pki: Pki) -> None:
    from bridge.ingest.mllp import serve_forever

    with pytest.raises(ConfigError, match="FHIRBRIDGE_MLLP_TLS_KEY_FILE or --tls-key"):
        await serve_forever(
            "127.0.0.1", 0, HL7v2Adapter(), SRC, tls=TlsSettings(pki.server.cert_file, pki.client.key_file)
        )
