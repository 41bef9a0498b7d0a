"""What decisions 6, 11 and 17 assumed of the brokers, checked on each broker the suite runs on.

The stand-ins shaped the consumer runtime (static membership because noida-db never evicted a killed
member; ``highwater()`` for lag because tansu's end offsets were wrong). These tests pin the behaviour the
runtime relies on, so a broker that breaks it fails here, by name, rather than as a stalled pipeline.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from bridge.config import Settings
from bridge.consumers.runtime import static_membership
from bridge.stream.broker import BrokerHandle
from bridge.stream.topics import ensure_topics

from .conftest import unique

pytestmark = [pytest.mark.integration]

_MEMBER = textwrap.dedent(
    """
    import faulthandler, json, os, sys, time
    faulthandler.dump_traceback_later(20, repeat=True)  # where a member that stopped answering hangs
    from bridge.config import Settings
    from bridge.consumers.runtime import ConsumerRuntime
    bootstrap, topic, group, instance = sys.argv[1:5]
    env = dict(os.environ, FHIRBRIDGE_CONSUMER_STATIC_MEMBERSHIP="on" if instance else "off")
    if instance:
        env["FHIRBRIDGE_CONSUMER_INSTANCE_ID"] = instance
    settings = Settings.from_env(env)
    print(json.dumps({"t": time.time(), "imported": True}), flush=True)

    class Printer:
        name = "behaviour"
        last = None
        runtime = None

        def process(self, records):
            self.idle()
            return []

        def idle(self):
            now = sorted(tp.partition for tp in self.runtime.consumer.assignment())
            if now != self.last:
                print(json.dumps({"t": time.time(), "partitions": now}), flush=True)
                self.last = now

        def close(self):
            pass

    sink = Printer()
    sink.runtime = ConsumerRuntime(settings, bootstrap, sink, None, group_id=group, topics=[topic])
    sink.runtime.run(poll_timeout_ms=100)
    """
)


class Member:
    """A group member in its own process, the consumer runtime the product runs (its configuration, its
    polling, its recovery), printing each assignment it gets: static when ``instance`` is given,
    dynamic when it is ``None``."""

    def __init__(self, bootstrap: str, topic: str, group: str, instance: str | None, log: Path) -> None:
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _MEMBER, bootstrap, topic, group, instance or ""],
            stdout=open(log, "ab"),  # noqa: SIM115 - the child owns it
            stderr=subprocess.STDOUT,
        )

    def assignments(self) -> list[dict]:  # type: ignore[type-arg]
        lines = self.log.read_text().splitlines() if self.log.exists() else []
        return [e for e in (json.loads(line) for line in lines if line.startswith("{")) if "partitions" in e]

    def partitions(self) -> list[int]:
        got = self.assignments()
        return got[-1]["partitions"] if got else []

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


def _until(pred, timeout: float, what: str) -> float:  # type: ignore[no-untyped-def]
    start = time.monotonic()
    while not pred():
        if time.monotonic() - start > timeout:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)
    return time.monotonic() - start


def _topic(bootstrap: str, partitions: int) -> str:
    from bridge.config import Topics

    name = unique("behaviour")
    ensure_topics(
        bootstrap, Topics(bundles=name, deadletter=name + ".dl", receipts=name + ".rc", partitions=partitions)
    )
    return name


def test_end_offsets_count_every_record_of_a_multi_record_batch(broker: BrokerHandle) -> None:
    """Lag and ``seek_to_end`` need the end offset after a batch of many records (tansu was wrong)."""
    topic = _topic(broker.bootstrap, 1)
    producer = KafkaProducer(
        bootstrap_servers=broker.bootstrap, linger_ms=200, batch_size=1 << 20, acks="all"
    )
    for i in range(50):
        producer.send(topic, key=b"k", value=f"v{i}".encode())
    producer.flush()
    producer.close()
    consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap, enable_auto_commit=False)
    tp = TopicPartition(topic, 0)
    try:
        assert consumer.end_offsets([tp])[tp] == 50
        consumer.assign([tp])
        consumer.seek_to_end(tp)
        assert consumer.position(tp) == 50
    finally:
        consumer.close()


def _instance(broker: BrokerHandle, name: str) -> str | None:
    """``name`` where the runtime joins as a static member on this broker, ``None`` where it joins as a
    dynamic one (``FHIRBRIDGE_CONSUMER_STATIC_MEMBERSHIP=auto``, decision 37)."""
    return name if static_membership(Settings.from_env({}), broker.bootstrap) else None


def _split(a: Member, b: Member) -> bool:
    """Both members hold two partitions and, between them, each partition once. The two logs are read
    one after the other, so a moment where one has printed its new assignment and the other not yet
    is not a split."""
    mine, theirs = a.partitions(), b.partitions()
    return len(mine) == 2 and len(theirs) == 2 and sorted(mine + theirs) == [0, 1, 2, 3]


def test_the_runtime_joins_as_a_static_member_below_apache_kafka_4_only(broker: BrokerHandle) -> None:
    """Decision 37: ``auto`` asks the broker its version; noida-db answers as 3.3, Apache Kafka as 4."""
    expected = {"kafka": False, "noida": True}[broker.kind]
    assert static_membership(Settings.from_env({}), broker.bootstrap) is expected


@contextlib.contextmanager
def _trickle(bootstrap: str, topic: str) -> Iterator[None]:
    """Ten records a second over every partition while the members run, as a live feed does. A member
    that kafka-python leaves with a stale assignment after a rebalance (it stopped heartbeating while
    it believed itself joined; seen on a busy machine, with raw kafka-python consumers too) learns it
    only when a commit is refused: the runtime then rejoins (``REFUSED_REJOIN_S``). An idle member
    never commits, so on an idle topic nothing would tell it."""
    stop = threading.Event()
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=0)

    def feed() -> None:
        i = 0
        while not stop.wait(0.1):
            producer.send(topic, key=f"k{i}".encode(), value=b"x", partition=i % 4)
            i += 1

    thread = threading.Thread(target=feed, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(5)
        producer.close(timeout=5)


@pytest.mark.broker_quirk("noida", "a member killed with SIGKILL is never evicted (decision 6)")
@pytest.mark.broker_quirk(
    "kafka",
    "kafka-python 3.0.12 leaves the first member with a stale assignment when a second joins, in about"
    " one full `make test` in two (each of its commits refused, no rejoin; a forced rejoin once hung"
    " it): not yet pinned down, see the closing note of issues 25-26. Eviction and joins on Kafka are"
    " exercised by the drills (test_kafka_drills.py, test_ledger_failover.py, test_mpi_failover.py)",
)
def test_a_member_killed_is_replaced_within_the_session_timeout_and_rejoins(
    broker: BrokerHandle, tmp_path: Path
) -> None:
    """Decisions 6 and 37, with the membership the runtime uses on this broker, on a live feed. Join
    timing, eviction of a member killed with SIGKILL after ``session_timeout_ms`` (6 s), and the killed
    member restarted rejoining and splitting the partitions again."""
    topic = _topic(broker.bootstrap, 4)
    group = unique("g")
    with _trickle(broker.bootstrap, topic):
        a = Member(broker.bootstrap, topic, group, _instance(broker, "member-a"), tmp_path / "a.log")
        _members_split_and_recover(broker, topic, group, a, tmp_path)


def _members_split_and_recover(
    broker: BrokerHandle, topic: str, group: str, a: Member, tmp_path: Path
) -> None:
    b: Member | None = None
    try:
        joined = _until(lambda: len(a.partitions()) == 4, 30, "the first member to join")
        assert joined < 10, f"joining an empty group took {joined:.1f}s"
        b = Member(broker.bootstrap, topic, group, _instance(broker, "member-b"), tmp_path / "b.log")
        survivor = b
        split = _until(lambda: _split(a, survivor), 90, "the group to split 2/2")
        a.kill9()
        # the session timeout (6 s) and a rebalance: 6-7 s on an idle machine, up to 13 s measured with
        # both cores busy. Bounded loosely: the decision needs eviction, the seconds are the broker's
        evicted = _until(lambda: len(survivor.partitions()) == 4, 45, "the survivor to take every partition")
        assert evicted < 30, f"a killed member held its partitions for {evicted:.1f}s"
        a = Member(broker.bootstrap, topic, group, _instance(broker, "member-a"), tmp_path / "a2.log")
        # about 2 s on an idle machine; 16-52 s measured with both cores busy (the survivor took the
        # rebalance in late: kafka-python)
        back = _until(lambda: _split(a, survivor), 90, "the restarted member to rejoin")
        print(f"\nsplit {split:.1f}s, evicted {evicted:.1f}s, rejoined {back:.1f}s ({broker.kind})")
    finally:
        a.kill9()
        if b is not None:
            b.kill9()


@pytest.mark.broker_quirk(
    "kafka",
    "the runtime joins as a dynamic member on Apache Kafka 4 (decision 37: kafka-python's static members"
    " stalled there); the drills exercise what it does instead",
)
def test_a_static_member_restarted_at_once_gets_its_own_partitions_back_without_a_rebalance(
    broker: BrokerHandle, tmp_path: Path
) -> None:
    """Decision 6's reason, where the runtime uses static membership: a consumer restarted after
    ``kill -9`` with the same ``group.instance.id`` takes back the partitions it had, and the other
    member keeps its own."""
    assert _instance(broker, "member-a") == "member-a"
    topic = _topic(broker.bootstrap, 4)
    group = unique("g")
    a = Member(broker.bootstrap, topic, group, "member-a", tmp_path / "a.log")
    b = Member(broker.bootstrap, topic, group, "member-b", tmp_path / "b.log")
    try:
        _until(lambda: _split(a, b), 60, "the group to split 2/2")
        time.sleep(1)
        mine, theirs, changes = a.partitions(), b.partitions(), len(b.assignments())
        a.kill9()
        a = Member(broker.bootstrap, topic, group, "member-a", tmp_path / "a2.log")
        back = _until(lambda: a.partitions() == mine, 20, "the restarted member to get its partitions back")
        assert back < 10, f"took {back:.1f}s"
        time.sleep(1)
        assert b.partitions() == theirs and len(b.assignments()) == changes, "the other member was rebalanced"
    finally:
        a.kill9()
        b.kill9()
