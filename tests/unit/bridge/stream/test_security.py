"""bridge.stream.security: the settings become kafka-python's keyword arguments, every client the bridge
makes gets them, and a refused connection is one clear line without a secret."""

from __future__ import annotations

import ast
import time
from dataclasses import replace
from pathlib import Path

import pytest
from kafka import KafkaAdminClient
from kafka.errors import (
    KafkaConnectionError,
    KafkaTimeoutError,
    SaslAuthenticationFailedError,
    TopicAuthorizationFailedError,
)

from bridge.config import KafkaSecurity, KafkaSettings, Settings
from bridge.consumers.runtime import consumer_config
from bridge.errors import BrokerUnavailable
from bridge.stream.producer import producer_config
from bridge.stream.security import (
    BrokerConnectFailed,
    FileTokenProvider,
    client_kwargs,
    connecting,
    failure_message,
)

ROOT = Path(__file__).resolve().parents[4]
CLIENTS = {"KafkaProducer", "KafkaConsumer", "KafkaAdminClient"}
#: the functions whose result may be spread into a client: client_kwargs, or a config built on it
THROUGH = {"client_kwargs", "producer_config", "consumer_config"}
#: the local-broker readiness probe, which takes the keyword arguments as a parameter (plain text by default)
ALLOWED = {("bridge/stream/broker.py", "wait_ready")}

SCRAM = KafkaSecurity(
    protocol="SASL_SSL",
    ssl_cafile=Path("/ca.pem"),
    sasl_mechanism="SCRAM-SHA-512",
    sasl_username="alice",
    sasl_password="s3cret",
)


def test_plain_text_gives_only_the_protocol_and_the_timeout() -> None:
    assert client_kwargs(KafkaSettings()) == {"security_protocol": "PLAINTEXT", "bootstrap_timeout_ms": 15000}


def test_sasl_ssl_scram() -> None:
    kw = client_kwargs(KafkaSettings(security=SCRAM, bootstrap_timeout_ms=5000))
    assert kw == {
        "security_protocol": "SASL_SSL",
        "bootstrap_timeout_ms": 5000,
        "ssl_check_hostname": True,
        "ssl_cafile": "/ca.pem",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "alice",
        "sasl_plain_password": "s3cret",
    }


def test_mutual_tls() -> None:
    sec = KafkaSecurity(
        protocol="SSL",
        ssl_cafile=Path("/ca.pem"),
        ssl_certfile=Path("/c.pem"),
        ssl_keyfile=Path("/c.key"),
        ssl_key_password="kp",
        ssl_crlfile=Path("/crl.pem"),
        ssl_check_hostname=False,
    )
    kw = client_kwargs(KafkaSettings(security=sec))
    assert kw["ssl_certfile"] == "/c.pem" and kw["ssl_keyfile"] == "/c.key" and kw["ssl_password"] == "kp"
    assert kw["ssl_crlfile"] == "/crl.pem" and kw["ssl_check_hostname"] is False
    assert "sasl_mechanism" not in kw


def test_oauthbearer_reads_the_token_file_for_each_authentication(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("first\n")
    sec = KafkaSecurity(protocol="SASL_SSL", sasl_mechanism="OAUTHBEARER", sasl_oauth_token_file=token)
    provider = client_kwargs(KafkaSettings(security=sec))["sasl_oauth_token_provider"]
    assert isinstance(provider, FileTokenProvider) and provider.token() == "first"
    token.write_text("second")
    assert provider.token() == "second"
    token.unlink()
    with pytest.raises(BrokerConnectFailed, match="cannot read the OAUTHBEARER token file"):
        provider.token()


def test_producer_and_consumer_configs_carry_the_security_settings() -> None:
    base = Settings.from_env({"FHIRBRIDGE_CONSUMER_STATIC_MEMBERSHIP": "on"})
    settings = replace(base, kafka=replace(base.kafka, security=SCRAM))
    expected = client_kwargs(settings.kafka)
    for cfg in (producer_config(settings, "h:1"), consumer_config(settings, "h:1", "g")):
        assert {k: cfg[k] for k in expected} == expected


def _spread_through(call: ast.Call) -> bool:
    for kw in call.keywords:
        if kw.arg is None and isinstance(kw.value, ast.Call):
            func = kw.value.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
            if name in THROUGH:
                return True
    return False


def test_every_kafka_client_in_bridge_gets_the_security_settings() -> None:
    """An AST scan of bridge/: each KafkaProducer(, KafkaConsumer( and KafkaAdminClient( call spreads
    ``**client_kwargs(...)``, ``**producer_config(...)`` or ``**consumer_config(...)`` (which include it).
    A new client made any other way would connect in plain text to a secured cluster."""
    offenders: list[str] = []
    found = 0
    for path in sorted((ROOT / "bridge").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        tree = ast.parse(path.read_text(encoding="utf-8"))
        enclosing: dict[ast.AST, str] = {}  # each node -> the name of the function it is in
        for func in ast.walk(tree):
            if isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
                for inner in ast.walk(func):
                    enclosing.setdefault(inner, func.name)  # the outermost function wins
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            callee = node.func
            name = callee.id if isinstance(callee, ast.Name) else getattr(callee, "attr", None)
            if name not in CLIENTS:
                continue
            found += 1
            where = enclosing.get(node, "<module>")
            if (rel, where) in ALLOWED or _spread_through(node):
                continue
            offenders.append(f"{rel}:{node.lineno} {name}( in {where}")
    assert found >= 7, "the scan found fewer client creation sites than the bridge has"
    assert not offenders, "Kafka clients made without bridge.stream.security.client_kwargs: " + ", ".join(
        offenders
    )


def test_failure_messages() -> None:
    kafka = KafkaSettings(security=SCRAM, bootstrap_timeout_ms=5000)
    timeout = KafkaTimeoutError("Unable to bootstrap from h:1")
    auth = SaslAuthenticationFailedError(
        "SaslAuthenticationFailedError: Authentication failed during authentication due to invalid "
        "credentials with SASL mechanism SCRAM-SHA-512"
    )
    msg = failure_message(kafka, "h:1", timeout, [KafkaConnectionError("socket disconnected"), auth])
    assert msg == (
        "Kafka at h:1 (SASL_SSL, SCRAM-SHA-512 as 'alice'): authentication failed: Authentication failed "
        "during authentication due to invalid credentials with SASL mechanism SCRAM-SHA-512"
    )
    tls = KafkaConnectionError(
        "Handshake failed: [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: unable to get "
        "local issuer certificate (_ssl.c:1000)"
    )
    assert failure_message(kafka, "h:1", timeout, [tls]).endswith(
        ": TLS handshake failed: [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: unable to "
        "get local issuer certificate"
    )
    lost = failure_message(kafka, "h:1", timeout, [KafkaConnectionError("socket disconnected")])
    assert lost == (
        "Kafka at h:1 (SASL_SSL, SCRAM-SHA-512 as 'alice'): authentication failed: the broker closed the "
        "connection during SASL SCRAM-SHA-512 (a wrong user name or password, or a listener without SASL)"
    )
    closed = failure_message(KafkaSettings(), "h:1", timeout, [KafkaConnectionError("socket disconnected")])
    assert closed.startswith("Kafka at h:1 (PLAINTEXT): no broker answered within 15 s: the broker closed")
    refused = failure_message(KafkaSettings(), "h:1", timeout, [KafkaConnectionError("111 ECONNREFUSED")])
    assert refused == "Kafka at h:1 (PLAINTEXT): no broker answered within 15 s (111 ECONNREFUSED)"
    denied = failure_message(kafka, "h:1", TopicAuthorizationFailedError("t"), [])
    assert ": not authorized: " in denied
    assert all("s3cret" not in m for m in (msg, closed, refused, denied))
    token = failure_message(
        kafka, "h:1", timeout, [BrokerConnectFailed("the OAUTHBEARER token file /t is empty")]
    )
    assert token.endswith("'alice'): the OAUTHBEARER token file /t is empty")


def test_connecting_to_a_closed_port_fails_fast_with_one_line() -> None:
    kafka = KafkaSettings(bootstrap_timeout_ms=500)
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable) as caught, connecting(kafka, "127.0.0.1:1"):
        KafkaAdminClient(**client_kwargs(kafka), bootstrap_servers="127.0.0.1:1")
    assert time.monotonic() - started < 10
    assert isinstance(caught.value, BrokerConnectFailed)
    message = str(caught.value)
    assert message.startswith("Kafka at 127.0.0.1:1 (PLAINTEXT): no broker answered within 0.5 s")
    assert "\n" not in message


def test_kafka_records_are_held_back_only_while_connecting() -> None:
    import logging

    kafka_log = logging.getLogger("kafka")
    assert kafka_log.propagate
    with pytest.raises(BrokerConnectFailed), connecting(KafkaSettings(), "h:1"):
        assert not kafka_log.propagate
        logging.getLogger("kafka.net.manager").warning("failed: %s", ConnectionRefusedError(111, "refused"))
        raise KafkaTimeoutError("Unable to bootstrap from h:1")
    assert kafka_log.propagate
    assert not [h for h in kafka_log.handlers if type(h).__name__ == "_Causes"]
