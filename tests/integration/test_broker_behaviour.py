"""What decisions 6, 11 and 17 assumed of the brokers, checked on each broker the suite runs on.

The stand-ins shaped the consumer runtime (static membership because noida-db never evicted a killed
member; ``highwater()`` for lag because tansu's end offsets were wrong). These tests pin the behaviour the
runtime relies on, so a broker that breaks it fails here, by name, rather than as a stalled pipeline.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from bridge.stream.broker import BrokerHandle
from bridge.stream.topics import ensure_topics

from .conftest import unique

pytestmark = [pytest.mark.integration]

_MEMBER = textwrap.dedent(
    """
    import json, sys, time
    from kafka import KafkaConsumer
    bootstrap, topic, group, instance = sys.argv[1:5]
    c = KafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=group, group_instance_id=instance,
                      session_timeout_ms=6000, heartbeat_interval_ms=1500, enable_auto_commit=False,
                      auto_offset_reset="earliest")
    last = None
    while True:
        c.poll(timeout_ms=100)
        now = sorted(tp.partition for tp in c.assignment())
        if now != last:
            print(json.dumps({"t": time.time(), "partitions": now}), flush=True)
            last = now
    """
)


class Member:
    """A static group member in its own process, printing each assignment it gets."""

    def __init__(self, bootstrap: str, topic: str, group: str, instance: str, log: Path) -> None:
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _MEMBER, bootstrap, topic, group, instance],
            stdout=open(log, "ab"),  # noqa: SIM115 - the child owns it
            stderr=subprocess.STDOUT,
        )

    def assignments(self) -> list[dict]:  # type: ignore[type-arg]
        lines = self.log.read_text().splitlines() if self.log.exists() else []
        return [json.loads(line) for line in lines if line.startswith("{")]

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


@pytest.mark.broker_quirk("noida", "a member killed with SIGKILL is never evicted (decision 6)")
def test_a_static_member_killed_is_replaced_within_the_session_timeout_and_takes_its_partitions_back(
    broker: BrokerHandle, tmp_path: Path
) -> None:
    """Decision 6. Join timing, eviction of a member killed with SIGKILL after ``session_timeout_ms``
    (6 s), and a restarted static member that gets its partitions back without a second rebalance."""
    topic = _topic(broker.bootstrap, 4)
    group = unique("g")
    a = Member(broker.bootstrap, topic, group, "member-a", tmp_path / "a.log")
    b: Member | None = None
    try:
        joined = _until(lambda: len(a.partitions()) == 4, 30, "the first member to join")
        assert joined < 10, f"joining an empty group took {joined:.1f}s"
        b = Member(broker.bootstrap, topic, group, "member-b", tmp_path / "b.log")
        _until(lambda: len(a.partitions()) == 2 and len(b.partitions()) == 2, 30, "the group to split 2/2")
        a.kill9()
        evicted = _until(lambda: len(b.partitions()) == 4, 30, "the survivor to take every partition")
        assert evicted < 6 + 6, f"a killed static member held its partitions for {evicted:.1f}s"
        a = Member(broker.bootstrap, topic, group, "member-a", tmp_path / "a2.log")
        back = _until(lambda: len(a.partitions()) == 2, 30, "the restarted member to rejoin")
        assert back < 10
        assert sorted(a.partitions() + b.partitions()) == [0, 1, 2, 3]
    finally:
        a.kill9()
        if b is not None:
            b.kill9()


def test_a_static_member_restarted_at_once_gets_its_own_partitions_back_without_a_rebalance(
    broker: BrokerHandle, tmp_path: Path
) -> None:
    """Decision 6's reason on every broker: a consumer restarted after ``kill -9`` with the same
    ``group.instance.id`` takes back the partitions it had, and the other member keeps its own."""
    topic = _topic(broker.bootstrap, 4)
    group = unique("g")
    a = Member(broker.bootstrap, topic, group, "member-a", tmp_path / "a.log")
    b = Member(broker.bootstrap, topic, group, "member-b", tmp_path / "b.log")
    try:
        _until(lambda: len(a.partitions()) == 2 and len(b.partitions()) == 2, 30, "the group to split 2/2")
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
