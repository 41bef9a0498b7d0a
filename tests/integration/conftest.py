"""Real brokers for integration tests.

``kafka_bootstrap`` is parametrised over the local brokers named in ``FHIRBRIDGE_TEST_BROKERS``
(default ``noida,tansu``), so every Kafka test runs on both. With ``KAFKA_BOOTSTRAP_SERVERS`` set, the
tests run once against that cluster instead. A test that cannot pass on tansu because of one of its
documented quirks is marked ``@pytest.mark.tansu_quirk("<the quirk>")`` and skipped there, by name.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from bridge.config import Settings, Topics
from bridge.stream.broker import BrokerHandle, start_local


def _broker_kinds() -> list[str]:
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        return ["external"]
    kinds = [
        k.strip() for k in os.environ.get("FHIRBRIDGE_TEST_BROKERS", "noida,tansu").split(",") if k.strip()
    ]
    bad = set(kinds) - {"noida", "tansu"}
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
        handle = start_local(kind, tmp_path_factory.mktemp(f"{kind}-broker"))
        _brokers[kind] = handle
        request.addfinalizer(handle.stop)
    yield handle


@pytest.fixture(autouse=True)
def _skip_quirks(request: pytest.FixtureRequest) -> None:
    marker = request.node.get_closest_marker("tansu_quirk")
    if marker is None or "broker" not in request.fixturenames:
        return
    if request.getfixturevalue("broker").kind == "tansu":
        pytest.skip(f"tansu quirk: {marker.args[0]}")


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
