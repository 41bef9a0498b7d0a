"""How every Kafka client fhirbridge makes connects: TLS, SASL, and a clear failure when it cannot.

:func:`client_kwargs` turns :class:`bridge.config.KafkaSettings` (its ``security`` group and the bootstrap
timeout) into kafka-python's keyword arguments. Every ``KafkaProducer``, ``KafkaConsumer`` and
``KafkaAdminClient`` in ``bridge`` gets them, directly or through ``producer_config`` and
``consumer_config`` (``tests/unit/bridge/stream/test_security.py`` fails on a client made without them).

:func:`connecting` wraps a client's creation. kafka-python reports a refused connection only as
``Unable to bootstrap`` once its bootstrap timeout has passed; the cause (invalid credentials, a TLS
handshake the broker or this client refused, a closed port) is in its log records. ``connecting``
reads them while the client is being made and raises :class:`BrokerConnectFailed` (a
``BrokerUnavailable``) with one line naming the broker, the protocol and mechanism, and what went
wrong, which the CLI prints as it prints every other error. No secret is in it: kafka-python's
messages carry none, and the settings' ``describe`` names only the user.

decision 35 in docs/architecture.md; docs/streams.md#secured-connections.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kafka.errors import (
    AuthorizationError,
    KafkaConnectionError,
    KafkaError,
    SaslAuthenticationFailedError,
    UnsupportedSaslMechanismError,
)
from kafka.net.sasl.oauth import AbstractTokenProvider

from bridge.config import KafkaSecurity, KafkaSettings
from bridge.errors import BrokerUnavailable


class BrokerConnectFailed(BrokerUnavailable):
    """A Kafka client could not connect: no broker answered, TLS failed, or authentication failed."""


class FileTokenProvider(AbstractTokenProvider):  # type: ignore[misc]
    """OAUTHBEARER tokens from a file, read again for every authentication, so that whatever renews the
    token (a sidecar, a cron job) only has to replace the file."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path

    def token(self) -> str:
        try:
            token = self.path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise BrokerConnectFailed(
                f"cannot read the OAUTHBEARER token file {self.path}: {exc.strerror}"
            ) from None
        if not token:
            raise BrokerConnectFailed(f"the OAUTHBEARER token file {self.path} is empty")
        return token


def client_kwargs(kafka: KafkaSettings) -> dict[str, Any]:
    """kafka-python keyword arguments for ``kafka.security`` and ``kafka.bootstrap_timeout_ms``; the same
    for producers, consumers and admin clients. Options that are not set are left out (kafka-python's
    defaults hold)."""
    sec: KafkaSecurity = kafka.security
    out: dict[str, Any] = {
        "security_protocol": sec.protocol,
        "bootstrap_timeout_ms": kafka.bootstrap_timeout_ms,
    }
    if sec.tls:
        out["ssl_check_hostname"] = sec.ssl_check_hostname
        for name, path in (
            ("ssl_cafile", sec.ssl_cafile),
            ("ssl_certfile", sec.ssl_certfile),
            ("ssl_keyfile", sec.ssl_keyfile),
            ("ssl_crlfile", sec.ssl_crlfile),
        ):
            if path is not None:
                out[name] = str(path)
        if sec.ssl_key_password is not None:
            out["ssl_password"] = sec.ssl_key_password
    if sec.sasl_mechanism is not None:
        out["sasl_mechanism"] = sec.sasl_mechanism
        if sec.sasl_mechanism == "OAUTHBEARER":
            assert sec.sasl_oauth_token_file is not None  # checked by Settings.from_env
            out["sasl_oauth_token_provider"] = FileTokenProvider(sec.sasl_oauth_token_file)
        else:
            out["sasl_plain_username"] = sec.sasl_username
            out["sasl_plain_password"] = sec.sasl_password
    return out


class _Causes(logging.Handler):
    """Collects the exceptions kafka-python's log records carry while a client is being made."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.seen: list[BaseException] = []

    def emit(self, record: logging.LogRecord) -> None:
        args = record.args if isinstance(record.args, tuple) else ()
        self.seen.extend(a for a in args if isinstance(a, BaseException))
        if record.exc_info and isinstance(record.exc_info[1], BaseException):
            self.seen.append(record.exc_info[1])


_kafka_log = logging.getLogger("kafka")
_quiet = threading.Lock()
_connecting = 0  # how many `connecting` blocks are open; kafka-python's records do not propagate meanwhile


@contextlib.contextmanager
def connecting(kafka: KafkaSettings, bootstrap: str) -> Iterator[None]:
    """Make a Kafka client in this block: a ``KafkaError`` becomes :class:`BrokerConnectFailed` saying
    which broker, how it was reached, and why it refused (see the module docstring).

    While the block runs, kafka-python's own records of its bootstrap attempts (a warning per retry,
    with tracebacks) are held back from the log: they are the cause that the one line names, or, when
    the client does connect, retries that came to nothing."""
    global _connecting
    causes = _Causes()
    with _quiet:
        _kafka_log.addHandler(causes)
        _connecting += 1
        _kafka_log.propagate = False
    try:
        yield
    except KafkaError as exc:
        raise BrokerConnectFailed(failure_message(kafka, bootstrap, exc, causes.seen)) from None
    finally:
        with _quiet:
            _kafka_log.removeHandler(causes)
            _connecting -= 1
            if _connecting == 0:
                _kafka_log.propagate = True


def failure_message(
    kafka: KafkaSettings, bootstrap: str, exc: BaseException, causes: list[BaseException]
) -> str:
    """One line: ``Kafka at <bootstrap> (<protocol, mechanism>): <what went wrong>``."""
    head = f"Kafka at {bootstrap} ({kafka.security.describe()})"
    seen = [*causes, exc]
    ours = next((c for c in seen if isinstance(c, BrokerConnectFailed)), None)
    if ours is not None:  # the OAUTHBEARER token file could not be read
        return f"{head}: {ours}"
    auth = next((c for c in seen if isinstance(c, SaslAuthenticationFailedError)), None)
    if auth is not None:
        return f"{head}: authentication failed: {_reason(auth)}"
    denied = next((c for c in seen if isinstance(c, AuthorizationError)), None)
    if denied is not None:
        return f"{head}: not authorized: {_reason(denied)}"
    unsupported = next((c for c in seen if isinstance(c, UnsupportedSaslMechanismError)), None)
    if unsupported is not None:
        return f"{head}: authentication failed: {_reason(unsupported)}"
    tls = next((c for c in seen if "SSL" in str(c) or "Handshake failed" in str(c)), None)
    if tls is not None:
        return f"{head}: TLS handshake failed: {_reason(tls)}"
    closed = next((c for c in seen if "disconnected" in str(c)), None)
    mechanism = kafka.security.sasl_mechanism
    if closed is not None and mechanism is not None:
        # kafka-python drops a response that arrives with the connection's end, as the broker's answer
        # to a failed authentication does: the reason is then often lost, the close is not
        return (
            f"{head}: authentication failed: the broker closed the connection during SASL {mechanism} "
            f"(a wrong user name or password, or a listener without SASL)"
        )
    seconds = kafka.bootstrap_timeout_ms / 1000
    if closed is not None:
        return (
            f"{head}: no broker answered within {seconds:g} s: the broker closed the connection "
            f"(does the listener expect another security protocol or credentials?)"
        )
    refused = next((c for c in seen if isinstance(c, KafkaConnectionError | OSError)), None)
    why = f" ({_reason(refused)})" if refused is not None else ""
    return f"{head}: no broker answered within {seconds:g} s{why}"


def _reason(exc: BaseException) -> str:
    """The exception's text on one line, without kafka-python's repeated class-name prefixes."""
    text = " ".join(str(exc).split())
    text = re.sub(r"^(\[Error \d+\] )?(\w+Error: )+", "", text)
    text = re.sub(r"^Handshake failed: ", "", text)
    text = re.sub(r" \(_ssl\.c:\d+\)", "", text)
    return text[:300] or type(exc).__name__
