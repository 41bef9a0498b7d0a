"""Transport security end to end: ``fhirbridge serve`` over HTTPS and ``fhirbridge mllp`` over TLS, as
processes started with the ``--tls-*`` options, and the MLLP listener over mutual TLS against a real
broker (an AA only once the broker has the bundle).

Certificates come from a throw-away CA made in each test (tests/support/pki.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from adapters.hl7v2 import HL7v2Adapter
from bridge.cli import main
from bridge.config import Settings, TlsSettings
from bridge.ingest.mllp import END, MllpServer, frame
from bridge.stream.producer import Publisher
from bridge.tls import server_context
from tests.support.pki import CLIENT_CN, CLIENT_URI, Pki

from .conftest import settings_env
from .test_mllp import MSG, SRC, records

pytestmark = pytest.mark.integration


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki.create(tmp_path / "pki")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_listening(proc: subprocess.Popen[bytes], port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if proc.poll() is not None:
                err = proc.stderr.read().decode() if proc.stderr else ""
                pytest.fail(f"the process exited with {proc.returncode}: {err}")
            assert time.monotonic() < deadline, "the listener did not start"
            time.sleep(0.2)


@pytest.fixture
def process(tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test starts; each is stopped by its own handle (its PID) at the end."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def _events(stderr: bytes) -> list[dict[str, object]]:
    return [json.loads(line) for line in stderr.decode().splitlines() if line.startswith("{")]


def _stop(proc: subprocess.Popen[bytes]) -> bytes:
    proc.terminate()
    _out, err = proc.communicate(timeout=20)
    return err


def _get(url: str, context: ssl.SSLContext) -> tuple[int, dict[str, object]]:
    with urllib.request.urlopen(url, context=context, timeout=30) as answer:
        return answer.status, json.loads(answer.read())


# -- fhirbridge serve over HTTPS ----------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mutual-tls"])
def test_serve_over_https(
    pki: Pki, tmp_path: Path, process: list[subprocess.Popen[bytes]], mutual: bool
) -> None:
    port = _free_port()
    env = dict(os.environ, FHIRBRIDGE_DATA_DIR=str(tmp_path / "data"), FHIRBRIDGE_LOG_FORMAT="json")
    command = [sys.executable, "-m", "bridge.cli", "serve", "--port", str(port)]
    command += ["--tls-cert", str(pki.server.cert_file), "--tls-key", str(pki.server.key_file)]
    if mutual:
        command += ["--tls-client-ca", str(pki.ca_file)]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    process.append(proc)
    _wait_listening(proc, port)
    url = f"https://127.0.0.1:{port}/metadata"

    status, body = _get(url, pki.client_context(cert=pki.client))
    assert status == 200 and body["resourceType"] == "CapabilityStatement"
    assert str(body["implementation"]["url"]).startswith(f"https://127.0.0.1:{port}")  # type: ignore[index]

    without_cert = pki.client_context()
    if mutual:
        with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
            _get(url, without_cert)
    else:
        assert _get(url, without_cert)[0] == 200

    old = pki.client_context(cert=pki.client)
    old.minimum_version = ssl.TLSVersion.TLSv1
    old.maximum_version = ssl.TLSVersion.TLSv1_1
    old.set_ciphers("DEFAULT:@SECLEVEL=0")
    with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
        _get(url, old)

    with pytest.raises((urllib.error.URLError, ConnectionError)):  # plain HTTP is not answered
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metadata", timeout=10) as answer:
            pytest.fail(f"plain HTTP was answered: {answer.status}")

    other_ca = Pki(tmp_path / "other", ca_cn="another CA")
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        _get(url, other_ca.client_context())  # a client that does not trust our CA refuses the server

    events = _events(_stop(proc))
    (start,) = [e for e in events if e["event"] == "http.start"]
    assert start["url"] == f"https://127.0.0.1:{port}/" and start["mutual_tls"] is mutual
    assert not [e for e in events if e["event"] == "http.plaintext_bind"]


def test_serve_refuses_to_start_with_a_key_of_another_certificate(pki: Pki, tmp_path: Path) -> None:
    env = dict(
        os.environ,
        FHIRBRIDGE_DATA_DIR=str(tmp_path / "data"),
        FHIRBRIDGE_TLS_CERT_FILE=str(pki.server.cert_file),
        FHIRBRIDGE_TLS_KEY_FILE=str(pki.client.key_file),
    )
    done = subprocess.run(
        [sys.executable, "-m", "bridge.cli", "serve", "--port", str(_free_port())],
        env=env,
        capture_output=True,
        timeout=60,
    )
    err = done.stderr.decode()
    assert done.returncode == 1
    assert f"fhirbridge: error: TLS key {pki.client.key_file} (FHIRBRIDGE_TLS_KEY_FILE or --tls-key)" in err
    assert "does not belong to the certificate" in err and "Traceback" not in err


# -- MLLP over TLS, with a broker ---------------------------------------------------------------------


def _send_over_tls(port: int, context: ssl.SSLContext, message: bytes) -> str:
    """Frame ``message`` over an ssl-wrapped socket; the ACK's MSA segment."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(frame(message))
            data = b""
            while not data.endswith(END):
                chunk = tls.recv(65536)
                assert chunk, f"connection closed before the ACK: {data!r}"
                data += chunk
    return next(line for line in data[1:-2].decode().split("\r") if line.startswith("MSA|"))


@pytest.fixture
def ready(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The test's settings with a signing key for st-mary and the topics created."""
    for k, v in settings_env(settings).items():
        monkeypatch.setenv(k, v)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    assert main(["keys", "create", "--org", "st-mary"]) == 0
    assert main(["topics", "create"]) == 0
    return settings


async def test_mllp_over_mutual_tls_gets_aa_once_the_broker_has_the_bundle(ready: Settings, pki: Pki) -> None:
    server = MllpServer(
        HL7v2Adapter(), SRC, lambda: Publisher(ready, ready.kafka.bootstrap_servers or ""), ack_timeout=30
    )
    tls = TlsSettings(pki.server.cert_file, pki.server.key_file, pki.ca_file)
    await server.start("127.0.0.1", 0, ssl=server_context(tls, env_prefix="FHIRBRIDGE_MLLP_TLS"))
    try:
        msa = await asyncio.to_thread(_send_over_tls, server.port, pki.client_context(cert=pki.client), MSG)
        with pytest.raises((ssl.SSLError, ConnectionError, AssertionError)):
            await asyncio.to_thread(_send_over_tls, server.port, pki.client_context(), MSG)
    finally:
        await server.close()
    assert msa.split("|")[1:3] == ["AA", "CTRL-1"]
    assert server.stats["received"] == 1  # the client without a certificate never reached the listener
    assert [r.key for r in records(ready, 1)] == [b"urn:fhirbridge:st-mary:mrn|MRN-77"]


def test_cli_mllp_over_tls(ready: Settings, pki: Pki, process: list[subprocess.Popen[bytes]]) -> None:
    """`fhirbridge mllp --tls-cert … --tls-key … --tls-client-ca …` as a process: AA over TLS, and the
    client it served named in the log by its certificate's subject."""
    port = _free_port()
    env = settings_env(ready)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bridge.cli",
            "mllp",
            "--port",
            str(port),
            "--source",
            "st-mary",
            "--tls-cert",
            str(pki.server.cert_file),
            "--tls-key",
            str(pki.server.key_file),
            "--tls-client-ca",
            str(pki.ca_file),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    process.append(proc)
    _wait_listening(proc, port)
    msa = _send_over_tls(port, pki.client_context(cert=pki.client), MSG.replace(b"CTRL-1", b"TLS-1"))
    assert msa.split("|")[1:3] == ["AA", "TLS-1"]
    events = _events(_stop(proc))
    (listening,) = [e for e in events if e["event"] == "mllp.listening"]
    assert listening["tls"] is True and listening["mutual_tls"] is True
    clients = [e for e in events if e["event"] == "mllp.client"]
    assert clients and all(c["client_subject"] == f"CN={CLIENT_CN}" for c in clients)
    assert clients[-1]["client_san"] == [f"URI:{CLIENT_URI}"]
    assert not [e for e in events if e["event"] == "mllp.plaintext_bind"]
    assert [r.key for r in records(ready, 1)] == [b"urn:fhirbridge:st-mary:mrn|MRN-77"]
