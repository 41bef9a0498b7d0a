"""FHIRBRIDGE_MPI_LINKER=topic without a broker: the index sink publishes exactly the Patient versions it
would have given the MPI, and the MPI sink links them into the same persons, idempotently, as the only
writer (docs/mpi.md, "The linker as its own process")."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import Any

import orjson
import pytest

from bridge.consumers.checks import EnvelopeChecker
from bridge.consumers.index_sink import IndexSink
from bridge.consumers.mpi_sink import MpiSink, build_mpi_sink, read_patient_message
from bridge.consumers.runtime import Record
from bridge.errors import TransientError
from bridge.stores.index.store import IndexStore
from bridge.stores.leader import LeaderLock, LeadershipLost
from bridge.stores.mpi import PersonIndex
from bridge.stores.mpi.config import MpiWriterFenced
from bridge.stream.envelope import Envelope, OrgSigner, TrustedKey, TrustRegistry, utc_now


def _patient_bundle(pid: str, city: str, timestamp: str, family: str = "DOE") -> bytes:
    patient = {
        "resourceType": "Patient",
        "id": pid,
        "name": [{"family": family, "given": ["Jan"]}],
        "gender": "female",
        "birthDate": "1970-02-03",
        "address": [{"city": city, "postalCode": "12345"}],
    }
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "timestamp": timestamp,
        "entry": [{"resource": patient}],
    }
    return orjson.dumps(bundle, option=orjson.OPT_SORT_KEYS)


def _record(signer: OrgSigner, offset: int, value: bytes) -> Record:
    env = signer.sign(
        Envelope("st-mary", "hl7v2", "1", hashlib.sha256(value).hexdigest(), utc_now(), f"m{offset}")
    )
    return Record("fhir.bundles", 0, offset, 1_767_225_600_000 + offset, b"st-mary|mrn", value, env.headers())


def _checker() -> tuple[OrgSigner, EnvelopeChecker]:
    signer = OrgSigner.generate("st-mary")
    trust = TrustRegistry()
    trust.add("st-mary", TrustedKey(signer.key_id, signer.public_bytes, "2020-01-01T00:00:00Z", None))
    return signer, EnvelopeChecker(trust)


class _Future:
    def get(self, timeout: float | None = None) -> None:
        return None


class _Producer:
    """Records what the index sink sends; ``fail`` makes the broker refuse."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, bytes]] = []
        self.flushed = 0
        self.fail = False

    def send(self, topic: str, key: bytes, value: bytes) -> _Future:
        if self.fail:
            from kafka.errors import KafkaTimeoutError

            raise KafkaTimeoutError("no broker")
        self.sent.append((topic, key, value))
        return _Future()

    def flush(self, timeout: float | None = None) -> None:
        self.flushed += 1

    def close(self, timeout: float | None = None) -> None:
        pass


def _stream(signer: OrgSigner) -> list[Record]:
    return [
        _record(signer, 0, _patient_bundle("p1", "Springfield", "2026-01-01T00:00:00Z")),
        _record(signer, 1, _patient_bundle("p2", "Springfield", "2026-01-01T00:00:00Z")),
        _record(signer, 2, _patient_bundle("p1", "Shelbyville", "2026-01-02T00:00:00Z")),
        # older than the stored p2: the index keeps the newer one, so nothing goes to the MPI
        _record(signer, 3, _patient_bundle("p2", "Ogdenville", "2025-12-01T00:00:00Z")),
        _record(signer, 4, _patient_bundle("p3", "Springfield", "2026-01-03T00:00:00Z", family="DOE")),
    ]


def _as_mpi_records(sent: list[tuple[str, bytes, bytes]]) -> list[Record]:
    return [Record(t, 0, i, 0, k, v) for i, (t, k, v) in enumerate(sent)]


def test_topic_mode_publishes_what_inline_mode_feeds_and_the_linker_builds_the_same_mpi(
    tmp_path: Path,
) -> None:
    signer, checker = _checker()
    fed: list[tuple[str, dict[str, Any]]] = []

    class _Mpi:
        def upsert_patients(self, patients: Any) -> None:
            fed.extend(patients)

        def close(self) -> None:
            pass

    inline = IndexSink(IndexStore.open(f"sqlite://{tmp_path / 'i1.db'}"), checker, _Mpi())  # type: ignore[arg-type]
    producer = _Producer()
    topic = IndexSink(
        IndexStore.open(f"sqlite://{tmp_path / 'i2.db'}"), checker, mpi_producer=producer, mpi_topic="mpi.t"
    )
    for rec in _stream(signer):
        assert inline.process([rec]) == []
        assert topic.process([rec]) == []
    assert topic.mpi is None and "mpi_topic" in topic.cpu.seconds
    assert [read_patient_message(v) for _, _, v in producer.sent] == fed
    assert [p["id"] for _, p in fed] == ["p1", "p2", "p1", "p3"]
    assert [k for _, k, _ in producer.sent] == [b"st-mary|p1", b"st-mary|p2", b"st-mary|p1", b"st-mary|p3"]
    msg = orjson.loads(producer.sent[0][2])
    assert msg["topic"] == "fhir.bundles" and msg["offset"] == 0 and len(msg["bundle_sha256"]) == 64
    assert {t for t, _, _ in producer.sent} == {"mpi.t"} and producer.flushed == 4
    # a replay of the bundles in one batch: what the index keeps now (the current versions) again,
    # in both modes; the MPI takes a version it holds as a no-op
    inline.process(_stream(signer))
    topic.process(_stream(signer))
    assert [read_patient_message(v) for _, _, v in producer.sent] == fed
    assert [p["id"] for _, p in fed[4:]] == ["p2", "p1", "p3"]

    # the linker: the same persons as the MPI fed in-process, and redelivery changes nothing
    with PersonIndex.open(f"sqlite://{tmp_path / 'ref.db'}") as ref:
        for item in fed:
            ref.upsert_patients([item])
        linker = build_mpi_sink(_settings(tmp_path / "mpi.db", tmp_path / "i2.db"), elect=False)
        records = _as_mpi_records(producer.sent)
        assert linker.process(records) == []
        mpi = linker.mpi
        assert mpi is not None
        history = mpi.history("p1")
        assert linker.process(records[2:]) == [] and linker.process(records) == []
        assert mpi.history("p1") == history
        for pid in ("p1", "p2", "p3"):
            assert mpi.linked_patient_ids(pid) == ref.linked_patient_ids(pid)
        assert ref.db.one("SELECT features FROM mpi_patient WHERE patient_id = 'p1'") == mpi.db.one(
            "SELECT features FROM mpi_patient WHERE patient_id = 'p1'"
        )
        linker.close()
    inline.close()
    topic.close()


def test_a_broker_that_does_not_take_the_patients_is_transient(tmp_path: Path) -> None:
    signer, checker = _checker()
    producer = _Producer()
    producer.fail = True
    sink = IndexSink(IndexStore.open(f"sqlite://{tmp_path / 'i.db'}"), checker, mpi_producer=producer)
    with pytest.raises(TransientError, match="MPI topic"):
        sink.process(_stream(signer)[:1])
    producer.fail = False
    assert sink.process(_stream(signer)[:1]) == [] and len(producer.sent) == 1  # the retry publishes it
    sink.close()


def test_bad_messages_and_refused_patients_are_poison(tmp_path: Path) -> None:
    sink = MpiSink(lambda: PersonIndex.open(f"sqlite://{tmp_path / 'mpi.db'}"))
    good = orjson.dumps({"source_org": "a", "resource": {"resourceType": "Patient", "id": "p1"}})
    records = [
        Record("mpi", 0, 0, 0, b"k", b"not json"),
        Record(
            "mpi",
            0,
            1,
            0,
            b"k",
            orjson.dumps({"source_org": "a", "resource": {"resourceType": "Observation"}}),
        ),
        Record("mpi", 0, 2, 0, b"k", good),
        Record(
            "mpi",
            0,
            3,
            0,
            b"k",
            orjson.dumps({"source_org": "a", "resource": {"resourceType": "Patient", "id": ""}}),
        ),
    ]
    poison = sink.process(records)
    assert [(r.offset, type(e).__name__) for r, e in poison] == [
        (0, "BadPatientMessage"),
        (1, "BadPatientMessage"),
        (3, "MpiRefused"),
    ]
    assert sink.mpi is not None and sink.mpi.person_id("p1") and sink.linked == 1
    sink.close()


def test_a_fenced_linker_raises_and_writes_nothing(tmp_path: Path) -> None:
    url = f"sqlite://{tmp_path / 'mpi.db'}"
    mpi = PersonIndex.open(url)
    epoch = mpi.claim_writer("a:1")
    sink = MpiSink(lambda: PersonIndex.open(url), epoch=epoch, mpi=mpi)
    msg = orjson.dumps({"source_org": "a", "resource": {"resourceType": "Patient", "id": "p1"}})
    with PersonIndex.open(url) as other:
        other.claim_writer("b:2")
        with pytest.raises(MpiWriterFenced):
            sink.process([Record("mpi", 0, 0, 0, b"k", msg)])
        assert other.stats()["records"] == 0
    sink.close()


def test_a_linker_that_lost_its_lock_refuses_the_batch_and_close_raises(tmp_path: Path) -> None:
    url = f"sqlite://{tmp_path / 'mpi.db'}"
    leader = LeaderLock(url, "mpi:linker")
    assert leader.acquire(threading.Event())
    sink = MpiSink(lambda: PersonIndex.open(url), leader=leader)
    leader.lost.set()
    with pytest.raises(LeadershipLost):
        sink.process([Record("mpi", 0, 0, 0, b"k", b"{}")])
    with pytest.raises(LeadershipLost):
        sink.close()


def _settings(path: Path, index: Path) -> Any:
    from dataclasses import replace

    from bridge.config import Settings

    base = Settings.from_env({"FHIRBRIDGE_DATA_DIR": str(path.parent)})
    return replace(
        base,
        stores=replace(
            base.stores, mpi_url=f"sqlite://{path}", index_url=f"sqlite://{index}", mpi_linker="topic"
        ),
    )


def test_the_linker_links_only_what_the_index_holds_as_current(tmp_path: Path) -> None:
    """Two index consumers that briefly share a partition (a rebalance) can publish a patient's versions
    out of order; the MPI takes every upsert as the latest, so the linker follows the index instead."""
    signer, checker = _checker()
    producer = _Producer()
    topic = IndexSink(IndexStore.open(f"sqlite://{tmp_path / 'idx.db'}"), checker, mpi_producer=producer)
    stream = _stream(signer)
    for rec in stream[:3]:  # p1 Springfield, p2, p1 Shelbyville
        topic.process([rec])
    topic.close()
    v1, p2, v2 = _as_mpi_records(producer.sent)
    linker = build_mpi_sink(_settings(tmp_path / "mpi.db", tmp_path / "idx.db"), elect=False)
    assert linker.process([v2, p2]) == [] and linker.process([v1]) == []  # v1 arrives last
    assert linker.linked == 2 and linker.superseded == 1
    assert linker.mpi is not None
    row = linker.mpi.db.one("SELECT features FROM mpi_patient WHERE patient_id = 'p1'")
    assert row is not None and orjson.loads(row[0])["c"] == "shelbyville"
    assert "current" in linker.cpu.seconds
    linker.close()


def test_inline_index_consumers_link_one_at_a_time_and_a_superseded_one_is_fenced(tmp_path: Path) -> None:
    """Inline, the index consumer is the MPI's linker: `index run` waits for the linker's lock as
    `mpi run` does, so a second one (or one beside a linker) stands by instead of writing the MPI
    beside it; a former writer's MPI write after the take-over is refused, not dead-lettered."""
    from dataclasses import replace

    from bridge.consumers.index_sink import build_index_sink

    signer, checker = _checker()
    topic_mode = _settings(tmp_path / "mpi.db", tmp_path / "idx.db")
    settings = replace(topic_mode, stores=replace(topic_mode.stores, mpi_linker="inline"))
    stream = _stream(signer)
    first = build_index_sink(settings, elect=True)
    first.checker = checker
    got: dict[str, IndexSink] = {}
    second_started = threading.Thread(
        target=lambda: got.setdefault("sink", build_index_sink(settings, elect=True)), daemon=True
    )
    second_started.start()
    second_started.join(1.5)
    assert second_started.is_alive(), "a second inline index consumer waits as a standby"
    assert first.process(stream[:1]) == []
    first.close()
    second_started.join(10)
    assert not second_started.is_alive(), "the standby takes over once the first one ends"
    second = got["sink"]
    second.checker = checker
    assert second.mpi is not None and second.mpi.writer() is not None
    assert second.mpi.writer()[0] == 2  # type: ignore[index]
    assert second.process(stream[1:2]) == []

    stale_mpi = PersonIndex.open(settings.stores.mpi_url)
    stale_mpi.hold_writer(1)  # what the first writer would still hold had it kept running
    stale = IndexSink(IndexStore.open(settings.stores.index_url), checker, stale_mpi)
    with pytest.raises(MpiWriterFenced):
        stale.process(stream[2:3])
    stale.close()
    assert second.mpi.stats()["records"] == 2
    second.close()


def test_settings_read_the_linker_mode_and_topic() -> None:
    from bridge.config import Settings
    from bridge.errors import ConfigError
    from bridge.stream.topics import topic_specs

    s = Settings.from_env({})
    assert s.stores.mpi_linker == "inline" and s.kafka.topics.mpi == "mpi.patients"
    s = Settings.from_env(
        {"FHIRBRIDGE_MPI_LINKER": "topic", "FHIRBRIDGE_TOPIC_MPI": "x.mpi", "FHIRBRIDGE_PARTITIONS": "12"}
    )
    assert s.stores.mpi_linker == "topic"
    spec = next(t for t in topic_specs(s.kafka.topics) if t.name == "x.mpi")
    assert spec.partitions == 12
    with pytest.raises(ConfigError, match="FHIRBRIDGE_MPI_LINKER"):
        Settings.from_env({"FHIRBRIDGE_MPI_LINKER": "both"})
