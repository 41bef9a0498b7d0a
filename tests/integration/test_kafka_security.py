"""Secured Kafka connections end to end, on a real Apache Kafka (docs/streams.md#secured-connections).

One KRaft node with three listeners: ``INTERNAL`` (plain text, between the node's own parts, and what
the launcher probes), ``SECURE`` (SASL_SSL with SCRAM-SHA-512; the user is made at format time) and
``MTLS`` (SSL that requires a client certificate). The certificates come from a CA the test makes
(tests/support/pki.py). Each scenario runs the CLI as subprocesses configured only by environment
variables, secrets in ``*_FILE`` variables: ``topics create``, ``ingest``, ``ledger run`` and
``index run`` (both catch up), ``replay``. Then clients without credentials, with a wrong password
or without a client certificate are refused: exit 1, one clear line, no traceback, well within 30 s.

Needs Java 17 and Maven (bridge/stream/kafka.py): skipped without them, except when ``CI=true``.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bridge.config import Settings
from bridge.errors import BrokerUnavailable
from bridge.stores.index.store import IndexStore
from bridge.stores.ledger import open_configured_ledger
from bridge.stream.envelope import create_org_key
from bridge.stream.producer import signing_key_path
from ledger.note import generate_key
from tests.support.pki import Pki

pytestmark = pytest.mark.integration

P = "FHIRBRIDGE_KAFKA_"
MESSAGES = [
    b"MSH|^~\\&|EPIC|STM|FB|FB|20240101120000||ADT^A01^ADT_A01|SEC-1|P|2.5.1\r"
    b"PID|1||MRN-71^^^^MR||DOE^JANE||19800101|F\r",
    b"MSH|^~\\&|EPIC|STM|FB|FB|20240101130000||ADT^A01^ADT_A01|SEC-2|P|2.5.1\r"
    b"PID|1||MRN-72^^^^MR||ROE^RICHARD||19700202|M\r",
    b"MSH|^~\\&|EPIC|STM|FB|FB|20240101140000||ADT^A08^ADT_A01|SEC-3|P|2.5.1\r"
    b"PID|1||MRN-71^^^^MR||DOE^JANE||19800101|F\r",
]
REFUSED_WITHIN = 30.0


@dataclass
class Secured:
    secure: str  # SASL_SSL, SCRAM-SHA-512
    mtls: str  # SSL with a required client certificate
    pki: Pki
    password_file: Path
    directory: Path


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    from bridge.stream.kafka import start_cluster

    directory = tmp_path_factory.mktemp("secured-kafka")
    pki = Pki.create(directory / "pki")
    keystore = directory / "pki" / "server-keystore.pem"  # Kafka's PEM keystore: the key, then the chain
    keystore.write_bytes(pki.server.key_file.read_bytes() + pki.server.cert_file.read_bytes())
    password = secrets.token_urlsafe(18)
    password_file = directory / "alice.password"
    password_file.write_text(password + "\n")
    password_file.chmod(0o600)
    properties = {
        "ssl.keystore.type": "PEM",
        "ssl.keystore.location": str(keystore),
        "ssl.truststore.type": "PEM",
        "ssl.truststore.location": str(pki.ca_file),
        "sasl.enabled.mechanisms": "SCRAM-SHA-512",
        "listener.name.secure.scram-sha-512.sasl.jaas.config": (
            "org.apache.kafka.common.security.scram.ScramLoginModule required;"
        ),
        "listener.name.mtls.ssl.client.auth": "required",
    }
    try:
        cluster = start_cluster(
            directory / "kafka",
            1,
            listeners={"INTERNAL": "PLAINTEXT", "SECURE": "SASL_SSL", "MTLS": "SSL"},
            properties=properties,
            format_args=["--add-scram", f"SCRAM-SHA-512=[name=alice,password={password}]"],
        )
    except BrokerUnavailable as exc:
        if os.environ.get("CI") != "true":
            pytest.skip(f"Apache Kafka unavailable here: {exc}")
        log = directory / "kafka" / "node-1" / "broker.log"
        tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
        raise BrokerUnavailable(f"{exc}\n{tail}") from exc
    try:
        yield Secured(
            cluster.bootstrap_for("SECURE"), cluster.bootstrap_for("MTLS"), pki, password_file, directory
        )
    finally:
        cluster.stop()


def _base_env(data_dir: Path, bootstrap: str) -> dict[str, str]:
    """The CLI's environment: this test's broker, topics and data directory, and no Kafka setting of ours."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(P) and k != "KAFKA_BOOTSTRAP_SERVERS"}
    suffix = uuid.uuid4().hex[:8]
    env.update(
        {
            "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
            "FHIRBRIDGE_DATA_DIR": str(data_dir),
            "FHIRBRIDGE_TOPIC_BUNDLES": f"fhir.bundles.{suffix}",
            "FHIRBRIDGE_TOPIC_DEADLETTER": f"fhir.deadletter.{suffix}",
            "FHIRBRIDGE_TOPIC_RECEIPTS": f"ledger.receipts.{suffix}",
            "FHIRBRIDGE_PARTITIONS": "2",
            "FHIRBRIDGE_LOG_FORMAT": "json",
            "FHIRBRIDGE_LOG_LEVEL": "warning",
        }
    )
    return env


def _scram(s: Secured, data_dir: Path) -> dict[str, str]:
    return {
        **_base_env(data_dir, s.secure),
        f"{P}SECURITY_PROTOCOL": "SASL_SSL",
        f"{P}SSL_CAFILE": str(s.pki.ca_file),
        f"{P}SASL_MECHANISM": "SCRAM-SHA-512",
        f"{P}SASL_USERNAME": "alice",
        f"{P}SASL_PASSWORD_FILE": str(s.password_file),
    }


def _mtls(s: Secured, data_dir: Path) -> dict[str, str]:
    return {
        **_base_env(data_dir, s.mtls),
        f"{P}SECURITY_PROTOCOL": "SSL",
        f"{P}SSL_CAFILE": str(s.pki.ca_file),
        f"{P}SSL_CERTFILE": str(s.pki.client.cert_file),
        f"{P}SSL_KEYFILE": str(s.pki.client.key_file),
    }


def _keys(settings: Settings) -> None:
    """The ledger's signing key and st-mary's (what `fhirbridge keys create` writes), without a subprocess."""
    skey, _ = generate_key(settings.ledger.origin)
    assert settings.ledger.key_file is not None
    settings.ledger.key_file.write_text(skey)
    registry = settings.trust.registry_file or settings.data_dir / "trust.json"
    create_org_key(signing_key_path(settings, "st-mary"), registry, "st-mary")


def _cli(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bridge.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def _consumer(env: dict[str, str], kind: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "bridge.cli", kind, "run", "--exit-when-idle", "5"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize("scenario", ["sasl_ssl_scram", "mutual_tls"])
def test_the_pipeline_runs_over_a_secured_listener(secured: Secured, tmp_path: Path, scenario: str) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    env = (_scram if scenario == "sasl_ssl_scram" else _mtls)(secured, data_dir)
    settings = Settings.from_env(env)
    _keys(settings)

    topics = _cli(env, "topics", "create")
    assert topics.returncode == 0, topics.stderr
    created = {line.split("\t")[0] for line in topics.stdout.splitlines() if "\tcreated\t" in line}
    names = ("FHIRBRIDGE_TOPIC_BUNDLES", "FHIRBRIDGE_TOPIC_DEADLETTER", "FHIRBRIDGE_TOPIC_RECEIPTS")
    assert {env[n] for n in names} <= created, topics.stdout
    feed = tmp_path / "feed.hl7"
    feed.write_bytes(b"\n".join(MESSAGES))
    ingest = _cli(env, "ingest", "--adapter", "hl7v2", "--source", "st-mary", "--no-progress", str(feed))
    assert ingest.returncode == 0, ingest.stderr
    assert f"converted {len(MESSAGES)}, published {len(MESSAGES)}" in ingest.stderr, ingest.stderr

    consumers = [_consumer(env, "ledger"), _consumer(env, "index")]
    for proc in consumers:
        _, err = proc.communicate(timeout=90)
        assert proc.returncode == 0, err
        assert "Traceback" not in err
    ledger = open_configured_ledger(settings, signer_key=None)
    index = IndexStore.open(settings.stores.index_url)
    try:
        assert ledger.size() == len(MESSAGES)
        assert index.counts()["bundles"] == len(MESSAGES)
    finally:
        ledger.close()
        index.close()

    replay = _cli(env, "replay", "--sink", "index", "--rebuild")
    assert replay.returncode == 0, replay.stderr
    assert f"processed {len(MESSAGES)}, dead-lettered 0" in replay.stdout, replay.stdout


def _refused(*commands: tuple[dict[str, str], tuple[str, ...]]) -> list[str]:
    """Run commands that must be refused, side by side; returns each one's error line."""
    started = time.monotonic()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "bridge.cli", *args],
            env={**env, f"{P}BOOTSTRAP_TIMEOUT_MS": "2000"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            stdin=subprocess.DEVNULL,
        )
        for env, args in commands
    ]
    lines: list[str] = []
    for proc, (_, args) in zip(procs, commands, strict=True):
        _, err = proc.communicate(timeout=60)
        elapsed = time.monotonic() - started
        assert proc.returncode == 1, (args, proc.returncode, err)
        assert elapsed < REFUSED_WITHIN, f"{args} took {elapsed:.1f}s to fail"
        assert "Traceback" not in err, err
        assert '"logger": "kafka' not in err, err  # kafka-python's retries are not logged
        found = [line for line in err.splitlines() if "error: " in line and "Kafka at" in line]
        assert len(found) == 1, err
        lines.append(found[0])
    return lines


def test_clients_without_credentials_are_refused_with_one_clear_line(
    secured: Secured, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    mtls = _mtls(secured, data_dir)
    no_cert = {k: v for k, v in mtls.items() if k not in (f"{P}SSL_CERTFILE", f"{P}SSL_KEYFILE")}
    no_ca = {k: v for k, v in mtls.items() if k != f"{P}SSL_CAFILE"}
    plain, cert, ca = _refused(
        (_base_env(data_dir, secured.secure), ("topics", "create")),  # plain text to the SASL_SSL listener
        (no_cert, ("index", "run")),  # TLS without a client certificate to the mutual-TLS listener
        (no_ca, ("topics", "create")),  # TLS without the CA: this client refuses the broker's certificate
    )
    assert plain.startswith(f"fhirbridge: error: Kafka at {secured.secure} (PLAINTEXT): no broker answered")
    assert "closed the connection" in plain
    assert cert.startswith(f"fhirbridge: error: Kafka at {secured.mtls} (SSL): TLS handshake failed: "), cert
    assert "TLS handshake failed: " in ca and "certificate verify failed" in ca, ca


def test_a_wrong_password_is_refused_with_one_clear_line(secured: Secured, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    wrong = tmp_path / "wrong.password"
    wrong.write_text("not-the-password\n")
    env = {**_scram(secured, data_dir), f"{P}SASL_PASSWORD_FILE": str(wrong)}
    _keys(Settings.from_env(env))
    feed = tmp_path / "feed.hl7"
    feed.write_bytes(MESSAGES[0])
    # the broker's reason when kafka-python reads it before the connection closes; see failure_message
    expected = (
        f"error: Kafka at {secured.secure} (SASL_SSL, SCRAM-SHA-512 as 'alice'): authentication failed: "
    )
    reasons = (
        "Authentication failed during authentication due to invalid credentials with SASL mechanism SCRAM-SHA-512",
        "the broker closed the connection during SASL SCRAM-SHA-512",
    )
    lines = _refused(
        (env, ("ingest", "--adapter", "hl7v2", "--source", "st-mary", "--no-progress", str(feed))),
        (env, ("ledger", "run")),
        (env, ("replay", "--sink", "index", "--dry-run")),
    )
    for line in lines:
        assert expected in line and line.split(expected, 1)[1].startswith(reasons), line
        assert "not-the-password" not in line
