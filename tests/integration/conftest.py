"""Real brokers for integration tests.

``kafka_bootstrap`` is parametrised over the local brokers named in ``FHIRBRIDGE_TEST_BROKERS``
(default ``kafka,noida``: a one-node Apache Kafka whose jars Maven resolves, and the embedded noida-db),
so every Kafka test runs on both. With ``KAFKA_BOOTSTRAP_SERVERS`` set, the tests run once against that
cluster instead. Apache Kafka needs Java 17 and Maven: without them its tests are skipped, except when
``CI=true``, where they fail. ``tansu`` can still be named; a test that cannot pass on it because of one
of its documented quirks is marked ``@pytest.mark.broker_quirk("tansu", "<the quirk>")`` and skipped
there; likewise for a stand-in behaviour noida-db lacks (never for Apache Kafka).
The run ends with a count of the tests that passed on each broker.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from bridge.config import Settings, Topics
from bridge.errors import BrokerUnavailable
from bridge.stream.broker import BrokerHandle, start_local
from tests.services.postgres import PostgresServer


def _broker_kinds() -> list[str]:
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        return ["external"]
    kinds = [
        k.strip() for k in os.environ.get("FHIRBRIDGE_TEST_BROKERS", "kafka,noida").split(",") if k.strip()
    ]
    bad = set(kinds) - {"kafka", "noida", "tansu"}
    if bad:
        raise pytest.UsageError(f"FHIRBRIDGE_TEST_BROKERS: unknown broker(s) {sorted(bad)}")
    return kinds


_brokers: dict[str, BrokerHandle] = {}


@pytest.fixture(scope="session", params=_broker_kinds())
def broker(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BrokerHandle]:
    kind = request.param
    if kind == "external":
        yield BrokerHandle(bootstrap=os.environ["KAFKA_BOOTSTRAP_SERVERS"], kind="external")
        return
    handle = _brokers.get(kind)
    if handle is None:
        try:
            handle = start_local(kind, tmp_path_factory.mktemp(f"{kind}-broker"))
        except BrokerUnavailable as exc:
            if kind == "kafka" and os.environ.get("CI") != "true":
                pytest.skip(f"Apache Kafka unavailable here: {exc}")
            raise
        _brokers[kind] = handle
    yield handle


@pytest.fixture
def pg() -> Iterator[PostgresServer]:
    """A PostgreSQL server of the test's own (the failover drills stop and pause processes around it)."""
    server = PostgresServer()
    server.start()
    yield server
    server.destroy()


@pytest.fixture(scope="session", autouse=True)
def _stop_brokers() -> Iterator[None]:
    """Stop the brokers at the very end. Not in ``broker``'s own teardown: pytest tears a parametrised
    session fixture down whenever the order of tests switches its parameter (as it does under
    ``pytest -n``), and the next test of that broker would then get the stopped one from the cache."""
    yield
    while _brokers:
        _brokers.popitem()[1].stop()


@pytest.fixture(autouse=True)
def _skip_quirks(request: pytest.FixtureRequest) -> None:
    if "broker" not in request.fixturenames:
        return
    kind = request.getfixturevalue("broker").kind
    for marker in request.node.iter_markers("broker_quirk"):
        if marker.args[0] == kind:
            pytest.skip(f"{kind} quirk: {marker.args[1]}")


@pytest.fixture
def kafka_bootstrap(broker: BrokerHandle) -> str:
    return broker.bootstrap


@pytest.fixture
def settings(tmp_path: Path, broker: BrokerHandle) -> Settings:
    """Settings with this test's own topics, data directory and the session's broker."""
    suffix = uuid.uuid4().hex[:8]
    base = Settings.from_env({"FHIRBRIDGE_DATA_DIR": str(tmp_path / "data")})
    return replace(
        base,
        kafka=replace(
            base.kafka,
            bootstrap_servers=broker.bootstrap,
            topics=Topics(
                bundles=f"fhir.bundles.{suffix}",
                deadletter=f"fhir.deadletter.{suffix}",
                receipts=f"ledger.receipts.{suffix}",
                mpi=f"mpi.patients.{suffix}",
                partitions=3,
            ),
        ),
    )


def settings_env(settings: Settings) -> dict[str, str]:
    """Environment variables equivalent to ``settings``, for subprocesses."""
    env = dict(os.environ)
    env.update(
        {
            "KAFKA_BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers or "",
            "FHIRBRIDGE_DATA_DIR": str(settings.data_dir),
            "FHIRBRIDGE_TOPIC_BUNDLES": settings.kafka.topics.bundles,
            "FHIRBRIDGE_TOPIC_DEADLETTER": settings.kafka.topics.deadletter,
            "FHIRBRIDGE_TOPIC_RECEIPTS": settings.kafka.topics.receipts,
            "FHIRBRIDGE_TOPIC_MPI": settings.kafka.topics.mpi,
            "FHIRBRIDGE_PARTITIONS": str(settings.kafka.topics.partitions),
            "FHIRBRIDGE_LEDGER_URL": settings.ledger.url,
            "FHIRBRIDGE_INDEX_URL": settings.stores.index_url,
            "FHIRBRIDGE_MPI_URL": settings.stores.mpi_url,
            "FHIRBRIDGE_LOG_FORMAT": "json",
        }
    )
    return env


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"
