from __future__ import annotations

import time
from typing import Any

import pytest
import structlog

from bridge.config import Settings
from bridge.consumers.runtime import Record, batch_context, consumer_config, instance_id
from bridge.errors import ConfigError


def test_batch_log_context_names_topic_partitions_and_offsets() -> None:
    records = [Record("fhir.bundles", p, o, 0, None, b"", []) for p, o in [(0, 5), (1, 9), (0, 7), (1, 8)]]
    ctx = batch_context(records)
    assert ctx["topic"] == "fhir.bundles" and ctx["partition"] == 0 and ctx["offset"] == 5
    assert ctx["offsets"] == {"fhir.bundles/0": [5, 7], "fhir.bundles/1": [8, 9]}
    with structlog.contextvars.bound_contextvars(**ctx):
        assert structlog.contextvars.get_contextvars()["offsets"] == ctx["offsets"]


def test_consumer_config_never_keeps_the_45s_session_default_and_is_static() -> None:
    s = Settings.from_env({"FHIRBRIDGE_CONSUMER_STATIC_MEMBERSHIP": "on"})
    cfg = consumer_config(s, "127.0.0.1:1", "fhirbridge-ledger")
    assert (cfg["session_timeout_ms"], cfg["heartbeat_interval_ms"]) == (6000, 1500)
    assert cfg["enable_auto_commit"] is False
    assert cfg["group_instance_id"] == instance_id(s, "fhirbridge-ledger")
    assert "group_instance_id" not in consumer_config(s, "127.0.0.1:1", None)
    s2 = Settings.from_env(
        {"FHIRBRIDGE_CONSUMER_INSTANCE_ID": "ledger-2", "FHIRBRIDGE_CONSUMER_STATIC_MEMBERSHIP": "on"}
    )
    assert consumer_config(s2, "127.0.0.1:1", "g")["group_instance_id"] == "ledger-2"
    off = Settings.from_env({"FHIRBRIDGE_CONSUMER_STATIC_MEMBERSHIP": "off"})
    assert "group_instance_id" not in consumer_config(off, "127.0.0.1:1", "g")


def test_static_membership_auto_is_on_below_apache_kafka_4(monkeypatch: pytest.MonkeyPatch) -> None:
    """noida-db answers as Kafka 3.3 and never evicts a dead dynamic member; on Kafka 4 kafka-python's
    static members were seen to stall after a rebalance (decision 37)."""
    from bridge.consumers import runtime

    monkeypatch.setattr(runtime, "_broker_versions", {"noida:1": (3, 3), "kafka:1": (4, 1)})
    s = Settings.from_env({})
    assert "group_instance_id" in consumer_config(s, "noida:1", "g")
    assert "group_instance_id" not in consumer_config(s, "kafka:1", "g")
    with pytest.raises(
        ConfigError, match="FHIRBRIDGE_CONSUMER_STATIC_MEMBERSHIP must be one of auto, on, off"
    ):
        Settings.from_env({"FHIRBRIDGE_CONSUMER_STATIC_MEMBERSHIP": "sometimes"})


def test_a_sink_whose_database_is_down_is_waited_for_not_ready_and_other_errors_raise() -> None:
    """A consumer started before its database waits (state ``waiting``, not ready) and logs each try
    without the driver's message; a configuration error is not waited for."""
    import psycopg

    from bridge.consumers.runtime import build_sink_when_reachable
    from bridge.health import Health

    health = Health()
    health.set_state("standby")
    tries: list[str] = []
    states: list[str] = []

    def factory(settings: Settings, bootstrap: str) -> str:
        states.append(health.state)
        tries.append(bootstrap)
        if len(tries) < 3:
            raise psycopg.OperationalError("connection to server at 10.0.0.9 port 5432 failed: refused")
        return "the sink"

    with structlog.testing.capture_logs() as logs:
        sink = build_sink_when_reachable(factory, Settings.from_env({}), "b:1", health, first_delay=0.01)
    assert sink == "the sink" and tries == ["b:1"] * 3
    assert states == ["standby", "waiting", "waiting"] and health.state == "standby"
    waits = [e for e in logs if e["event"] == "consumer.database_unreachable"]
    assert [e["retry_in_s"] for e in waits] == [0.01, 0.02]
    assert all(e["error"] == "OperationalError" and "10.0.0.9" not in str(e) for e in waits)
    assert [e["event"] for e in logs][-1] == "consumer.database_reached"

    def broken(settings: Settings, bootstrap: str) -> str:
        raise ValueError("not a database URL")

    with pytest.raises(ValueError):
        build_sink_when_reachable(broken, Settings.from_env({}), "b:1", Health(), first_delay=0.01)

    waiting = Health()
    waiting.set_state("waiting")
    assert waiting.live()[0] and not waiting.ready()[0]


def test_record_timestamp_is_rfc3339_utc() -> None:
    assert Record("t", 0, 0, 1_767_225_600_123, None, None).timestamp_iso == "2026-01-01T00:00:00.123Z"


# -- polling: short slices, sleeps in between, a batch gathered for at most the linger ------------
class _Msg:
    def __init__(self, offset: int, partition: int = 0) -> None:
        self.topic, self.partition, self.offset, self.timestamp = "fhir.bundles", partition, offset, 0
        self.key, self.value, self.headers = None, b"{}", []


class _ScriptedConsumer:
    """Answers each poll from a script of record counts (0: nothing yet), then nothing."""

    def __init__(self, script: list[int]) -> None:
        self.script = list(script)
        self.polls: list[tuple[int, int | None]] = []
        self.next_offset = 0

    def assignment(self) -> set[str]:
        return {"tp"}

    def commit(self, offsets: Any) -> None:
        from kafka.errors import RebalanceInProgressError

        raise RebalanceInProgressError("the group is rebalancing")

    def poll(self, timeout_ms: int = 0, max_records: int | None = None) -> dict[str, list[_Msg]]:
        self.polls.append((timeout_ms, max_records))
        n = self.script.pop(0) if self.script else 0
        n = min(n, max_records or n)
        msgs = [_Msg(self.next_offset + i) for i in range(n)]
        self.next_offset += n
        return {"tp": msgs} if msgs else {}


def _runtime(consumer: _ScriptedConsumer, **env: str) -> Any:
    from bridge.consumers.runtime import ConsumerRuntime

    settings = Settings.from_env(env)

    class _Sink:
        name = "test"

        def process(self, records: Any) -> list[Any]:
            return []

        def close(self) -> None:
            pass

    return ConsumerRuntime(settings, "127.0.0.1:1", _Sink(), None, group_id="g", consumer=consumer)  # type: ignore[arg-type]


def test_poll_batch_returns_a_full_batch_at_once() -> None:
    consumer = _ScriptedConsumer([3, 0, 0])
    rt = _runtime(consumer, FHIRBRIDGE_CONSUMER_BATCH="3", FHIRBRIDGE_CONSUMER_LINGER_MS="5000")
    t0 = time.monotonic()
    records = rt.poll_batch(timeout_ms=5000)
    assert [r.offset for r in records] == [0, 1, 2]
    assert len(consumer.polls) == 1 and time.monotonic() - t0 < 1.0
    assert consumer.polls[0] == (rt.POLL_SLICE_MS, 3)  # never kafka-python's own long (spinning) poll


def test_poll_batch_gathers_a_trickle_until_the_linger_ends() -> None:
    consumer = _ScriptedConsumer([1, 0, 2, 0, 1] + [0] * 1000)
    rt = _runtime(
        consumer,
        FHIRBRIDGE_CONSUMER_BATCH="500",
        FHIRBRIDGE_CONSUMER_LINGER_MS="150",
        FHIRBRIDGE_CONSUMER_IDLE_SLEEP_MS="10",
    )
    t0 = time.monotonic()
    records = rt.poll_batch(timeout_ms=5000)
    elapsed = time.monotonic() - t0
    assert [r.offset for r in records] == [0, 1, 2, 3]
    assert 0.14 <= elapsed < 1.0  # waited the linger after the first record, not the 5 s poll timeout
    assert all(
        max_records == 500 - got
        for (_, max_records), got in zip(consumer.polls, [0, 1, 1, 3, 3], strict=False)
    )
    assert len(consumer.polls) < 40  # slept between the polls instead of spinning


def test_poll_batch_gives_up_after_the_timeout_without_spinning() -> None:
    consumer = _ScriptedConsumer([])
    rt = _runtime(consumer, FHIRBRIDGE_CONSUMER_IDLE_SLEEP_MS="20")
    t0 = time.monotonic()
    assert rt.poll_batch(timeout_ms=200) == []
    assert 0.19 <= time.monotonic() - t0 < 1.0
    assert len(consumer.polls) <= 12


def test_cpu_clock_adds_up_stages_per_record() -> None:
    from bridge.consumers.runtime import CpuClock

    clock = CpuClock()
    with clock.stage("work"):
        sum(i * i for i in range(200_000))
    clock.add("work", 0.5)
    clock.add("other", 0.25)
    per = clock.per_record_ms(500)
    assert per["other"] == 0.5 and per["work"] > 1.0
    assert CpuClock().per_record_ms(0) == {}


def test_a_commit_during_a_rebalance_is_skipped_not_fatal() -> None:
    """A restarted static member can be handed records and then see the group rebalance (noida-db does
    this): the commit fails, the batch is redelivered to the partition's owner, and the idempotent
    sinks make the second delivery a no-op. The consumer must keep running."""
    rt = _runtime(_ScriptedConsumer([]))
    rt._commit([Record("fhir.bundles", 0, 7, 0, None, b"")])  # does not raise


def test_iso_millis_matches_datetime_isoformat() -> None:
    import random
    from datetime import UTC, datetime

    from bridge.consumers.runtime import iso_millis

    rng = random.Random(6)
    for ms in [
        -62_135_596_800_000,
        -50_000_000_000_000,
        0,
        -1,
        999,
        1000,
        1_767_225_599_999,
        4_102_444_800_000,
    ] + [rng.randrange(0, 4_102_444_800_000) for _ in range(2000)]:
        expected = (
            datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        )
        assert iso_millis(ms) == expected, ms


class _RebalancingConsumer:
    """kafka-python's rules for a partition that a rebalance assigns: it gets a fresh state, unpaused, at
    its committed offset. Partition 1 is assigned while the first batch is being applied."""

    def __init__(self) -> None:
        from kafka import TopicPartition

        self.p0, self.p1 = TopicPartition("fhir.bundles", 0), TopicPartition("fhir.bundles", 1)
        self.log_end = {self.p0: 20, self.p1: 300}
        self.committed = {self.p0: 0, self.p1: 0}
        self.state: dict[Any, dict[str, Any]] = {self.p0: {"pos": 0, "paused": False}}
        self.in_batch = False

    def assignment(self) -> set[Any]:
        return set(self.state)

    def paused(self) -> set[Any]:
        return {tp for tp, st in self.state.items() if st["paused"]}

    def pause(self, *tps: Any) -> None:
        for tp in tps:
            self.state[tp]["paused"] = True

    def resume(self, *tps: Any) -> None:
        for tp in tps:
            self.state[tp]["paused"] = False

    def seek(self, tp: Any, offset: int) -> None:
        self.state[tp]["pos"] = offset

    def poll(self, timeout_ms: int = 0, max_records: int | None = None) -> dict[Any, list[Any]]:
        if self.in_batch and self.p1 not in self.state:
            self.state[self.p1] = {"pos": self.committed[self.p1], "paused": False}
        out: dict[Any, list[Any]] = {}
        left = max_records or 500
        for tp, st in self.state.items():
            n = min(left, self.log_end[tp] - st["pos"])
            if st["paused"] or n <= 0:
                continue
            out[tp] = [_Msg(o, partition=tp.partition) for o in range(st["pos"], st["pos"] + n)]
            st["pos"] += n
            left -= n
        if not out:
            time.sleep(timeout_ms / 1000)
        return out

    def commit(self, offsets: Any) -> None:
        for tp, om in offsets.items():
            self.committed[tp] = om.offset

    def highwater(self, tp: Any) -> int:
        return self.log_end[tp]

    def position(self, tp: Any) -> int:
        return int(self.state[tp]["pos"])

    def close(self, autocommit: bool = False) -> None:
        pass


@pytest.mark.parametrize("mode", ["backoff", "slow"])
def test_records_assigned_by_a_rebalance_during_a_batch_are_not_skipped(mode: str) -> None:
    """While a batch runs (over a second) or backs off (its database is down), the runtime polls with
    its partitions paused to keep its group membership. A partition that a rebalance assigns meanwhile
    arrives unpaused: its records must not be polled and dropped, or the next commit skips them."""
    from bridge.consumers.runtime import ConsumerRuntime
    from bridge.errors import TransientError

    consumer = _RebalancingConsumer()
    seen: set[tuple[int, int]] = set()

    class _Sink:
        name = "test"
        calls = 0

        def process(self, records: Any) -> list[Any]:
            self.calls += 1
            consumer.in_batch = True  # the group rebalances while this batch is applied
            if mode == "backoff" and self.calls == 1:
                raise TransientError("database down")
            if mode == "slow" and self.calls == 1:
                time.sleep(1.3)
            seen.update((r.partition, r.offset) for r in records)
            return []

        def close(self) -> None:
            pass

    settings = Settings.from_env({"FHIRBRIDGE_CONSUMER_LINGER_MS": "5"})
    rt = ConsumerRuntime(settings, "127.0.0.1:1", _Sink(), None, group_id="g", consumer=consumer)  # type: ignore[arg-type]
    deadline = time.monotonic() + 10
    rt.run(
        until=lambda: time.monotonic() > deadline or consumer.committed[consumer.p1] >= 300,
        poll_timeout_ms=50,
    )
    assert consumer.committed[consumer.p1] == 300
    assert {o for p, o in seen if p == 1} == set(range(300))
    assert {o for p, o in seen if p == 0} == set(range(20))


def test_a_stop_during_a_back_off_hands_the_batch_back_uncommitted_and_returns_at_once() -> None:
    """SIGTERM while the database is down (a pod rescheduled in an outage): the runtime stops within
    the grace period instead of retrying until the database returns, and commits nothing of the
    batch it could not apply, so that whoever takes the partitions gets it again."""
    from bridge.consumers.runtime import ConsumerRuntime
    from bridge.errors import TransientError

    consumer = _RebalancingConsumer()
    rt: ConsumerRuntime | None = None

    class _DownSink:
        name = "test"
        calls = 0

        def process(self, records: Any) -> list[Any]:
            self.calls += 1
            if self.calls == 3 and rt is not None:
                rt.stop(15, None)  # SIGTERM arrives during the outage
            raise TransientError("database down")

        def close(self) -> None:
            pass

    sink = _DownSink()
    settings = Settings.from_env({"FHIRBRIDGE_CONSUMER_LINGER_MS": "5"})
    rt = ConsumerRuntime(settings, "127.0.0.1:1", sink, None, group_id="g", consumer=consumer)  # type: ignore[arg-type]
    started = time.monotonic()
    with structlog.testing.capture_logs() as logs:
        rt.run(poll_timeout_ms=50)
    assert time.monotonic() - started < 5, "stopped at once, not after the back-off grew"
    assert sink.calls == 3 and rt.processed == 0
    assert consumer.committed == {consumer.p0: 0, consumer.p1: 0}, "nothing of the batch committed"
    assert "consumer.batch_handed_back" in [e["event"] for e in logs]


def test_between_batches_a_leftover_pause_is_lifted_and_a_stalled_consumer_rejoins() -> None:
    """A static member that held its partitions and fetched nothing behind records (seen on a
    three-node Apache Kafka after a commit refused during a rebalance) rejoins after STALL_S."""
    rt, consumer, calls = _refusing_runtime([False])
    consumer.log_end[consumer.p0] = 0
    consumer.state[consumer.p0]["paused"] = True  # left over from a rebalance inside a batch
    consumer.end_offsets = lambda tps, timeout_ms=None: {tp: 5 for tp in tps}  # type: ignore[attr-defined]
    consumer.position = lambda tp, timeout_ms=None: 0  # type: ignore[method-assign]
    rt._unstick()
    assert consumer.paused() == set() and calls == [], "a leftover pause is lifted; no rejoin yet"
    rt._delivered_at -= rt.STALL_S + 1
    rt._unstick()
    assert calls == [], "behind once: a record may have come after the last fetch"
    rt._delivered_at -= rt.STALL_S + 1
    rt._unstick()
    assert calls == ["unsubscribe", "subscribe ['fhir.bundles']"], "behind twice at the same position"
    consumer.end_offsets = lambda tps, timeout_ms=None: {tp: 0 for tp in tps}  # type: ignore[attr-defined]
    for _ in range(2):
        rt._delivered_at -= rt.STALL_S + 1
        rt._unstick()
    assert len(calls) == 2, "nothing behind its positions: a quiet topic, not a stall"
    consumer.end_offsets = lambda tps, timeout_ms=None: {tp: 5 for tp in tps}  # type: ignore[attr-defined]
    consumer.position = lambda tp, timeout_ms=None: None  # type: ignore[method-assign,assignment,return-value]
    for _ in range(2):
        rt._delivered_at -= rt.STALL_S + 1
        rt._unstick()
    assert len(calls) == 2, "a position not known in time is not a stall (nor a crash)"


def test_a_commit_refused_during_a_rebalance_is_retried_for_the_partitions_still_ours() -> None:
    from bridge.consumers.runtime import Record

    refusing = [True]
    rt, consumer, _ = _refusing_runtime(refusing)
    rt._commit([Record.from_kafka(_Msg(o, partition=0)) for o in range(5)])
    assert consumer.committed[consumer.p0] == 0 and rt._uncommitted, "refused: kept for later"
    refusing[0] = False
    rt._unstick()  # the consumer idles: the commit is tried again
    assert consumer.committed[consumer.p0] == 5 and not rt._uncommitted


def _refusing_runtime(refusing: list[bool]) -> tuple[Any, _RebalancingConsumer, list[str]]:
    """A runtime whose broker refuses every commit as "rebalance in progress" while ``refusing[0]``;
    the consumer's unsubscribe/subscribe calls (a rejoin) are recorded."""
    from kafka.errors import RebalanceInProgressError

    from bridge.consumers.runtime import ConsumerRuntime

    consumer = _RebalancingConsumer()
    calls: list[str] = []

    def commit(offsets: Any) -> None:
        if refusing[0]:
            raise RebalanceInProgressError("rebalancing")
        for tp, om in offsets.items():
            consumer.committed[tp] = om.offset

    consumer.commit = commit  # type: ignore[method-assign]
    consumer.unsubscribe = lambda: calls.append("unsubscribe")  # type: ignore[attr-defined]
    consumer.subscribe = lambda topics: calls.append(f"subscribe {topics}")  # type: ignore[attr-defined]

    class _Sink:
        name = "test"

        def process(self, records: Any) -> list[Any]:
            return []

        def close(self) -> None:
            pass

    rt = ConsumerRuntime(Settings.from_env({}), "127.0.0.1:1", _Sink(), None, group_id="g", consumer=consumer)  # type: ignore[arg-type]
    return rt, consumer, calls


def test_commits_refused_for_long_rejoin_the_group_and_an_accepted_one_resets_the_clock() -> None:
    """A broker that keeps refusing commits as "rebalance in progress" while the client believes its
    membership stable (a static member that rejoined, on noida-db and on Kafka 4): after
    ``REFUSED_REJOIN_S`` of refusals the runtime rejoins; the offsets stay kept for the next try."""
    from bridge.consumers.runtime import Record

    refusing = [True]
    rt, consumer, calls = _refusing_runtime(refusing)
    rt._commit([Record.from_kafka(_Msg(o, partition=0)) for o in range(5)])
    rt._unstick()
    assert calls == [] and rt._uncommitted, "refused for a moment: retried, no rejoin"
    assert rt._refused_since is not None
    rt._refused_since -= rt.REFUSED_REJOIN_S + 1
    rt._unstick()
    assert calls == ["unsubscribe", "subscribe ['fhir.bundles']"] and rt._uncommitted
    refusing[0] = False
    rt._unstick()
    assert consumer.committed[consumer.p0] == 5 and not rt._uncommitted and rt._refused_since is None


def test_a_busy_consumer_whose_commits_keep_being_refused_rejoins_too() -> None:
    """On a live feed the consumer is never idle, so the rejoin must not wait for an idle retry: a
    member with a stale assignment kept consuming every partition for minutes, each commit refused."""
    from bridge.consumers.runtime import Record

    rt, _, calls = _refusing_runtime([True])
    rt._commit([Record.from_kafka(_Msg(0, partition=0))])
    assert calls == []
    assert rt._refused_since is not None
    rt._refused_since -= rt.REFUSED_REJOIN_S + 1
    rt._commit([Record.from_kafka(_Msg(1, partition=0))])
    assert calls == ["unsubscribe", "subscribe ['fhir.bundles']"]
