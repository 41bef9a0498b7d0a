"""Producing bundles and dead letters to Kafka.

The producer is idempotent with ``acks=all`` and bounded retries; ``max_request_size`` is raised for
large bundles (a real cluster also needs the topic's ``max.message.bytes``, which
``fhirbridge topics create`` sets). Each bundle is signed with its source organisation's key (see
:mod:`bridge.stream.envelope`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from kafka import KafkaProducer
from kafka.errors import KafkaError

from bridge.config import Settings
from bridge.errors import BrokerUnavailable, ConfigError
from bridge.stream.broker import resolve_bootstrap
from bridge.stream.envelope import Envelope, OrgSigner, utc_now
from bridge.stream.security import client_kwargs, connecting

if TYPE_CHECKING:
    from kafka.producer.future import FutureRecordMetadata

    from adapters.base import Adapter, ConvertedBundle, SourceInfo

# Dead-letter headers added to the original record's headers.
DL_ERROR_CLASS = "fb-dl-error-class"
DL_ERROR_MESSAGE = "fb-dl-error-message"
DL_ERROR_FIELD = "fb-dl-error-field"
DL_LOCATION = "fb-dl-location"
DL_STAGE = "fb-dl-stage"  # ingest | ledger | index | ...
DL_TOPIC = "fb-dl-topic"
DL_PARTITION = "fb-dl-partition"
DL_OFFSET = "fb-dl-offset"
DL_AT = "fb-dl-at"
DL_FILE = "fb-dl-file"


def producer_config(settings: Settings, bootstrap: str, **overrides: Any) -> dict[str, Any]:
    """A producer's kafka-python configuration: :func:`client_kwargs` (TLS, SASL) and the settings below."""
    cfg: dict[str, Any] = {
        **client_kwargs(settings.kafka),
        "bootstrap_servers": bootstrap,
        "client_id": "fhirbridge-producer",
        "acks": "all",
        "enable_idempotence": True,
        "retries": 10,
        "max_in_flight_requests_per_connection": 5,
        "linger_ms": 10,
        "batch_size": 256 * 1024,
        "max_request_size": settings.kafka.max_request_size,
        # FHIR JSON shrinks about 12x; the embedded noida-db rewrites its whole store on every autosave,
        # so stored bytes cost broker CPU for as long as data keeps arriving (docs/streams.md#producer)
        "compression_type": settings.kafka.compression,
        "request_timeout_ms": 30000,
        "max_block_ms": 15000,
    }
    cfg.update(overrides)
    return cfg


def signing_key_path(settings: Settings, org: str) -> Path:
    base = settings.trust.signing_keys_dir or settings.data_dir / "keys"
    return base / f"{org}.key"


class Publisher:
    """Signs and produces converted bundles; also writes dead letters.

    ``publish`` returns kafka-python's future; ``.get(timeout)`` returns once the broker has
    acknowledged the record on all in-sync replicas.
    """

    def __init__(
        self, settings: Settings, bootstrap: str, producer: KafkaProducer | None = None, **overrides: Any
    ) -> None:
        """``overrides`` change :func:`producer_config` (``fhirbridge ingest`` lingers longer than MLLP)."""
        self.settings = settings
        self.topics = settings.kafka.topics
        if producer is None:
            with connecting(settings.kafka, bootstrap):
                producer = KafkaProducer(**producer_config(settings, bootstrap, **overrides))
        self.producer = producer
        self._signers: dict[str, OrgSigner] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> Publisher:
        return cls(settings, resolve_bootstrap(settings))

    def signer(self, org: str) -> OrgSigner:
        signer = self._signers.get(org)
        if signer is None:
            path = signing_key_path(self.settings, org)
            if not path.is_file():
                raise ConfigError(
                    f"no signing key for source org {org!r} at {path}; create one with "
                    f"`fhirbridge keys create --org {org}`"
                )
            signer = OrgSigner.load(path)
            if signer.org != org:
                raise ConfigError(f"signing key {path} belongs to org {signer.org!r}, not {org!r}")
            self._signers[org] = signer
        return signer

    def envelope(
        self,
        converted: ConvertedBundle,
        adapter: Adapter | None,
        source: SourceInfo,
        *,
        producer: tuple[str, str] | None = None,
    ) -> Envelope:
        """The signed envelope of ``converted``; ``producer`` (name, version) names what made the bundle
        when it was not an adapter (the service's own API)."""
        if producer is not None:
            name, version = producer
        elif adapter is not None:
            name, version = adapter.name, adapter.version
        else:
            raise ValueError("a bundle is made by an adapter or a named producer")
        env = Envelope(
            source_org=source.org_id,
            adapter=name,
            adapter_version=version,
            bundle_sha256=converted.sha256,
            produced_at=utc_now(),
            message_id=converted.message_id or "",
        )
        return self.signer(source.org_id).sign(env)

    def publish(
        self,
        converted: ConvertedBundle,
        adapter: Adapter | None,
        source: SourceInfo,
        *,
        producer: tuple[str, str] | None = None,
    ) -> FutureRecordMetadata:
        """Sign and produce ``converted``; ``adapter`` made it, or ``producer`` (name, version) did."""
        env = self.envelope(converted, adapter, source, producer=producer)
        try:
            return self.producer.send(
                self.topics.bundles,
                key=converted.routing_key.encode("utf-8"),
                value=converted.body,
                headers=env.headers(),
            )
        except KafkaError as exc:
            raise BrokerUnavailable(f"cannot produce to {self.topics.bundles}: {exc}") from exc

    def dead_letter(
        self,
        value: bytes | None,
        *,
        key: bytes | None = None,
        headers: list[tuple[str, bytes]] | None = None,
        error: BaseException,
        stage: str,
        origin: tuple[str, int, int] | None = None,
        location: str | None = None,
        file: str | None = None,
    ) -> FutureRecordMetadata:
        return self.producer.send(
            self.topics.deadletter,
            key=key,
            value=value or b"",
            headers=dead_letter_headers(headers, error, stage, origin=origin, location=location, file=file),
        )

    def flush(self, timeout: float | None = None) -> None:
        self.producer.flush(timeout)

    def close(self, timeout: float = 10) -> None:
        self.producer.close(timeout)


def dead_letter_headers(
    headers: list[tuple[str, bytes]] | None,
    error: BaseException,
    stage: str,
    *,
    origin: tuple[str, int, int] | None = None,
    location: str | None = None,
    file: str | None = None,
) -> list[tuple[str, bytes]]:
    """The original headers (minus earlier dead-letter ones), plus why and where it failed."""
    out = [(k, v) for k, v in headers or () if not k.startswith("fb-dl-")]
    add = [
        (DL_ERROR_CLASS, type(error).__name__),
        (DL_ERROR_MESSAGE, str(error)[:4000]),
        (DL_STAGE, stage),
        (DL_AT, utc_now()),
    ]
    field = getattr(error, "field", None)
    if field:
        add.append((DL_ERROR_FIELD, str(field)))
    if origin is not None:
        add += [(DL_TOPIC, origin[0]), (DL_PARTITION, str(origin[1])), (DL_OFFSET, str(origin[2]))]
    if location:
        add.append((DL_LOCATION, location))
    if file:
        add.append((DL_FILE, file))
    return out + [(k, v.encode("utf-8")) for k, v in add]
