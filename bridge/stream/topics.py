"""Topic administration: create the bridge's topics with their final partition counts and configs."""

from __future__ import annotations

from dataclasses import dataclass

from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError

from bridge.config import KafkaSettings, Topics
from bridge.logging import get_logger
from bridge.stream.security import client_kwargs, connecting

log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class TopicSpec:
    name: str
    partitions: int
    replication: int
    configs: dict[str, str]


def topic_specs(topics: Topics) -> list[TopicSpec]:
    # With 3 or more replicas an acks=all write needs 2 of them in sync: one broker lost (kill -9, a
    # rolling restart) keeps the topic writable and every acknowledged record on two disks.
    durable = {"min.insync.replicas": "2"} if topics.replication >= 3 else {}
    common = {
        "max.message.bytes": str(topics.max_message_bytes),
        "retention.ms": str(topics.retention_ms),
        **durable,
    }
    return [
        TopicSpec(topics.bundles, topics.partitions, topics.replication, common),
        TopicSpec(topics.deadletter, 1, topics.replication, common),
        TopicSpec(
            topics.receipts,
            topics.partitions,
            topics.replication,
            {"retention.ms": str(topics.retention_ms), **durable},
        ),
        # the Patient versions the index keeps, keyed by org and Patient id (docs/mpi.md); as many
        # partitions as the bundles so a linker split by key later has room
        TopicSpec(topics.mpi, topics.partitions, topics.replication, common),
    ]


def ensure_topics(bootstrap: str, topics: Topics, kafka: KafkaSettings | None = None) -> list[str]:
    """Create any missing topic; returns the names created. Existing topics are left as they are.

    ``kafka`` says how to connect (its security settings, docs/streams.md#secured-connections); without
    it, plain text. A broker that cannot be reached or refuses the client is a ``BrokerConnectFailed``."""
    kafka = kafka or KafkaSettings()
    with connecting(kafka, bootstrap):
        admin = KafkaAdminClient(
            **client_kwargs(kafka),
            bootstrap_servers=bootstrap,
            client_id="fhirbridge-admin",
            request_timeout_ms=15000,
        )
    created: list[str] = []
    try:
        with connecting(kafka, bootstrap):
            existing = set(admin.list_topics())
        for spec in topic_specs(topics):
            if spec.name in existing:
                continue
            new = NewTopic(spec.name, spec.partitions, spec.replication, topic_configs=spec.configs)
            try:
                admin.create_topics([new], timeout_ms=15000)
            except TopicAlreadyExistsError:
                continue
            created.append(spec.name)
            log.info("topic.created", topic=spec.name, partitions=spec.partitions)
    finally:
        admin.close()
    return created
